//! The secrets the control plane keeps in etcd, sealed with a key held
//! outside etcd (`etcd.encryption.key_file`): the cluster CA's private key
//! (`pki/cluster_ca`), the access-token signing secrets
//! (`auth/signing_keys`) and the idempotency secret (`auth/idempotency_secret`,
//! created and used in [`crate::idempotency`]). The seal itself is [`otherix_store::sealed`]; this
//! module puts the key in place at start, refuses to start with the wrong
//! key, seals values written in plaintext by earlier versions or sealed with
//! an earlier key, and offers the seal/open calls the CA and key code use.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use otherix_proto::otherix::store::v1::{ClusterCaRecord, SigningKey, SigningKeys};
use otherix_store::keys::IDEMPOTENCY_SECRET;
use otherix_store::{Batch, Expect, SealError, Sealer, Store, StoreError, Versioned, sealed};

use crate::config::Config;
use crate::identity::keys::SIGNING_KEYS;
use crate::nodes::CA_KEY;

/// Why the secrets-at-rest key could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// etcd holds sealed secrets and the key file is gone.
    #[error(
        "etcd holds secrets sealed with key {found}, but the key file {path} (etcd.encryption.key_file) does not exist: \
         restore it from a backup or copy it from another replica; otherix-api never makes a new key over sealed secrets"
    )]
    KeyMissing {
        /// The configured key file.
        path: PathBuf,
        /// The key id the stored secrets name.
        found: String,
    },
    /// The configured keys do not open the stored secrets.
    #[error(
        "{key} is sealed with key {found}, which is neither etcd.encryption.key_file ({path}, key {current}) \
         nor one of etcd.encryption.previous_key_files"
    )]
    WrongKey {
        /// The store key.
        key: String,
        /// The key id the value names.
        found: String,
        /// The configured key file.
        path: PathBuf,
        /// Its key id.
        current: String,
    },
    /// A key file could not be created or loaded.
    #[error("etcd.encryption: cannot create or load a key file")]
    Key(#[source] SealError),
    /// A stored secret does not open or the store failed.
    #[error("secrets at rest")]
    Store(#[source] StoreError),
}

fn sealed_err(key: &str, source: SealError) -> StoreError {
    StoreError::Sealed { key: key.to_owned(), source }
}

fn signing_context(id: &str) -> String {
    format!("{SIGNING_KEYS}/{id}")
}

/// Seals a signing key's secret for storage.
pub fn seal_signing_key(store: &Store, mut key: SigningKey) -> Result<SigningKey, StoreError> {
    let sealer = store.sealer().map_err(|e| sealed_err(SIGNING_KEYS, e))?;
    key.secret = sealer.seal(&key.secret, &signing_context(&key.id)).map_err(|e| sealed_err(SIGNING_KEYS, e))?;
    Ok(key)
}

/// The plaintext secret of a stored signing key. Plaintext in the store is
/// refused: someone who can write etcd must not be able to plant a key.
pub fn signing_secret(store: &Store, key: &SigningKey) -> Result<Vec<u8>, StoreError> {
    let sealer = store.sealer().map_err(|e| sealed_err(SIGNING_KEYS, e))?;
    sealer.open(&key.secret, &signing_context(&key.id)).map_err(|e| sealed_err(SIGNING_KEYS, e))
}

/// Seals the cluster CA's private key (PEM) for storage.
pub fn seal_ca_key(store: &Store, key_pem: &str) -> Result<String, StoreError> {
    let sealer = store.sealer().map_err(|e| sealed_err(CA_KEY, e))?;
    sealer.seal_text(key_pem, CA_KEY).map_err(|e| sealed_err(CA_KEY, e))
}

/// The cluster CA's private key (PEM) from its stored, sealed form.
pub fn ca_key(store: &Store, stored: &str) -> Result<String, StoreError> {
    let sealer = store.sealer().map_err(|e| sealed_err(CA_KEY, e))?;
    sealer.open_text(stored, CA_KEY).map_err(|e| sealed_err(CA_KEY, e))
}

/// The sealed records as read at start.
struct Stored {
    ca: Option<ClusterCaRecord>,
    keys: Option<SigningKeys>,
    idempotency: Option<Versioned<Vec<u8>>>,
}

/// Reads the sealed records, waiting while the store does not answer (an
/// external etcd may come up after us).
async fn read(store: &Store) -> Result<Stored, SecretsError> {
    let mut delay = Duration::from_millis(200);
    loop {
        let got = async {
            let ca = store.get::<ClusterCaRecord>(CA_KEY).await?.map(|v| v.value);
            let keys = store.get::<SigningKeys>(SIGNING_KEYS).await?.map(|v| v.value);
            let idempotency = store.get::<Vec<u8>>(IDEMPOTENCY_SECRET).await?;
            Ok::<_, StoreError>(Stored { ca, keys, idempotency })
        }
        .await;
        match got {
            Ok(v) => return Ok(v),
            Err(e @ StoreError::Unavailable(_)) => {
                tracing::warn!(error = %e, "store not answering yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(SecretsError::Store(e)),
        }
    }
}

/// Every sealed value in the records, with its store key and context.
fn sealed_values(stored: &Stored) -> Vec<(String, Vec<u8>, String)> {
    let mut out = Vec::new();
    if let Some(raw) = stored.ca.as_ref().and_then(|c| sealed::text_bytes(&c.key_pem)) {
        out.push((CA_KEY.to_owned(), raw, CA_KEY.to_owned()));
    }
    for k in stored.keys.iter().flat_map(|s| &s.keys) {
        if sealed::sealed_key_id(&k.secret).is_some() {
            out.push((SIGNING_KEYS.to_owned(), k.secret.clone(), signing_context(&k.id)));
        }
    }
    if let Some(v) = &stored.idempotency {
        out.push((IDEMPOTENCY_SECRET.to_owned(), v.value.clone(), IDEMPOTENCY_SECRET.to_owned()));
    }
    out
}

/// Puts the key in place and returns the store with it attached: creates
/// the key file on first start (when etcd holds no sealed secret), refuses a
/// missing or wrong key, and seals plaintext or old-key values afresh.
pub async fn open(config: &Config, store: Store) -> Result<Store, SecretsError> {
    let path = config.etcd_encryption_key_file();
    let read = read(&store).await?;
    let stored = sealed_values(&read);
    if !path.exists() {
        if let Some((_, raw, _)) = stored.first() {
            return Err(SecretsError::KeyMissing { path, found: sealed::key_id_hex(raw).unwrap_or_default() });
        }
        Sealer::create_key_file(&path).map_err(SecretsError::Key)?;
        tracing::info!(path = %path.display(), "created the key that seals secrets in etcd; back it up, and give every replica the same file");
    }
    let sealer = Sealer::load(&path, &config.etcd.encryption.previous_key_files).map_err(SecretsError::Key)?;
    for (key, raw, context) in &stored {
        match sealer.open(raw, context) {
            Ok(_) => {}
            Err(SealError::UnknownKey { id, current }) => {
                return Err(SecretsError::WrongKey { key: key.clone(), found: id, path, current });
            }
            Err(e) => return Err(SecretsError::Store(sealed_err(key, e))),
        }
    }
    tracing::info!(key_id = %sealer.current_id(), "secrets at rest: key loaded");
    let store = store.with_sealer(Arc::new(sealer));
    reseal(&store, read.idempotency).await.map_err(SecretsError::Store)?;
    Ok(store)
}

/// Seals what is plaintext (written before secrets were sealed) or sealed
/// with an earlier key, with the current key; compare-and-swap, so replicas
/// doing it at once do not clash.
async fn reseal(store: &Store, idempotency: Option<Versioned<Vec<u8>>>) -> Result<(), StoreError> {
    let sealer = store.sealer().map_err(|e| sealed_err(CA_KEY, e))?;
    if let Some(v) = idempotency.filter(|v| !sealer.is_current(&v.value)) {
        let plain = sealer.open(&v.value, IDEMPOTENCY_SECRET).map_err(|e| sealed_err(IDEMPOTENCY_SECRET, e))?;
        let sealed = sealer.seal(&plain, IDEMPOTENCY_SECRET).map_err(|e| sealed_err(IDEMPOTENCY_SECRET, e))?;
        tracing::info!(key = IDEMPOTENCY_SECRET, "sealing the idempotency secret with the current key");
        match store.commit(Batch::new().put(IDEMPOTENCY_SECRET, &sealed, Some(Expect::Revision(v.mod_revision)))).await
        {
            // Another replica resealing first is as good.
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    store
        .update::<ClusterCaRecord, StoreError, _>(CA_KEY, |cur| {
            let Some(rec) = cur else { return Ok(None) };
            let plain = match sealed::text_bytes(&rec.key_pem) {
                Some(raw) if sealer.is_current(&raw) => return Ok(None),
                Some(_) => ca_key(store, &rec.key_pem)?,
                None => rec.key_pem.clone(),
            };
            tracing::info!(key = CA_KEY, "sealing the cluster CA key with the current key");
            Ok(Some(ClusterCaRecord { key_pem: seal_ca_key(store, &plain)?, ..rec.clone() }))
        })
        .await?;
    store
        .update::<SigningKeys, StoreError, _>(SIGNING_KEYS, |cur| {
            let Some(set) = cur else { return Ok(None) };
            if set.keys.iter().all(|k| sealer.is_current(&k.secret)) {
                return Ok(None);
            }
            let mut keys = Vec::with_capacity(set.keys.len());
            for k in &set.keys {
                if sealer.is_current(&k.secret) {
                    keys.push(k.clone());
                    continue;
                }
                let plain = match sealed::sealed_key_id(&k.secret) {
                    Some(_) => signing_secret(store, k)?,
                    None => k.secret.clone(),
                };
                keys.push(seal_signing_key(store, SigningKey { secret: plain, ..k.clone() })?);
            }
            tracing::info!(key = SIGNING_KEYS, "sealing the signing keys with the current key");
            Ok(Some(SigningKeys { keys }))
        })
        .await?;
    Ok(())
}

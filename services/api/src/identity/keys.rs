//! The access-token signing keys, kept in the store (`auth/signing_keys`) so
//! every replica signs and verifies with the same set, and rotated by an RPC.
//! Each replica holds them in a watch-fed cache: a rotation anywhere reaches
//! every replica within the watch latency, with no read per request.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use otherix_auth::jwt::Key;
use otherix_errors::ApiError;
use otherix_proto::otherix::store::v1::{SigningKey, SigningKeys};
use otherix_store::{Cache, Store, StoreError};
use tokio_util::sync::CancellationToken;

use crate::store_error::store_error;

/// The store key of the signing keys.
pub use otherix_store::keys::SIGNING_KEYS;

/// The signing keys of the cluster, from a watch-fed cache; the opened
/// (unsealed) set is kept per record revision.
pub struct KeyCache {
    store: Store,
    access_ttl: Duration,
    cache: Cache<SigningKeys>,
    opened: RwLock<Option<(i64, Arc<Vec<Key>>)>>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("KeyCache").field("revision", &self.cache.revision()).finish_non_exhaustive()
    }
}

fn new_key() -> SigningKey {
    SigningKey {
        id: uuid::Uuid::now_v7().simple().to_string(),
        secret: otherix_auth::token::random_bytes(32),
        created_at: Some(prost_types::Timestamp::from(SystemTime::now())),
        retire_after: None,
    }
}

/// The stored keys with their secrets opened (they are sealed at rest).
fn to_keys(store: &Store, set: &SigningKeys) -> Result<Vec<Key>, StoreError> {
    set.keys
        .iter()
        .map(|k| {
            let secret = crate::secrets_at_rest::signing_secret(store, k)?;
            Ok(Key { id: k.id.clone(), secret, retire_after: k.retire_after.map(|t| t.seconds) })
        })
        .collect()
}

impl KeyCache {
    /// A cache over the store, running until `cancel` fires.
    pub fn new(store: Store, access_ttl: Duration, stale_after: Duration, cancel: CancellationToken) -> KeyCache {
        let cache = store.cache::<SigningKeys>(SIGNING_KEYS, None, stale_after, cancel);
        KeyCache { store, access_ttl, cache, opened: RwLock::new(None) }
    }

    /// The underlying cache (for start-up readiness).
    pub fn cache(&self) -> &Cache<SigningKeys> {
        &self.cache
    }

    /// Creates the first key if the cluster has none (safe when replicas race).
    pub async fn ensure(&self) -> Result<(), StoreError> {
        self.store
            .update::<SigningKeys, StoreError, _>(SIGNING_KEYS, |cur| {
                if cur.is_some_and(|c| !c.keys.is_empty()) {
                    return Ok(None);
                }
                tracing::info!("creating the first access-token signing key");
                Ok(Some(SigningKeys { keys: vec![crate::secrets_at_rest::seal_signing_key(&self.store, new_key())?] }))
            })
            .await
            .map(|_| ())
    }

    /// The key set from memory (after this replica's own writes are in).
    /// With `fresh`, first catch up with the store's current revision (a
    /// token signed by a key minted a moment ago on another replica; such
    /// lookups share one revision read per 50 ms).
    pub async fn keys(&self, fresh: bool) -> Result<Arc<Vec<Key>>, ApiError> {
        if fresh {
            self.cache.sync().await.map_err(store_error)?;
        } else {
            self.cache.caught_up().await.map_err(store_error)?;
        }
        let Some(rec) = self.cache.get(SIGNING_KEYS).map_err(store_error)? else {
            return Ok(Arc::new(Vec::new()));
        };
        if let Some((rev, keys)) = self.opened.read().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref()
            && *rev == rec.mod_revision
        {
            return Ok(keys.clone());
        }
        let keys = Arc::new(to_keys(&self.store, &rec.value).map_err(store_error)?);
        *self.opened.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((rec.mod_revision, keys.clone()));
        Ok(keys)
    }

    /// The key new tokens are signed with.
    pub async fn current(&self) -> Result<Key, ApiError> {
        let keys = self.keys(false).await?;
        match keys.iter().find(|k| k.retire_after.is_none()) {
            Some(k) => Ok(k.clone()),
            None => {
                tracing::error!("no current signing key in the store");
                Err(ApiError::internal())
            }
        }
    }

    /// Makes a new key current. Older keys keep verifying until the tokens
    /// they signed expire, or stop at once with `revoke_existing`.
    pub async fn rotate(&self, revoke_existing: bool) -> Result<SigningKey, ApiError> {
        let now = SystemTime::now();
        let retire = prost_types::Timestamp::from(if revoke_existing { now } else { now + self.access_ttl });
        let fresh = new_key();
        let stored = crate::secrets_at_rest::seal_signing_key(&self.store, fresh.clone()).map_err(store_error)?;
        self.store
            .update::<SigningKeys, StoreError, _>(SIGNING_KEYS, move |cur| {
                let mut keys = vec![stored.clone()];
                for mut k in cur.cloned().unwrap_or_default().keys {
                    let past = k.retire_after.is_some_and(|t| t.seconds < retire.seconds - 24 * 3600);
                    if past {
                        continue; // long retired: nothing it signed is still valid
                    }
                    if k.retire_after.is_none_or(|t| t.seconds > retire.seconds) {
                        k.retire_after = Some(retire);
                    }
                    keys.push(k);
                }
                Ok(Some(SigningKeys { keys }))
            })
            .await
            .map_err(store_error)?;
        tracing::info!(key_id = %fresh.id, revoke_existing, "access-token signing key rotated");
        Ok(fresh)
    }
}

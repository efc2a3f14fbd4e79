//! The access-token signing keys, kept in the store (`auth/signing_keys`) so
//! every replica signs and verifies with the same set, and rotated by an RPC.

use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime};

use otherix_auth::jwt::Key;
use otherix_errors::ApiError;
use otherix_proto::otherix::store::v1::{SigningKey, SigningKeys};
use otherix_store::{Store, StoreError};

use crate::store_error::store_error;

/// The store key of the signing keys.
pub const SIGNING_KEYS: &str = "auth/signing_keys";

/// How long a replica trusts its cached key set before reading it again.
const CACHE_FOR: Duration = Duration::from_secs(5);

/// A cached copy of the signing keys.
#[derive(Debug)]
pub struct KeyCache {
    store: Store,
    access_ttl: Duration,
    cached: RwLock<Option<(Vec<Key>, Instant)>>,
}

fn new_key() -> SigningKey {
    SigningKey {
        id: uuid::Uuid::now_v7().simple().to_string(),
        secret: otherix_auth::token::random_bytes(32),
        created_at: Some(prost_types::Timestamp::from(SystemTime::now())),
        retire_after: None,
    }
}

fn to_keys(set: &SigningKeys) -> Vec<Key> {
    set.keys
        .iter()
        .map(|k| Key { id: k.id.clone(), secret: k.secret.clone(), retire_after: k.retire_after.map(|t| t.seconds) })
        .collect()
}

impl KeyCache {
    /// A cache over the store.
    pub fn new(store: Store, access_ttl: Duration) -> KeyCache {
        KeyCache { store, access_ttl, cached: RwLock::new(None) }
    }

    /// Creates the first key if the cluster has none (safe when replicas race).
    pub async fn ensure(&self) -> Result<(), StoreError> {
        self.store
            .update::<SigningKeys, StoreError, _>(SIGNING_KEYS, |cur| {
                if cur.is_some_and(|c| !c.keys.is_empty()) {
                    return Ok(None);
                }
                tracing::info!("creating the first access-token signing key");
                Ok(Some(SigningKeys { keys: vec![new_key()] }))
            })
            .await
            .map(|_| ())
    }

    /// The key set, from the cache or the store.
    pub async fn keys(&self, force: bool) -> Result<Vec<Key>, ApiError> {
        if !force
            && let Ok(guard) = self.cached.read()
            && let Some((keys, at)) = guard.as_ref()
            && at.elapsed() < CACHE_FOR
        {
            return Ok(keys.clone());
        }
        let set = self.store.get::<SigningKeys>(SIGNING_KEYS).await.map_err(store_error)?;
        let keys = set.map(|v| to_keys(&v.value)).unwrap_or_default();
        if let Ok(mut guard) = self.cached.write() {
            *guard = Some((keys.clone(), Instant::now()));
        }
        Ok(keys)
    }

    /// The key new tokens are signed with.
    pub async fn current(&self) -> Result<Key, ApiError> {
        let keys = self.keys(false).await?;
        match keys.into_iter().find(|k| k.retire_after.is_none()) {
            Some(k) => Ok(k),
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
        let stored = fresh.clone();
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
        self.keys(true).await?;
        tracing::info!(key_id = %fresh.id, revoke_existing, "access-token signing key rotated");
        Ok(fresh)
    }
}

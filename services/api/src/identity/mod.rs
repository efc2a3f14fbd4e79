//! Identity: users, sessions, API tokens and the access-token signing keys,
//! all kept in the store so every replica verifies every token.

pub mod api_tokens;
pub mod authn;
pub mod bootstrap;
pub mod keys;
pub mod service_auth;
pub mod service_users;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use otherix_auth::Role;
use otherix_auth::limiter::LoginLimiter;
use otherix_errors::ApiError;
use otherix_proto::otherix::store::v1::{ApiTokenRecord, SessionRecord, UserRecord};
use otherix_proto::v1::User;
use otherix_store::{Cache, Store, StoreError, Versioned, keys as store_keys};
use prost_types::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::config::AuthConfig;
use crate::store_error::store_error;

pub use authn::Caller;

/// How long a cache may be without its watch before it refuses to answer.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// Shared identity state: the store, watch-fed caches of users, sessions,
/// API tokens and signing keys (so authentication reads memory, not etcd),
/// and the login limiter.
#[derive(Debug)]
pub struct Identity {
    pub(crate) store: Store,
    pub(crate) keys: keys::KeyCache,
    pub(crate) users: Cache<UserRecord>,
    pub(crate) sessions: Cache<SessionRecord>,
    pub(crate) api_tokens: Cache<ApiTokenRecord>,
    pub(crate) limiter: LoginLimiter,
    pub(crate) access_ttl: Duration,
    pub(crate) refresh_ttl: Duration,
}

impl Identity {
    /// Identity over `store`, with settings from the config; its caches run
    /// until `cancel` fires.
    pub fn new(store: Store, cfg: &AuthConfig, cancel: CancellationToken) -> Identity {
        let rl = &cfg.login_rate_limit;
        let access_ttl = Duration::from_secs(cfg.access_token_ttl_seconds);
        Identity {
            keys: keys::KeyCache::new(store.clone(), access_ttl, STALE_AFTER, cancel.clone()),
            users: store.cache(store_keys::USERS, None, STALE_AFTER, cancel.clone()),
            sessions: store.cache(store_keys::SESSIONS, None, STALE_AFTER, cancel.clone()),
            api_tokens: store.cache(
                store_keys::API_TOKENS,
                Some(|t: &ApiTokenRecord| Some(t.hash.clone())),
                STALE_AFTER,
                cancel,
            ),
            store,
            limiter: LoginLimiter::new(
                rl.max_failures as usize,
                Duration::from_secs(rl.window_seconds),
                rl.max_keys as usize,
            ),
            access_ttl: Duration::from_secs(cfg.access_token_ttl_seconds),
            refresh_ttl: Duration::from_secs(cfg.refresh_token_ttl_seconds),
        }
    }

    /// Waits until every identity cache has listed once.
    pub async fn ready(&self) -> Result<(), StoreError> {
        self.keys.cache().ready().await?;
        self.users.ready().await?;
        self.sessions.ready().await?;
        self.api_tokens.ready().await
    }

    /// The current signing key set (for tools and benchmarks).
    pub async fn signing_keys(&self) -> Result<Vec<otherix_auth::jwt::Key>, ApiError> {
        Ok(self.keys.keys(false).await?.as_ref().clone())
    }

    /// A user by id from memory (after this replica's own writes are in); a
    /// miss is checked once against the store's current revision, for a
    /// user created a moment ago on another replica.
    pub async fn cached_user(&self, id: &str) -> Result<Option<Versioned<UserRecord>>, ApiError> {
        self.users.lookup(&user_key(id)).await.map_err(store_error)
    }

    /// A user by id.
    pub async fn user_by_id(&self, id: &str) -> Result<Option<Versioned<UserRecord>>, ApiError> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Ok(None);
        }
        self.store.get::<UserRecord>(&user_key(id)).await.map_err(store_error)
    }

    /// A user by the value of one of its guards (`uniq/users/username/<name>`).
    async fn user_by_guard(&self, guard: &str) -> Result<Option<Versioned<UserRecord>>, ApiError> {
        match self.store.get_raw(guard).await.map_err(store_error)? {
            Some(id) => self.user_by_id(&String::from_utf8_lossy(&id)).await,
            None => Ok(None),
        }
    }

    /// A user by username.
    pub async fn user_by_username(&self, username: &str) -> Result<Option<Versioned<UserRecord>>, ApiError> {
        if !otherix_auth::valid_username(username) {
            return Ok(None);
        }
        self.user_by_guard(&username_guard(username)).await
    }

    /// A user by email (case-insensitive).
    pub async fn user_by_email(&self, email: &str) -> Result<Option<Versioned<UserRecord>>, ApiError> {
        if !otherix_auth::valid_email(email) {
            return Ok(None);
        }
        self.user_by_guard(&email_guard(email)).await
    }

    /// A user by id or username; not_found when there is none.
    pub async fn resolve_user(&self, reference: &str) -> Result<Versioned<UserRecord>, ApiError> {
        let found = if uuid::Uuid::parse_str(reference).is_ok() {
            self.user_by_id(reference).await?
        } else {
            self.user_by_username(reference).await?
        };
        found.ok_or_else(|| user_not_found(reference))
    }

    /// Every user, by username.
    pub async fn list_users(&self) -> Result<Vec<Versioned<UserRecord>>, ApiError> {
        let mut users: Vec<_> =
            self.store.list::<UserRecord>(USERS).await.map_err(store_error)?.into_iter().map(|(_, v)| v).collect();
        users.sort_by(|a, b| a.value.username.cmp(&b.value.username));
        Ok(users)
    }
}

pub use otherix_store::keys::{USERS, email_guard, user as user_key, username_guard};

/// not_found for a user reference.
pub fn user_not_found(reference: &str) -> ApiError {
    ApiError::not_found("user", reference).with_detail("user", reference)
}

/// The role stored in a record (records are validated on write).
pub fn role_of(u: &UserRecord) -> Role {
    u.role.parse().unwrap_or(Role::Viewer)
}

/// The API view of a user (never the password hash).
pub fn user_view(u: &UserRecord) -> User {
    User {
        id: u.id.clone(),
        username: u.username.clone(),
        email: u.email.clone(),
        display_name: u.display_name.clone(),
        role: u.role.clone(),
        created_at: u.created_at,
        updated_at: u.updated_at,
        etag: String::new(),
    }
}

/// The API view of a user with its etag.
pub fn user_view_at(u: &Versioned<UserRecord>) -> User {
    User { etag: crate::etag::of(u.mod_revision), ..user_view(&u.value) }
}

/// Now as a protobuf timestamp.
pub fn now_ts() -> Timestamp {
    Timestamp::from(SystemTime::now())
}

/// Now in seconds since the epoch.
pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

/// A timestamp plus a duration.
pub fn ts_after(d: Duration) -> Timestamp {
    Timestamp::from(SystemTime::now() + d)
}

/// Whether a timestamp lies in the past.
pub fn is_past(t: &Timestamp) -> bool {
    SystemTime::try_from(*t).is_ok_and(|t| t <= SystemTime::now())
}

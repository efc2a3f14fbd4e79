//! Who is calling: bearer tokens (JWT access tokens or `otx_` API tokens)
//! turned into a [`Caller`].

use otherix_auth::jwt::{self, JwtError};
use otherix_auth::token::{self, API_TOKEN_PREFIX};
use otherix_auth::{Role, Scope};
use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::otherix::store::v1::{ApiTokenRecord, UserRecord};
use otherix_store::Expect;

use super::{Identity, is_past, now_secs, now_ts, role_of};
use crate::store_error::store_error;

/// How a caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A JWT of this session.
    Session(String),
    /// This API token.
    ApiToken(String),
}

/// An authenticated caller, put into each request's extensions.
#[derive(Clone)]
pub struct Caller {
    /// User id.
    pub user_id: String,
    /// Username.
    pub username: String,
    /// Current role (read from the user record on every call, so a demotion
    /// takes effect at once).
    pub role: Role,
    /// The credential used.
    pub credential: Credential,
    /// The user record as authentication read it (from memory, after this
    /// replica's own writes), for answers about the caller.
    pub user: std::sync::Arc<UserRecord>,
    /// The revision of that record (its etag).
    pub user_revision: i64,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The user record holds the password hash: never in Debug.
        f.debug_struct("Caller")
            .field("user_id", &self.user_id)
            .field("username", &self.username)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Caller {
    /// The scope at which the caller holds a permission.
    pub fn scope(&self, permission: &str) -> Option<Scope> {
        self.role.grant(permission)
    }

    /// Reads the caller a handler runs for; the authorization layer always sets it.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Caller, ApiError> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::new(ErrorCode::Unauthenticated, "authentication required"))
    }
}

fn unauthenticated(message: &str) -> ApiError {
    ApiError::new(ErrorCode::Unauthenticated, message)
}

fn revoked(message: &str) -> ApiError {
    ApiError::new(ErrorCode::TokenRevoked, message)
}

pub use otherix_store::keys::{api_token as api_token_key, api_token_hash_guard, session as session_key};

/// Whether a credential created at `created` predates the user's
/// `tokens_valid_after` (a password reset, role change or logout of every
/// session), compared to the nanosecond.
fn predates(created: Option<&prost_types::Timestamp>, valid_after: Option<&prost_types::Timestamp>) -> bool {
    let Some(after) = valid_after else { return false };
    let Some(created) = created else { return true };
    (created.seconds, created.nanos) < (after.seconds, after.nanos)
}

impl Identity {
    /// Authenticates the value of an `Authorization: Bearer` header.
    pub async fn authenticate(&self, bearer: &str) -> Result<Caller, ApiError> {
        if bearer.starts_with(API_TOKEN_PREFIX) {
            self.authenticate_api_token(bearer).await
        } else {
            self.authenticate_jwt(bearer).await
        }
    }

    async fn live_user(&self, id: &str) -> Result<otherix_store::Versioned<UserRecord>, ApiError> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(unauthenticated("invalid credentials"));
        }
        self.cached_user(id).await?.ok_or_else(|| unauthenticated("the token's user no longer exists"))
    }

    async fn authenticate_jwt(&self, token: &str) -> Result<Caller, ApiError> {
        let now = now_secs();
        let mut keys = self.keys.keys(false).await?;
        // A key minted a moment ago by a rotation on another replica: catch
        // up with the store once (these lookups are coalesced, so unknown
        // key ids cannot flood etcd).
        if jwt::key_id(token).is_some_and(|kid| !keys.iter().any(|k| k.id == kid)) {
            keys = self.keys.keys(true).await?;
        }
        let limits = jwt::Limits::for_ttl(self.access_ttl.as_secs());
        let claims = jwt::verify(token, &keys, now, &limits).map_err(|e| match e {
            JwtError::Expired => unauthenticated("the access token expired; refresh it or log in again"),
            JwtError::Retired => revoked("the access token was signed with a revoked key; log in again"),
            JwtError::Invalid | JwtError::OutOfBounds => unauthenticated("invalid access token"),
        })?;
        if uuid::Uuid::parse_str(&claims.sub).is_err() {
            return Err(unauthenticated("invalid access token"));
        }
        // The user and the session from memory.
        let otherix_store::Versioned { value: user, mod_revision: user_revision } = self.live_user(&claims.sub).await?;
        if user.tokens_valid_after.is_some_and(|t| claims.iat < t.seconds) {
            return Err(revoked("the session was logged out"));
        }
        // Logged in a moment ago on another replica: the lookup checks the store.
        let session = self.sessions.lookup(&session_key(&claims.sub, &claims.sid)).await.map_err(store_error)?;
        match session {
            // A login that raced a password reset or role change dies now,
            // not at its first refresh.
            Some(s) if predates(s.value.created_at.as_ref(), user.tokens_valid_after.as_ref()) => {
                return Err(revoked("the session predates the user's last credential change"));
            }
            Some(s) if s.value.revoked_at.is_none() => {}
            Some(_) => return Err(revoked("the session was logged out")),
            None => return Err(revoked("the session ended")),
        }
        Ok(Caller {
            role: role_of(&user),
            user_id: user.id.clone(),
            username: user.username.clone(),
            credential: Credential::Session(claims.sid),
            user: std::sync::Arc::new(user),
            user_revision,
        })
    }

    async fn authenticate_api_token(&self, plaintext: &str) -> Result<Caller, ApiError> {
        if !token::well_formed(plaintext, API_TOKEN_PREFIX) {
            return Err(unauthenticated("invalid API token"));
        }
        let hash = token::hash(plaintext);
        // Created a moment ago on another replica: the lookup checks the store.
        let rec = self.api_tokens.lookup_by_index(&hash).await.map_err(store_error)?;
        let Some(rec) = rec else { return Err(unauthenticated("invalid API token")) };
        // The index is by hash already; compare anyway so an index bug cannot
        // hand one token's identity to another.
        if rec.value.hash != hash {
            return Err(unauthenticated("invalid API token"));
        }
        if rec.value.revoked_at.is_some() {
            return Err(revoked("the API token was revoked"));
        }
        if rec.value.expires_at.as_ref().is_some_and(is_past) {
            return Err(unauthenticated("the API token expired"));
        }
        let otherix_store::Versioned { value: user, mod_revision: user_revision } =
            self.live_user(&rec.value.user_id).await?;
        if predates(rec.value.created_at.as_ref(), user.tokens_valid_after.as_ref()) {
            return Err(revoked("the API token predates the user's last credential change"));
        }
        let id = rec.value.id.clone();
        self.touch_api_token(rec);
        Ok(Caller {
            role: role_of(&user),
            user_id: user.id.clone(),
            username: user.username.clone(),
            credential: Credential::ApiToken(id),
            user: std::sync::Arc::new(user),
            user_revision,
        })
    }

    /// Records a token's use, at most once a minute and off the request path.
    fn touch_api_token(&self, rec: otherix_store::Versioned<ApiTokenRecord>) {
        let fresh = rec.value.last_used_at.is_some_and(|t| now_secs() - t.seconds < 60);
        if fresh {
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut next = rec.value;
            next.last_used_at = Some(now_ts());
            let key = api_token_key(&next.user_id, &next.id);
            // A conflict means another call recorded a use (or a revocation): fine.
            if let Err(e) = store.put(&key, &next, Expect::Revision(rec.mod_revision), &[]).await {
                tracing::debug!(error = %e, "last_used_at not recorded");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{Caller, Credential, predates};
    use prost_types::Timestamp;

    #[test]
    fn a_caller_never_shows_its_password_hash_or_credential() {
        let c = Caller {
            user_id: "u1".into(),
            username: "ann".into(),
            role: otherix_auth::Role::Viewer,
            credential: Credential::ApiToken("tok-id-secret".into()),
            user: std::sync::Arc::new(otherix_proto::otherix::store::v1::UserRecord {
                password_hash: "$argon2id$v=19$SECRET".into(),
                ..Default::default()
            }),
            user_revision: 1,
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("ann") && !shown.contains("SECRET") && !shown.contains("tok-id-secret"), "{shown}");
    }

    #[test]
    fn a_credential_of_the_same_second_but_earlier_predates_the_change() {
        let t = |seconds, nanos| Some(Timestamp { seconds, nanos });
        assert!(predates(t(100, 1).as_ref(), t(100, 2).as_ref()));
        assert!(!predates(t(100, 2).as_ref(), t(100, 2).as_ref()));
        assert!(!predates(t(101, 0).as_ref(), t(100, 999_999_999).as_ref()));
        assert!(!predates(t(1, 0).as_ref(), None));
        assert!(predates(None, t(1, 0).as_ref()));
    }
}

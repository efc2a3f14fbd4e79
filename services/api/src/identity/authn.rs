//! Who is calling: bearer tokens (JWT access tokens or `otx_` API tokens)
//! turned into a [`Caller`].

use otherix_auth::jwt::{self, JwtError};
use otherix_auth::token::{self, API_TOKEN_PREFIX};
use otherix_auth::{Role, Scope};
use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::otherix::store::v1::{ApiTokenRecord, SessionRecord, UserRecord};
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
#[derive(Debug, Clone)]
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

/// The store key of an API token.
pub fn api_token_key(user_id: &str, id: &str) -> String {
    format!("api_tokens/{user_id}/{id}")
}

/// The guard mapping an API token's hash to `<user_id>/<id>`.
pub fn api_token_hash_guard(hash: &str) -> String {
    format!("uniq/api_tokens/hash/{hash}")
}

/// The store key of a session.
pub fn session_key(user_id: &str, id: &str) -> String {
    format!("sessions/{user_id}/{id}")
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

    async fn live_user(&self, id: &str) -> Result<UserRecord, ApiError> {
        self.user_by_id(id).await?.map(|v| v.value).ok_or_else(|| unauthenticated("the token's user no longer exists"))
    }

    async fn authenticate_jwt(&self, token: &str) -> Result<Caller, ApiError> {
        let now = now_secs();
        let mut keys = self.keys.keys(false).await?;
        // A key minted by a rotation on another replica: reload once.
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
        // The user and the session in one round trip.
        let (user, session) = self
            .store
            .get_two::<UserRecord, SessionRecord>(&super::user_key(&claims.sub), &session_key(&claims.sub, &claims.sid))
            .await
            .map_err(store_error)?;
        let user = user.map(|v| v.value).ok_or_else(|| unauthenticated("the token's user no longer exists"))?;
        if user.tokens_valid_after.is_some_and(|t| claims.iat < t.seconds) {
            return Err(revoked("the session was logged out"));
        }
        match session {
            Some(s) if s.value.revoked_at.is_none() => {}
            Some(_) => return Err(revoked("the session was logged out")),
            None => return Err(revoked("the session ended")),
        }
        Ok(Caller {
            role: role_of(&user),
            user_id: user.id,
            username: user.username,
            credential: Credential::Session(claims.sid),
        })
    }

    async fn authenticate_api_token(&self, plaintext: &str) -> Result<Caller, ApiError> {
        if !token::well_formed(plaintext, API_TOKEN_PREFIX) {
            return Err(unauthenticated("invalid API token"));
        }
        let hash = token::hash(plaintext);
        let Some(loc) = self.store.get_raw(&api_token_hash_guard(&hash)).await.map_err(store_error)? else {
            return Err(unauthenticated("invalid API token"));
        };
        let loc = String::from_utf8_lossy(&loc).into_owned();
        let Some((user_id, id)) = loc.split_once('/') else { return Err(ApiError::internal()) };
        let Some(rec) = self.store.get::<ApiTokenRecord>(&api_token_key(user_id, id)).await.map_err(store_error)?
        else {
            return Err(unauthenticated("invalid API token"));
        };
        if rec.value.hash != hash {
            return Err(unauthenticated("invalid API token"));
        }
        if rec.value.revoked_at.is_some() {
            return Err(revoked("the API token was revoked"));
        }
        if rec.value.expires_at.as_ref().is_some_and(is_past) {
            return Err(unauthenticated("the API token expired"));
        }
        let user = self.live_user(user_id).await?;
        self.touch_api_token(rec);
        Ok(Caller {
            role: role_of(&user),
            user_id: user.id,
            username: user.username,
            credential: Credential::ApiToken(id.to_owned()),
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

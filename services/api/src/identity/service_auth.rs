//! AuthService: login, refresh, logout, signing-key rotation.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use otherix_auth::jwt::{self, Claims};
use otherix_auth::limiter::Outcome;
use otherix_auth::password::{HashPool, PoolBusy};
use otherix_auth::token::{self, REFRESH_TOKEN_PREFIX};
use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::otherix::store::v1::{RefreshTokenIndex, SessionRecord, UserRecord};
use otherix_proto::v1::auth_service_server::AuthService;
use otherix_proto::v1::{
    LoginRequest, LoginResponse, LogoutRequest, LogoutResponse, RefreshRequest, RotateSigningKeyRequest,
    RotateSigningKeyResponse,
};
use otherix_store::{Batch, Expect, StoreError, keys};
use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use super::{Caller, Identity, is_past, now_secs, now_ts, ts_after, user_view};
use crate::store_error::store_error;

fn session_key(user_id: &str, id: &str) -> String {
    keys::session(user_id, id)
}

fn user_key(id: &str) -> String {
    keys::user(id)
}

/// 429 for a full hashing pool: the password was not checked.
fn busy(e: PoolBusy) -> ApiError {
    ApiError::new(ErrorCode::RateLimited, "too many password checks at once; retry shortly")
        .with_detail("retry_after_seconds", e.retry_after.as_secs().max(1))
}

/// Hashes a password on the process's hashing pool (bounded threads and
/// memory; a full pool answers 429).
pub(crate) async fn hash_password(password: String) -> Result<String, ApiError> {
    HashPool::global().hash(password).await.map_err(busy)?.map_err(|e| {
        tracing::error!(error = %e, "password hashing failed");
        ApiError::internal()
    })
}

/// Verifies a password on the hashing pool; a `None` hash spends the same
/// time and fails. A full pool answers 429.
pub(crate) async fn verify_password(password: String, phc: Option<String>) -> Result<bool, ApiError> {
    HashPool::global().verify(password, phc).await.map_err(busy)
}

/// The limiter key of a source address. IPv6 clients usually hold a whole
/// /64, so they are counted by it.
fn source_key(addr: Option<IpAddr>) -> String {
    match addr.map(|a| a.to_canonical()) {
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Some(v4) => format!("ip:{v4}"),
        None => "ip:unknown".into(),
    }
}

/// Whether `t` lies at or before `bound` (nanosecond precision).
pub(crate) fn not_after(t: Option<&Timestamp>, bound: Option<&Timestamp>) -> bool {
    match (t, bound) {
        (Some(t), Some(b)) => (t.seconds, t.nanos) <= (b.seconds, b.nanos),
        // No creation time on record: older than any bound.
        (None, Some(_)) => true,
        (_, None) => false,
    }
}

/// Serves AuthService.
#[derive(Debug, Clone)]
pub struct AuthServiceImpl {
    id: Arc<Identity>,
}

impl AuthServiceImpl {
    /// A service over the identity state.
    pub fn new(id: Arc<Identity>) -> Self {
        AuthServiceImpl { id }
    }
}

fn invalid_refresh() -> ApiError {
    ApiError::new(ErrorCode::Unauthenticated, "invalid or expired refresh token")
}

impl Identity {
    /// Opens a session for a user: a refresh token in the store, an access
    /// token signed now. `began` is when the login read the user: a reset
    /// committed after that instant ends this session too.
    async fn open_session(&self, user: &UserRecord, began: Timestamp) -> Result<LoginResponse, ApiError> {
        let session_id = uuid::Uuid::now_v7().to_string();
        let refresh = token::generate(REFRESH_TOKEN_PREFIX);
        let hash = token::hash(&refresh);
        let session = SessionRecord {
            id: session_id.clone(),
            user_id: user.id.clone(),
            created_at: Some(began),
            expires_at: Some(ts_after(self.refresh_ttl)),
            current_token_hash: hash.clone(),
            revoked_at: None,
        };
        self.write_session(&session, &hash, None).await?;
        self.tokens_for(user, &session_id, refresh).await
    }

    /// Writes a session and the index entry of its current refresh token,
    /// both under a lease that ends with the session.
    async fn write_session(&self, s: &SessionRecord, hash: &str, expect: Option<Expect>) -> Result<(), ApiError> {
        let lease = self.store.grant_lease(self.refresh_ttl).await.map_err(store_error)?;
        let index =
            RefreshTokenIndex { user_id: s.user_id.clone(), session_id: s.id.clone(), expires_at: s.expires_at };
        let batch = Batch::new()
            .put_leased(
                &session_key(&s.user_id, &s.id),
                prost::Message::encode_to_vec(s),
                lease,
                expect.or(Some(Expect::Absent)),
            )
            .put_leased(&keys::refresh_token(hash), prost::Message::encode_to_vec(&index), lease, Some(Expect::Absent));
        self.store.commit(batch).await.map(|_| ()).map_err(store_error)
    }

    async fn tokens_for(
        &self,
        user: &UserRecord,
        session_id: &str,
        refresh: String,
    ) -> Result<LoginResponse, ApiError> {
        let key = self.keys.current().await?;
        let iat = now_secs();
        let ttl = self.access_ttl.as_secs() as i64;
        let claims = Claims { sub: user.id.clone(), sid: session_id.to_owned(), iat, exp: iat + ttl };
        Ok(LoginResponse {
            access_token: jwt::sign(&claims, &key),
            refresh_token: refresh,
            token_type: "Bearer".into(),
            expires_in: ttl,
            user: Some(user_view(user)),
        })
    }

    /// Marks a session revoked (idempotent).
    pub(crate) async fn revoke_session(&self, user_id: &str, session_id: &str) -> Result<bool, ApiError> {
        let key = session_key(user_id, session_id);
        let before = self.store.get::<SessionRecord>(&key).await.map_err(store_error)?;
        if before.as_ref().is_none_or(|s| s.value.revoked_at.is_some()) {
            return Ok(false);
        }
        self.store
            .update::<SessionRecord, StoreError, _>(&key, |cur| {
                Ok(cur
                    .filter(|s| s.revoked_at.is_none())
                    .map(|s| SessionRecord { revoked_at: Some(now_ts()), ..s.clone() }))
            })
            .await
            .map_err(store_error)?;
        Ok(true)
    }
}

#[tonic::async_trait]
impl AuthService for AuthServiceImpl {
    #[tracing::instrument(skip_all)]
    async fn login(&self, req: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        let addr = source_key(req.remote_addr().map(|a| a.ip()));
        let r = req.into_inner();
        let (ident, by_email) = match (r.username.trim(), r.email.trim()) {
            ("", "") => return Err(ApiError::invalid_field("username", "give a username or an email").into()),
            (u, "") => (u.to_ascii_lowercase(), false),
            ("", e) => (e.to_ascii_lowercase(), true),
            _ => return Err(ApiError::invalid_field("email", "give a username or an email, not both").into()),
        };
        if r.password.is_empty() {
            return Err(ApiError::invalid_field("password", "the password is required").into());
        }
        let began = now_ts();
        let user =
            if by_email { self.id.user_by_email(&ident).await? } else { self.id.user_by_username(&ident).await? };
        // One bucket per account, whichever name it was reached by; an
        // unknown identifier gets its own (so guessing names is limited too).
        let account = match &user {
            Some(u) => format!("u:{}", u.value.id),
            None => format!("unknown:{ident}"),
        };
        // The identifier is never logged: a password typed into it would land
        // in the log. A known account is named by its id.
        let user_id = user.as_ref().map(|u| u.value.id.clone()).unwrap_or_default();
        // Reserved before the password is checked, so parallel attempts count.
        let reservation = match self.id.limiter.reserve(&[(account.as_str(), 1), (addr.as_str(), 5)], Instant::now()) {
            Ok(r) => r,
            Err(wait) => {
                tracing::warn!(source = %addr, %user_id, "login refused: too many failed attempts");
                return Err(ApiError::new(ErrorCode::RateLimited, "too many failed logins; try again later")
                    .with_detail("retry_after_seconds", wait.as_secs().max(1))
                    .into());
            }
        };
        let ok = match verify_password(r.password, user.as_ref().map(|u| u.value.password_hash.clone())).await {
            Ok(ok) => ok,
            Err(e) => {
                self.id.limiter.settle(reservation, Outcome::NotTried);
                tracing::warn!(source = %addr, "login refused: password hashing is saturated");
                return Err(e.into());
            }
        };
        let Some(user) = user.filter(|_| ok) else {
            self.id.limiter.settle(reservation, Outcome::Failed);
            tracing::info!(source = %addr, %user_id, "login failed");
            return Err(ApiError::new(ErrorCode::InvalidCredentials, "wrong username, email or password").into());
        };
        self.id.limiter.settle(reservation, Outcome::Succeeded);
        tracing::info!(user = %user.value.username, source = %addr, "login");
        Ok(Response::new(self.id.open_session(&user.value, began).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn refresh(&self, req: Request<RefreshRequest>) -> Result<Response<LoginResponse>, Status> {
        let presented = req.into_inner().refresh_token;
        if presented.is_empty() {
            return Err(ApiError::invalid_field("refresh_token", "the refresh_token is required").into());
        }
        if !token::well_formed(&presented, REFRESH_TOKEN_PREFIX) {
            return Err(invalid_refresh().into());
        }
        let hash = token::hash(&presented);
        let index = self
            .id
            .store
            .get::<RefreshTokenIndex>(&keys::refresh_token(&hash))
            .await
            .map_err(store_error)?
            .ok_or_else(invalid_refresh)?
            .value;
        let skey = session_key(&index.user_id, &index.session_id);
        let session =
            self.id.store.get::<SessionRecord>(&skey).await.map_err(store_error)?.ok_or_else(invalid_refresh)?;
        if session.value.revoked_at.is_some() {
            return Err(ApiError::new(ErrorCode::TokenRevoked, "the session was revoked; log in again").into());
        }
        if session.value.current_token_hash != hash {
            // A spent token came back: someone holds a copy. End the session.
            self.id.revoke_session(&index.user_id, &index.session_id).await?;
            tracing::warn!(user_id = %index.user_id, session = %index.session_id, "refresh token reuse; session revoked");
            return Err(
                ApiError::new(ErrorCode::TokenRevoked, "refresh token reuse detected; the session is revoked").into()
            );
        }
        if session.value.expires_at.as_ref().is_some_and(is_past) {
            return Err(invalid_refresh().into());
        }
        let user = self.id.user_by_id(&index.user_id).await?.ok_or_else(invalid_refresh)?;
        // A password reset, a role change or "log out everywhere" after the
        // session began ends it, even if its record was not yet removed.
        if not_after(session.value.created_at.as_ref(), user.value.tokens_valid_after.as_ref()) {
            return Err(ApiError::new(ErrorCode::TokenRevoked, "the session was ended; log in again").into());
        }
        let refresh = token::generate(REFRESH_TOKEN_PREFIX);
        let new_hash = token::hash(&refresh);
        let next = SessionRecord {
            current_token_hash: new_hash.clone(),
            expires_at: Some(ts_after(self.id.refresh_ttl)),
            ..session.value.clone()
        };
        match self.id.write_session(&next, &new_hash, Some(Expect::Revision(session.mod_revision))).await {
            Ok(()) => {}
            Err(e) if e.code == ErrorCode::Conflict => {
                // Two refreshes with the same token raced: the loser is a reuse.
                self.id.revoke_session(&index.user_id, &index.session_id).await?;
                return Err(ApiError::new(
                    ErrorCode::TokenRevoked,
                    "refresh token reuse detected; the session is revoked",
                )
                .into());
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Response::new(self.id.tokens_for(&user.value, &next.id, refresh).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn logout(&self, req: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let mut revoked = 0;
        if r.all_sessions {
            let sessions =
                self.id.store.list::<SessionRecord>(&keys::sessions_of(&caller.user_id)).await.map_err(store_error)?;
            for (_, s) in sessions {
                if self.id.revoke_session(&caller.user_id, &s.value.id).await? {
                    revoked += 1;
                }
            }
            // Access tokens already issued stop working too.
            self.id
                .store
                .update::<UserRecord, StoreError, _>(&user_key(&caller.user_id), |cur| {
                    Ok(cur.map(|u| UserRecord { tokens_valid_after: Some(now_ts()), ..u.clone() }))
                })
                .await
                .map_err(store_error)?;
            tracing::info!(user = %caller.username, revoked, "logged out of every session");
        } else if !r.refresh_token.is_empty() {
            let not_found = || ApiError::new(ErrorCode::NotFound, "no such session").with_detail("kind", "session");
            if !token::well_formed(&r.refresh_token, REFRESH_TOKEN_PREFIX) {
                return Err(not_found().into());
            }
            let index = self
                .id
                .store
                .get::<RefreshTokenIndex>(&keys::refresh_token(&token::hash(&r.refresh_token)))
                .await
                .map_err(store_error)?
                .filter(|i| i.value.user_id == caller.user_id)
                .ok_or_else(not_found)?;
            if self.id.revoke_session(&caller.user_id, &index.value.session_id).await? {
                revoked = 1;
            }
        } else {
            return Err(
                ApiError::invalid_field("refresh_token", "give the session's refresh_token, or all_sessions").into()
            );
        }
        Ok(Response::new(LogoutResponse { revoked_sessions: revoked }))
    }

    #[tracing::instrument(skip_all)]
    async fn rotate_signing_key(
        &self,
        req: Request<RotateSigningKeyRequest>,
    ) -> Result<Response<RotateSigningKeyResponse>, Status> {
        let caller = Caller::of(&req)?;
        let key = self.id.keys.rotate(req.into_inner().revoke_existing).await?;
        tracing::info!(by = %caller.username, key_id = %key.id, "signing key rotated");
        Ok(Response::new(RotateSigningKeyResponse { key_id: key.id, rotated_at: key.created_at }))
    }
}

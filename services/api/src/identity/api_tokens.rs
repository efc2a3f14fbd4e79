//! ApiTokenService: personal API tokens. Only the sha256 of a token is
//! stored; its plaintext is returned once.

use std::sync::Arc;

use otherix_auth::Scope;
use otherix_auth::token::{self, API_TOKEN_PREFIX};
use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::otherix::store::v1::{ApiTokenRecord, UserRecord};
use otherix_proto::v1::api_token_service_server::ApiTokenService;
use otherix_proto::v1::{
    ApiToken, CreateApiTokenRequest, CreateApiTokenResponse, ListApiTokensRequest, ListApiTokensResponse,
    RevokeApiTokenRequest,
};
use otherix_store::{Batch, Expect, StoreError, keys};
use tonic::{Request, Response, Status};

use super::{Caller, Identity, is_past, now_ts, user_not_found};
use crate::paging::{self, Order};
use crate::store_error::store_error;

const PERMISSION: &str = "api_token:manage";

/// Live API tokens a user may hold unless configured otherwise
/// (`auth.max_api_tokens_per_user`).
pub const DEFAULT_MAX_PER_USER: u32 = 50;

/// Serves ApiTokenService.
#[derive(Debug, Clone)]
pub struct ApiTokenServiceImpl {
    id: Arc<Identity>,
    max_per_user: usize,
}

impl ApiTokenServiceImpl {
    /// A service over the identity state.
    pub fn new(id: Arc<Identity>) -> Self {
        ApiTokenServiceImpl { id, max_per_user: DEFAULT_MAX_PER_USER as usize }
    }

    /// The same, with at most `max` live (neither revoked nor expired) tokens per user.
    pub fn with_max_per_user(mut self, max: u32) -> Self {
        self.max_per_user = max.max(1) as usize;
        self
    }

    /// The user whose tokens the call is about. Other users' tokens need the
    /// permission at `any` scope; without it they do not exist (404).
    async fn target(&self, caller: &Caller, reference: &str) -> Result<UserRecord, ApiError> {
        if reference.is_empty() || reference == "me" || reference == caller.user_id || reference == caller.username {
            return Ok(self.id.resolve_user(&caller.user_id).await?.value);
        }
        if caller.scope(PERMISSION) != Some(Scope::Any) {
            return Err(user_not_found(reference));
        }
        Ok(self.id.resolve_user(reference).await?.value)
    }
}

fn view(t: &ApiTokenRecord) -> ApiToken {
    ApiToken {
        id: t.id.clone(),
        user_id: t.user_id.clone(),
        name: t.name.clone(),
        description: t.description.clone(),
        prefix: t.prefix.clone(),
        created_at: t.created_at,
        expires_at: t.expires_at,
        last_used_at: t.last_used_at,
        revoked_at: t.revoked_at,
    }
}

#[tonic::async_trait]
impl ApiTokenService for ApiTokenServiceImpl {
    #[tracing::instrument(skip_all, fields(user = %req.get_ref().user, name = %req.get_ref().name))]
    async fn create_api_token(
        &self,
        req: Request<CreateApiTokenRequest>,
    ) -> Result<Response<CreateApiTokenResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let user = self.target(&caller, &r.user).await?;
        let name = r.name.trim();
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(ApiError::invalid_field("name", "a token name has 1 to 100 printable characters").into());
        }
        if r.description.chars().count() > 1000 {
            return Err(ApiError::invalid_field("description", "a description has at most 1000 characters").into());
        }
        if r.expires_at.as_ref().is_some_and(is_past) {
            return Err(ApiError::invalid_field("expires_at", "expires_at must be in the future").into());
        }
        // A cap on live tokens, so one account cannot fill the store or
        // hide a planted token among thousands. Counted before the write:
        // concurrent creates may pass it by the few in flight.
        let live = self
            .id
            .store
            .list::<ApiTokenRecord>(&keys::api_tokens_of(&user.id))
            .await
            .map_err(store_error)?
            .iter()
            .filter(|(_, t)| t.value.revoked_at.is_none() && !t.value.expires_at.as_ref().is_some_and(is_past))
            .count();
        if live >= self.max_per_user {
            return Err(ApiError::new(
                ErrorCode::ResourceInUse,
                format!(
                    "user {} holds {live} API tokens, the most allowed (auth.max_api_tokens_per_user); revoke one first",
                    user.username
                ),
            )
            .with_detail("limit", self.max_per_user as u64)
            .into());
        }
        let plaintext = token::generate(API_TOKEN_PREFIX);
        let record = ApiTokenRecord {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: user.id.clone(),
            name: name.to_owned(),
            description: r.description,
            prefix: token::shown_prefix(&plaintext),
            hash: token::hash(&plaintext),
            created_at: Some(now_ts()),
            expires_at: r.expires_at,
            last_used_at: None,
            revoked_at: None,
        };
        let batch = Batch::new().put(&keys::api_token(&user.id, &record.id), &record, Some(Expect::Absent)).put_raw(
            &keys::api_token_hash_guard(&record.hash),
            format!("{}/{}", user.id, record.id).into_bytes(),
            Some(Expect::Absent),
        );
        self.id.store.commit(batch).await.map_err(store_error)?;
        tracing::info!(token = %record.id, owner = %user.username, by = %caller.username, "API token created");
        Ok(Response::new(CreateApiTokenResponse { plaintext_token: plaintext, api_token: Some(view(&record)) }))
    }

    #[tracing::instrument(skip_all, fields(user = %req.get_ref().user))]
    async fn list_api_tokens(
        &self,
        req: Request<ListApiTokensRequest>,
    ) -> Result<Response<ListApiTokensResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let user = self.target(&caller, &r.user).await?;
        let mut tokens: Vec<ApiTokenRecord> = self
            .id
            .store
            .list::<ApiTokenRecord>(&keys::api_tokens_of(&user.id))
            .await
            .map_err(store_error)?
            .into_iter()
            .map(|(_, v)| v.value)
            .filter(|t| r.include_revoked || (t.revoked_at.is_none() && !t.expires_at.as_ref().is_some_and(is_past)))
            .collect();
        // uuid v7 ids sort by creation time.
        tokens.sort_by(|a, b| b.id.cmp(&a.id));
        let query = paging::query(&[&user.id, if r.include_revoked { "all" } else { "usable" }]);
        let p = paging::page(tokens, Order::Desc, |t| t.id.clone(), r.page_size, &r.page_token, &query)?;
        Ok(Response::new(ListApiTokensResponse {
            api_tokens: p.items.iter().map(view).collect(),
            next_page_token: p.next_page_token,
            total_size: p.total_size,
        }))
    }

    #[tracing::instrument(skip_all, fields(user = %req.get_ref().user, token = %req.get_ref().token_id))]
    async fn revoke_api_token(&self, req: Request<RevokeApiTokenRequest>) -> Result<Response<ApiToken>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let user = self.target(&caller, &r.user).await?;
        let not_found = || ApiError::not_found("API token", &r.token_id);
        if uuid::Uuid::parse_str(&r.token_id).is_err() {
            return Err(not_found().into());
        }
        let key = keys::api_token(&user.id, &r.token_id);
        let stored = self
            .id
            .store
            .update::<ApiTokenRecord, StoreError, _>(&key, |cur| {
                Ok(cur
                    .filter(|t| t.revoked_at.is_none())
                    .map(|t| ApiTokenRecord { revoked_at: Some(now_ts()), ..t.clone() }))
            })
            .await
            .map_err(store_error)?
            .ok_or_else(not_found)?;
        tracing::info!(token = %r.token_id, by = %caller.username, "API token revoked");
        Ok(Response::new(view(&stored.value)))
    }
}

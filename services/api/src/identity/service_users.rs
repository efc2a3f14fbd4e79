//! UserService: users and their roles.

use std::sync::Arc;

use otherix_auth::Role;
use otherix_auth::password::check_policy;
use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::otherix::store::v1::{ApiTokenRecord, SessionRecord, UserRecord};
use otherix_proto::v1::user_service_server::UserService;
use otherix_proto::v1::{
    CreateUserRequest, DeleteUserRequest, DeleteUserResponse, GetMeRequest, GetUserRequest, ListUsersRequest,
    ListUsersResponse, UpdateMeRequest, UpdateUserRequest, User,
};
use otherix_store::{Batch, Expect, StoreError};
use tonic::{Request, Response, Status};

use super::authn::{api_token_hash_guard, api_token_key, session_key};
use super::{
    Caller, Identity, email_guard, hash_password, now_ts, role_of, user_key, user_view, username_guard, verify_password,
};
use crate::store_error::store_error;

/// Serves UserService.
#[derive(Debug, Clone)]
pub struct UserServiceImpl {
    id: Arc<Identity>,
}

impl UserServiceImpl {
    /// A service over the identity state.
    pub fn new(id: Arc<Identity>) -> Self {
        UserServiceImpl { id }
    }
}

fn check_display_name(name: &str) -> Result<(), ApiError> {
    if name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid_field("display_name", "a display name has at most 100 printable characters"));
    }
    Ok(())
}

fn check_email(email: &str) -> Result<(), ApiError> {
    if !email.is_empty() && !otherix_auth::valid_email(email) {
        return Err(ApiError::invalid_field("email", format!("{email:?} is not an email address")));
    }
    Ok(())
}

fn parse_role(role: &str) -> Result<Role, ApiError> {
    role.parse::<Role>().map_err(|m| ApiError::invalid_field("role", m))
}

fn taken(field: &str, value: &str) -> ApiError {
    ApiError::new(ErrorCode::Conflict, format!("{field} {value:?} is taken")).with_detail("field", field)
}

/// Maps a failed guarded write to the field whose guard exists.
fn guard_conflict(e: StoreError, username: &str, email: &str) -> ApiError {
    match e {
        StoreError::AlreadyExists { key } if key.starts_with("uniq/users/username/") => taken("username", username),
        StoreError::AlreadyExists { key } if key.starts_with("uniq/users/email/") => taken("email", email),
        other => store_error(other),
    }
}

impl Identity {
    /// Creates a user record with its guards.
    pub(crate) async fn create_user(
        &self,
        username: &str,
        password: &str,
        role: Role,
        email: &str,
        display_name: &str,
    ) -> Result<UserRecord, ApiError> {
        if !otherix_auth::valid_username(username) {
            return Err(ApiError::invalid_field(
                "username",
                format!("{username:?} is not a valid username (3 to 32 of a-z, 0-9 and '-')"),
            ));
        }
        check_policy(password).map_err(|m| ApiError::invalid_field("password", m))?;
        check_email(email)?;
        check_display_name(display_name)?;
        let now = now_ts();
        let user = UserRecord {
            id: uuid::Uuid::now_v7().to_string(),
            username: username.to_owned(),
            email: email.to_owned(),
            display_name: display_name.to_owned(),
            role: role.as_str().to_owned(),
            password_hash: hash_password(password.to_owned()).await?,
            created_at: Some(now),
            updated_at: Some(now),
            tokens_valid_after: None,
        };
        let mut batch = Batch::new().put(&user_key(&user.id), &user, Some(Expect::Absent)).put_raw(
            &username_guard(username),
            user.id.clone().into_bytes(),
            Some(Expect::Absent),
        );
        if !email.is_empty() {
            batch = batch.put_raw(&email_guard(email), user.id.clone().into_bytes(), Some(Expect::Absent));
        }
        self.store.commit(batch).await.map_err(|e| guard_conflict(e, username, email))?;
        tracing::info!(user = %user.username, role = %user.role, "user created");
        Ok(user)
    }

    /// Applies changes to a user with compare-and-swap, moving the email guard when it changes.
    async fn change_user(
        &self,
        current: otherix_store::Versioned<UserRecord>,
        next: UserRecord,
    ) -> Result<UserRecord, ApiError> {
        let mut batch = Batch::new().put(&user_key(&next.id), &next, Some(Expect::Revision(current.mod_revision)));
        let old_email = current.value.email.to_ascii_lowercase();
        let new_email = next.email.to_ascii_lowercase();
        if old_email != new_email {
            if !old_email.is_empty() {
                batch = batch.delete(&email_guard(&old_email), None);
            }
            if !new_email.is_empty() {
                batch = batch.put_raw(&email_guard(&new_email), next.id.clone().into_bytes(), Some(Expect::Absent));
            }
        }
        self.store.commit(batch).await.map_err(|e| guard_conflict(e, &next.username, &next.email))?;
        Ok(next)
    }
}

#[tonic::async_trait]
impl UserService for UserServiceImpl {
    #[tracing::instrument(skip_all, fields(username = %req.get_ref().username))]
    async fn create_user(&self, req: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        let r = req.into_inner();
        let role = parse_role(&r.role)?;
        let user = self.id.create_user(&r.username, &r.password, role, r.email.trim(), r.display_name.trim()).await?;
        Ok(Response::new(user_view(&user)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_users(&self, _req: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        let users = self.id.list_users().await?.iter().map(|u| user_view(&u.value)).collect();
        Ok(Response::new(ListUsersResponse { users }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_me(&self, req: Request<GetMeRequest>) -> Result<Response<User>, Status> {
        let caller = Caller::of(&req)?;
        let user = self.id.resolve_user(&caller.user_id).await?;
        Ok(Response::new(user_view(&user.value)))
    }

    #[tracing::instrument(skip_all)]
    async fn update_me(&self, req: Request<UpdateMeRequest>) -> Result<Response<User>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        if r.role.is_some() {
            return Err(ApiError::new(ErrorCode::PermissionDenied, "nobody changes their own role")
                .with_detail("forbidden_fields", vec!["role"])
                .into());
        }
        let current = self.id.resolve_user(&caller.user_id).await?;
        let mut next = current.value.clone();
        if let Some(name) = r.display_name {
            check_display_name(name.trim())?;
            next.display_name = name.trim().to_owned();
        }
        if let Some(password) = r.password {
            check_policy(&password).map_err(|m| ApiError::invalid_field("password", m))?;
            if !verify_password(r.current_password, Some(current.value.password_hash.clone())).await {
                return Err(ApiError::invalid_field("current_password", "the current password is wrong").into());
            }
            next.password_hash = hash_password(password).await?;
        }
        next.updated_at = Some(now_ts());
        Ok(Response::new(user_view(&self.id.change_user(current, next).await?)))
    }

    #[tracing::instrument(skip_all, fields(user = %req.get_ref().user))]
    async fn get_user(&self, req: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let user = self.id.resolve_user(&req.get_ref().user).await?;
        Ok(Response::new(user_view(&user.value)))
    }

    #[tracing::instrument(skip_all, fields(user = %req.get_ref().user))]
    async fn update_user(&self, req: Request<UpdateUserRequest>) -> Result<Response<User>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let current = self.id.resolve_user(&r.user).await?;
        let mut next = current.value.clone();
        if let Some(role) = &r.role {
            let role = parse_role(role)?;
            if current.value.id == caller.user_id && role != caller.role {
                return Err(ApiError::new(ErrorCode::PermissionDenied, "nobody changes their own role")
                    .with_detail("forbidden_fields", vec!["role"])
                    .into());
            }
            next.role = role.as_str().to_owned();
        }
        if let Some(name) = r.display_name {
            check_display_name(name.trim())?;
            next.display_name = name.trim().to_owned();
        }
        if let Some(email) = r.email {
            check_email(email.trim())?;
            next.email = email.trim().to_owned();
        }
        if let Some(password) = r.password {
            check_policy(&password).map_err(|m| ApiError::invalid_field("password", m))?;
            next.password_hash = hash_password(password).await?;
            // A reset password ends the user's sessions.
            next.tokens_valid_after = Some(now_ts());
        }
        next.updated_at = Some(now_ts());
        let changed = self.id.change_user(current, next).await?;
        tracing::info!(user = %changed.username, role = %changed.role, by = %caller.username, "user updated");
        Ok(Response::new(user_view(&changed)))
    }

    #[tracing::instrument(skip_all, fields(user = %req.get_ref().user))]
    async fn delete_user(&self, req: Request<DeleteUserRequest>) -> Result<Response<DeleteUserResponse>, Status> {
        let caller = Caller::of(&req)?;
        let target = self.id.resolve_user(&req.get_ref().user).await?;
        if target.value.id == caller.user_id {
            return Err(ApiError::new(ErrorCode::Conflict, "you cannot delete yourself").into());
        }
        if role_of(&target.value) == Role::Admin {
            let admins = self.id.list_users().await?.iter().filter(|u| role_of(&u.value) == Role::Admin).count();
            if admins <= 1 {
                return Err(ApiError::new(ErrorCode::Conflict, "the last admin cannot be deleted").into());
            }
        }
        let u = &target.value;
        let mut batch = Batch::new()
            .delete(&user_key(&u.id), Some(Expect::Revision(target.mod_revision)))
            .delete(&username_guard(&u.username), None);
        if !u.email.is_empty() {
            batch = batch.delete(&email_guard(&u.email), None);
        }
        self.id.store.commit(batch).await.map_err(store_error)?;
        // The user is gone, so its tokens and sessions no longer authenticate;
        // removing them is housekeeping, in chunks below etcd's per-txn limit.
        let tokens =
            self.id.store.list::<ApiTokenRecord>(&format!("api_tokens/{}/", u.id)).await.map_err(store_error)?;
        let sessions =
            self.id.store.list::<SessionRecord>(&format!("sessions/{}/", u.id)).await.map_err(store_error)?;
        let mut keys: Vec<String> = Vec::new();
        for (_, t) in &tokens {
            keys.push(api_token_key(&u.id, &t.value.id));
            keys.push(api_token_hash_guard(&t.value.hash));
        }
        keys.extend(sessions.iter().map(|(_, s)| session_key(&u.id, &s.value.id)));
        for chunk in keys.chunks(100) {
            let batch = chunk.iter().fold(Batch::new(), |b, k| b.delete(k, None));
            self.id.store.commit(batch).await.map_err(store_error)?;
        }
        tracing::info!(user = %u.username, by = %caller.username, "user deleted");
        Ok(Response::new(DeleteUserResponse {}))
    }
}

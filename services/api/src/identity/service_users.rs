//! UserService: users and their roles.
//!
//! A password reset, a role change and a user delete end every credential
//! the user held before: in the same transaction as the change, the user's
//! sessions and their refresh tokens are deleted, its API tokens marked
//! revoked, and `tokens_valid_after` set to the instant of the change (with
//! nanoseconds), which authentication compares every credential against.
//! The admins' ids live in one record ([`keys::ADMINS`]) that every change
//! making or ending an admin compares-and-swaps, so two concurrent
//! demotions or deletes cannot remove the last admin.

use std::collections::BTreeSet;
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
use otherix_store::{Batch, Expect, StoreError, Versioned, keys};
use tonic::{Request, Response, Status};

use super::service_auth::{hash_password, verify_password};
use super::{Caller, Identity, now_ts, role_of, user_view, user_view_at};
use crate::paging::{self, Order};
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

/// Writes in the transaction that changes a user, beside the user's own
/// keys; what does not fit follows in further transactions (etcd allows
/// 128 operations in one), already refused by `tokens_valid_after`.
const CREDENTIAL_OPS_IN_TXN: usize = 100;

/// How often a change is tried again when a concurrent change won.
const ATTEMPTS: usize = 8;

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

fn last_admin(action: &str) -> ApiError {
    ApiError::new(ErrorCode::Conflict, format!("the last admin cannot be {action}; make another admin first"))
        .with_detail("reason", "last_admin")
}

/// What a failed guarded write means.
enum WriteFailure {
    /// A concurrent change won: read again and retry.
    Retry,
    /// Final.
    Error(ApiError),
}

fn classify(e: StoreError, username: &str, email: &str) -> WriteFailure {
    match e {
        StoreError::AlreadyExists { key } if keys::is_username_guard(&key) => {
            WriteFailure::Error(taken("username", username))
        }
        StoreError::AlreadyExists { key } if keys::is_email_guard(&key) => WriteFailure::Error(taken("email", email)),
        StoreError::AlreadyExists { .. } | StoreError::Conflict { .. } => WriteFailure::Retry,
        other => WriteFailure::Error(store_error(other)),
    }
}

/// The admins' ids and the expectation to write them back with.
struct AdminSet {
    ids: BTreeSet<String>,
    expect: Expect,
}

impl AdminSet {
    fn encoded(&self) -> String {
        self.ids.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }
}

/// One write that ends a credential.
enum EndOp {
    Delete(String),
    Revoke(String, Box<ApiTokenRecord>),
}

fn apply(batch: Batch, op: &EndOp) -> Batch {
    match op {
        EndOp::Delete(k) => batch.delete(k, None),
        EndOp::Revoke(k, rec) => batch.put(k, rec.as_ref(), None),
    }
}

impl Identity {
    /// The admin set; built from the user records the first time.
    async fn admin_set(&self) -> Result<AdminSet, ApiError> {
        match self.store.get::<String>(keys::ADMINS).await.map_err(store_error)? {
            Some(v) => Ok(AdminSet {
                ids: v.value.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect(),
                expect: Expect::Revision(v.mod_revision),
            }),
            None => Ok(AdminSet {
                ids: self
                    .list_users()
                    .await?
                    .iter()
                    .filter(|u| role_of(&u.value) == Role::Admin)
                    .map(|u| u.value.id.clone())
                    .collect(),
                expect: Expect::Absent,
            }),
        }
    }

    /// The writes that end every session, refresh token and API token of a
    /// user; with `delete`, API tokens are removed rather than marked.
    async fn end_credentials(&self, user_id: &str, delete: bool) -> Result<Vec<EndOp>, ApiError> {
        let sessions = self.store.list::<SessionRecord>(&keys::sessions_of(user_id)).await.map_err(store_error)?;
        let tokens = self.store.list::<ApiTokenRecord>(&keys::api_tokens_of(user_id)).await.map_err(store_error)?;
        let mut ops = Vec::with_capacity(sessions.len() * 2 + tokens.len() * 2);
        for (_, s) in sessions {
            ops.push(EndOp::Delete(keys::session(user_id, &s.value.id)));
            if !s.value.current_token_hash.is_empty() {
                ops.push(EndOp::Delete(keys::refresh_token(&s.value.current_token_hash)));
            }
        }
        let now = now_ts();
        for (_, t) in tokens {
            let key = keys::api_token(user_id, &t.value.id);
            if delete {
                ops.push(EndOp::Delete(key));
                ops.push(EndOp::Delete(keys::api_token_hash_guard(&t.value.hash)));
            } else if t.value.revoked_at.is_none() {
                ops.push(EndOp::Revoke(key, Box::new(ApiTokenRecord { revoked_at: Some(now), ..t.value })));
            }
        }
        Ok(ops)
    }

    /// Applies the writes that did not fit in the change's transaction.
    async fn end_rest(&self, rest: &[EndOp]) -> Result<(), ApiError> {
        for chunk in rest.chunks(CREDENTIAL_OPS_IN_TXN) {
            let batch = chunk.iter().fold(Batch::new(), apply);
            self.store.commit(batch).await.map_err(store_error)?;
        }
        Ok(())
    }

    /// Creates a user record with its guards (and, for an admin, its entry
    /// in the admin set).
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
        for _ in 0..ATTEMPTS {
            let mut batch = Batch::new().put(&keys::user(&user.id), &user, Some(Expect::Absent)).put_raw(
                &keys::username_guard(username),
                user.id.clone().into_bytes(),
                Some(Expect::Absent),
            );
            if !email.is_empty() {
                batch = batch.put_raw(&keys::email_guard(email), user.id.clone().into_bytes(), Some(Expect::Absent));
            }
            if role == Role::Admin {
                let mut set = self.admin_set().await?;
                set.ids.insert(user.id.clone());
                batch = batch.put(keys::ADMINS, &set.encoded(), Some(set.expect));
            }
            match self.store.commit(batch).await.map_err(|e| classify(e, username, email)) {
                Ok(_) => {
                    tracing::info!(user = %user.username, role = %user.role, "user created");
                    return Ok(user);
                }
                Err(WriteFailure::Retry) => continue,
                Err(WriteFailure::Error(e)) => return Err(e),
            }
        }
        Err(store_error(StoreError::Conflict { key: keys::ADMINS.into() }))
    }

    /// Applies changes to a user with compare-and-swap, moving the email
    /// guard when it changes, keeping the admin set, and with
    /// `end_credentials` ending everything the user held before. `Ok(None)`:
    /// a concurrent change won; read again and retry.
    async fn change_user(
        &self,
        current: Versioned<UserRecord>,
        mut next: UserRecord,
        end_credentials: bool,
    ) -> Result<Option<UserRecord>, ApiError> {
        let mut batch = Batch::new();
        let old_email = current.value.email.to_ascii_lowercase();
        let new_email = next.email.to_ascii_lowercase();
        if old_email != new_email {
            if !old_email.is_empty() {
                batch = batch.delete(&keys::email_guard(&old_email), None);
            }
            if !new_email.is_empty() {
                batch =
                    batch.put_raw(&keys::email_guard(&new_email), next.id.clone().into_bytes(), Some(Expect::Absent));
            }
        }
        let (was, is) = (role_of(&current.value) == Role::Admin, role_of(&next) == Role::Admin);
        if was != is {
            let mut set = self.admin_set().await?;
            if is {
                set.ids.insert(next.id.clone());
            } else {
                set.ids.remove(&next.id);
                if set.ids.is_empty() {
                    return Err(last_admin("demoted"));
                }
            }
            batch = batch.put(keys::ADMINS, &set.encoded(), Some(set.expect));
        }
        let mut rest = Vec::new();
        if end_credentials {
            let mut ops = self.end_credentials(&next.id, false).await?;
            rest = ops.split_off(ops.len().min(CREDENTIAL_OPS_IN_TXN));
            batch = ops.iter().fold(batch, apply);
            // After every credential listed above was made: anything made
            // before this instant is refused, to the nanosecond.
            next.tokens_valid_after = Some(now_ts());
        }
        batch = batch.put(&keys::user(&next.id), &next, Some(Expect::Revision(current.mod_revision)));
        match self.store.commit(batch).await.map_err(|e| classify(e, &next.username, &next.email)) {
            Ok(_) => {}
            Err(WriteFailure::Retry) => return Ok(None),
            Err(WriteFailure::Error(e)) => return Err(e),
        }
        self.end_rest(&rest).await?;
        Ok(Some(next))
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
    async fn list_users(&self, req: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        let r = req.into_inner();
        let users: Vec<_> = self.id.list_users().await?.iter().map(user_view_at).collect();
        let p =
            paging::page(users, Order::Asc, |u| u.username.clone(), r.page_size, &r.page_token, &paging::query(&[]))?;
        Ok(Response::new(ListUsersResponse {
            users: p.items,
            next_page_token: p.next_page_token,
            total_size: p.total_size,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_me(&self, req: Request<GetMeRequest>) -> Result<Response<User>, Status> {
        // Authentication read the caller's record from memory already.
        let caller = Caller::of(&req)?;
        Ok(Response::new(User { etag: crate::etag::of(caller.user_revision), ..user_view(&caller.user) }))
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
        if let Some(name) = &r.display_name {
            check_display_name(name.trim())?;
        }
        let mut password_hash = None;
        if let Some(password) = r.password {
            check_policy(&password).map_err(|m| ApiError::invalid_field("password", m))?;
            let current = self.id.resolve_user(&caller.user_id).await?;
            if !verify_password(r.current_password, Some(current.value.password_hash.clone())).await? {
                return Err(ApiError::invalid_field("current_password", "the current password is wrong").into());
            }
            password_hash = Some(hash_password(password).await?);
        }
        for _ in 0..ATTEMPTS {
            let current = self.id.resolve_user(&caller.user_id).await?;
            let mut next = current.value.clone();
            if let Some(name) = &r.display_name {
                next.display_name = name.trim().to_owned();
            }
            if let Some(h) = &password_hash {
                next.password_hash = h.clone();
            }
            next.updated_at = Some(now_ts());
            if let Some(changed) = self.id.change_user(current, next, false).await? {
                return Ok(Response::new(user_view(&changed)));
            }
        }
        Err(store_error(StoreError::Conflict { key: keys::user(&caller.user_id) }).into())
    }

    #[tracing::instrument(skip_all, fields(user = %req.get_ref().user))]
    async fn get_user(&self, req: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let user = self.id.resolve_user(&req.get_ref().user).await?;
        Ok(Response::new(user_view_at(&user)))
    }

    #[tracing::instrument(skip_all, fields(user = %req.get_ref().user))]
    async fn update_user(&self, req: Request<UpdateUserRequest>) -> Result<Response<User>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let role = r.role.as_deref().map(parse_role).transpose()?;
        if let Some(name) = &r.display_name {
            check_display_name(name.trim())?;
        }
        if let Some(email) = &r.email {
            check_email(email.trim())?;
        }
        // Hashed once, outside the retries.
        let password_hash = match r.password {
            Some(password) => {
                check_policy(&password).map_err(|m| ApiError::invalid_field("password", m))?;
                Some(hash_password(password).await?)
            }
            None => None,
        };
        for _ in 0..ATTEMPTS {
            let current = self.id.resolve_user(&r.user).await?;
            crate::etag::check(&r.etag, current.mod_revision, "user", &r.user)?;
            let mut next = current.value.clone();
            if let Some(role) = role {
                if current.value.id == caller.user_id && role != caller.role {
                    return Err(ApiError::new(ErrorCode::PermissionDenied, "nobody changes their own role")
                        .with_detail("forbidden_fields", vec!["role"])
                        .into());
                }
                next.role = role.as_str().to_owned();
            }
            if let Some(name) = &r.display_name {
                next.display_name = name.trim().to_owned();
            }
            if let Some(email) = &r.email {
                next.email = email.trim().to_owned();
            }
            if let Some(h) = &password_hash {
                next.password_hash = h.clone();
            }
            next.updated_at = Some(now_ts());
            // A reset password or a new role ends every session and token
            // the user held: whoever held them may not be the user.
            let end = password_hash.is_some() || next.role != current.value.role;
            if let Some(changed) = self.id.change_user(current, next, end).await? {
                tracing::info!(user = %changed.username, role = %changed.role, by = %caller.username, ended_credentials = end, "user updated");
                // As stored, with its new etag (the cache has this replica's write).
                let view = match self.id.cached_user(&changed.id).await? {
                    Some(v) => user_view_at(&v),
                    None => user_view(&changed),
                };
                return Ok(Response::new(view));
            }
        }
        Err(store_error(StoreError::Conflict { key: keys::ADMINS.into() }).into())
    }

    #[tracing::instrument(skip_all, fields(user = %req.get_ref().user))]
    async fn delete_user(&self, req: Request<DeleteUserRequest>) -> Result<Response<DeleteUserResponse>, Status> {
        let caller = Caller::of(&req)?;
        for _ in 0..ATTEMPTS {
            let target = self.id.resolve_user(&req.get_ref().user).await?;
            crate::etag::check(&req.get_ref().etag, target.mod_revision, "user", &req.get_ref().user)?;
            if target.value.id == caller.user_id {
                return Err(ApiError::new(ErrorCode::Conflict, "you cannot delete yourself").into());
            }
            let u = &target.value;
            let mut batch = Batch::new()
                .delete(&keys::user(&u.id), Some(Expect::Revision(target.mod_revision)))
                .delete(&keys::username_guard(&u.username), None);
            if !u.email.is_empty() {
                batch = batch.delete(&keys::email_guard(&u.email), None);
            }
            if role_of(u) == Role::Admin {
                let mut set = self.id.admin_set().await?;
                set.ids.remove(&u.id);
                if set.ids.is_empty() {
                    return Err(last_admin("deleted").into());
                }
                batch = batch.put(keys::ADMINS, &set.encoded(), Some(set.expect));
            }
            // The user's credentials go in the same transaction (as many as
            // fit); with the user gone, the rest no longer authenticate.
            let mut ops = self.id.end_credentials(&u.id, true).await?;
            let rest = ops.split_off(ops.len().min(CREDENTIAL_OPS_IN_TXN));
            batch = ops.iter().fold(batch, apply);
            match self.id.store.commit(batch).await.map_err(|e| classify(e, &u.username, &u.email)) {
                Ok(_) => {}
                Err(WriteFailure::Retry) => continue,
                Err(WriteFailure::Error(e)) => return Err(e.into()),
            }
            self.id.end_rest(&rest).await?;
            tracing::info!(user = %u.username, by = %caller.username, "user deleted");
            return Ok(Response::new(DeleteUserResponse {}));
        }
        Err(store_error(StoreError::Conflict { key: keys::ADMINS.into() }).into())
    }
}

//! Users, sessions, API tokens and RBAC against a real etcd, over REST and gRPC.

mod common;

use common::{ADMIN, ADMIN_EMAIL, ADMIN_PASSWORD, Harness, client_with, login};
use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::v1::cluster_service_client::ClusterServiceClient;
use otherix_proto::v1::user_service_client::UserServiceClient;
use otherix_proto::v1::{CreateUserRequest, GetDefaultPoolRequest, GetMeRequest};
use serde_json::{Value, json};

async fn call(r: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn login_and_api_tokens_work_on_rest_and_grpc() {
    let h = Harness::start().await;
    // By email, as the seed documents; the username is the email's local part.
    let (s, body) =
        call(h.anon.post(h.url("/v1/auth/login")).json(&json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})))
            .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["user"]["username"], ADMIN);
    assert_eq!(body["user"]["role"], "admin");
    assert!(body["user"].get("password_hash").is_none());
    let jwt = body["access_token"].as_str().unwrap().to_owned();

    let (s, body) = call(
        client_with(&jwt)
            .post(h.url("/v1/users/me/api-tokens"))
            .json(&json!({"name": "cli", "description": "operator workstation"})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let api_token = body["plaintext_token"].as_str().unwrap().to_owned();
    assert!(api_token.starts_with("otx_"), "{api_token}");
    assert_eq!(body["api_token"]["name"], "cli");
    assert!(api_token.starts_with(body["api_token"]["prefix"].as_str().unwrap()));

    for token in [&jwt, &api_token] {
        let (s, me) = call(client_with(token).get(h.url("/v1/users/me"))).await;
        assert_eq!((s, me["username"].as_str()), (200, Some(ADMIN)));
        let mut users = UserServiceClient::new(h.authed(Some(token)).await);
        assert_eq!(users.get_me(GetMeRequest {}).await.unwrap().into_inner().username, ADMIN);
    }

    // The listing shows the token without its plaintext.
    let (_, list) = call(h.http.get(h.url("/v1/users/me/api-tokens"))).await;
    let listed = list["api_tokens"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!list.to_string().contains(&api_token));
    let id = listed[0]["id"].as_str().unwrap();

    let (s, revoked) = call(h.http.delete(h.url(&format!("/v1/users/me/api-tokens/{id}")))).await;
    assert_eq!(s, 200);
    assert!(revoked["revoked_at"].is_string());
    let (s, body) = call(client_with(&api_token).get(h.url("/v1/users/me"))).await;
    assert_eq!((s, code(&body)), (401, "token_revoked"));
    let mut users = UserServiceClient::new(h.authed(Some(&api_token)).await);
    let err = users.get_me(GetMeRequest {}).await.unwrap_err();
    assert_eq!(ApiError::from_status(&err).code, ErrorCode::TokenRevoked);
}

#[tokio::test]
async fn refusals_carry_the_documented_codes() {
    let h = Harness::start().await;
    let (s, body) =
        call(h.anon.post(h.url("/v1/auth/login")).json(&json!({"username": ADMIN, "password": "wrong-password-1"})))
            .await;
    assert_eq!((s, code(&body)), (401, "invalid_credentials"));
    let (s, body) = call(
        h.anon.post(h.url("/v1/auth/login")).json(&json!({"username": "nobody", "password": "whatever-password"})),
    )
    .await;
    assert_eq!((s, code(&body)), (401, "invalid_credentials"));

    let (s, body) = call(h.anon.get(h.url("/v1/cluster/default-pool"))).await;
    assert_eq!((s, code(&body)), (401, "unauthenticated"));
    let (s, body) = call(client_with("not-a-jwt").get(h.url("/v1/users/me"))).await;
    assert_eq!((s, code(&body)), (401, "unauthenticated"));
    let (s, body) =
        call(client_with("otx_unknowntokenunknowntokenunknowntokenunknown").get(h.url("/v1/users/me"))).await;
    assert_eq!((s, code(&body)), (401, "unauthenticated"));
    let mut cluster = ClusterServiceClient::new(h.authed(None).await);
    let err = cluster.get_default_pool(GetDefaultPoolRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let viewer = h.user_token("vera", "viewer").await;
    let (s, body) = call(
        client_with(&viewer)
            .post(h.url("/v1/users"))
            .json(&json!({"username": "mallory", "password": "mallory-password", "role": "admin"})),
    )
    .await;
    assert_eq!((s, code(&body)), (403, "permission_denied"));
    assert_eq!(body["error"]["details"]["required_permission"], "user:manage");
    let mut users = UserServiceClient::new(h.authed(Some(&viewer)).await);
    let err = users
        .create_user(CreateUserRequest {
            username: "mallory".into(),
            password: "mallory-password".into(),
            role: "admin".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let e = ApiError::from_status(&err);
    assert_eq!((e.code, e.details["required_permission"].as_str()), (ErrorCode::PermissionDenied, Some("user:manage")));
    // Viewers read what they may.
    let (s, _) = call(client_with(&viewer).get(h.url("/v1/cluster/default-pool"))).await;
    assert!(s == 200 || s == 404);
}

#[tokio::test]
async fn eleven_wrong_passwords_are_rate_limited() {
    let h = Harness::start().await;
    for i in 0..10 {
        let (s, body) = call(
            h.anon
                .post(h.url("/v1/auth/login"))
                .json(&json!({"username": ADMIN, "password": format!("wrong-{i}-password")})),
        )
        .await;
        assert_eq!((s, code(&body)), (401, "invalid_credentials"), "attempt {i}");
    }
    let (s, body) =
        call(h.anon.post(h.url("/v1/auth/login")).json(&json!({"username": ADMIN, "password": "wrong-10-password"})))
            .await;
    assert_eq!((s, code(&body)), (429, "rate_limited"));
    assert!(body["error"]["details"]["retry_after_seconds"].as_u64().unwrap() > 0);
    // While locked, even the right password is refused: guessing gains nothing.
    let (s, body) =
        call(h.anon.post(h.url("/v1/auth/login")).json(&json!({"username": ADMIN, "password": ADMIN_PASSWORD}))).await;
    assert_eq!((s, code(&body)), (429, "rate_limited"));
    // Other accounts from the same address still log in.
    h.user_token("otto", "operator").await;
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_session() {
    let h = Harness::start().await;
    let first = login(&h.anon, &h.base, ADMIN, ADMIN_PASSWORD).await;
    let r1 = first["refresh_token"].as_str().unwrap();
    let (s, second) = call(h.anon.post(h.url("/v1/auth/refresh")).json(&json!({"refresh_token": r1}))).await;
    assert_eq!(s, 200, "{second}");
    let r2 = second["refresh_token"].as_str().unwrap();
    assert_ne!(r1, r2);
    let access2 = second["access_token"].as_str().unwrap();
    assert_eq!(call(client_with(access2).get(h.url("/v1/users/me"))).await.0, 200);

    // Presenting the spent token again: the whole session ends.
    let (s, body) = call(h.anon.post(h.url("/v1/auth/refresh")).json(&json!({"refresh_token": r1}))).await;
    assert_eq!((s, code(&body)), (401, "token_revoked"));
    let (s, body) = call(h.anon.post(h.url("/v1/auth/refresh")).json(&json!({"refresh_token": r2}))).await;
    assert_eq!((s, code(&body)), (401, "token_revoked"));
    let (s, body) = call(client_with(access2).get(h.url("/v1/users/me"))).await;
    assert_eq!((s, code(&body)), (401, "token_revoked"));
    // Other sessions are untouched.
    assert_eq!(call(h.http.get(h.url("/v1/users/me"))).await.0, 200);
    let (s, body) = call(h.anon.post(h.url("/v1/auth/refresh")).json(&json!({"refresh_token": "ort_garbage"}))).await;
    assert_eq!((s, code(&body)), (401, "unauthenticated"));
}

#[tokio::test]
async fn logout_one_session_or_all() {
    let h = Harness::start().await;
    let a = login(&h.anon, &h.base, ADMIN, ADMIN_PASSWORD).await;
    let b = login(&h.anon, &h.base, ADMIN, ADMIN_PASSWORD).await;
    let (at, bt) = (a["access_token"].as_str().unwrap(), b["access_token"].as_str().unwrap());
    let (s, body) =
        call(client_with(at).post(h.url("/v1/auth/logout")).json(&json!({"refresh_token": a["refresh_token"]}))).await;
    assert_eq!((s, body["revoked_sessions"].as_i64()), (200, Some(1)));
    assert_eq!(code(&call(client_with(at).get(h.url("/v1/users/me"))).await.1), "token_revoked");
    assert_eq!(call(client_with(bt).get(h.url("/v1/users/me"))).await.0, 200);

    let (s, body) = call(client_with(bt).post(h.url("/v1/auth/logout")).json(&json!({"all_sessions": true}))).await;
    assert_eq!(s, 200, "{body}");
    assert!(body["revoked_sessions"].as_i64().unwrap() >= 2);
    assert_eq!(code(&call(client_with(bt).get(h.url("/v1/users/me"))).await.1), "token_revoked");
    assert_eq!(code(&call(h.http.get(h.url("/v1/users/me"))).await.1), "token_revoked");
    let (s, body) =
        call(h.anon.post(h.url("/v1/auth/refresh")).json(&json!({"refresh_token": b["refresh_token"]}))).await;
    assert_eq!((s, code(&body)), (401, "token_revoked"));
    // A new login works.
    login(&h.anon, &h.base, ADMIN, ADMIN_PASSWORD).await;
}

#[tokio::test]
async fn signing_key_rotation() {
    let h = Harness::start().await;
    let (s, body) = call(h.http.post(h.url("/v1/auth/signing-key/rotate")).json(&json!({}))).await;
    assert_eq!(s, 200, "{body}");
    let kid = body["key_id"].as_str().unwrap().to_owned();
    // Tokens signed before the rotation stay valid until they expire ...
    assert_eq!(call(h.http.get(h.url("/v1/users/me"))).await.0, 200);
    let fresh = login(&h.anon, &h.base, ADMIN, ADMIN_PASSWORD).await["access_token"].as_str().unwrap().to_owned();
    // ... unless the rotation revokes them.
    let (s, body) =
        call(client_with(&fresh).post(h.url("/v1/auth/signing-key/rotate")).json(&json!({"revoke_existing": true})))
            .await;
    assert_eq!(s, 200);
    assert_ne!(body["key_id"], kid);
    assert_eq!(code(&call(client_with(&fresh).get(h.url("/v1/users/me"))).await.1), "token_revoked");
    assert_eq!(code(&call(h.http.get(h.url("/v1/users/me"))).await.1), "token_revoked");
    let newest = login(&h.anon, &h.base, ADMIN, ADMIN_PASSWORD).await["access_token"].as_str().unwrap().to_owned();
    assert_eq!(call(client_with(&newest).get(h.url("/v1/users/me"))).await.0, 200);
    // Only admins rotate.
    let (s, _) = call(
        client_with(&newest)
            .post(h.url("/v1/users"))
            .json(&json!({"username": "oscar", "password": "oscar-password", "role": "operator"})),
    )
    .await;
    assert_eq!(s, 200);
    let op = login(&h.anon, &h.base, "oscar", "oscar-password").await["access_token"].as_str().unwrap().to_owned();
    let (s, body) = call(client_with(&op).post(h.url("/v1/auth/signing-key/rotate")).json(&json!({}))).await;
    assert_eq!((s, code(&body)), (403, "permission_denied"));
}

#[tokio::test]
async fn user_management_rules() {
    let h = Harness::start().await;
    let (s, dev) = call(h.http.post(h.url("/v1/users")).json(&json!({"username": "dana", "password": "dana-password-1", "role": "developer", "email": "dana@example.com", "display_name": "Dana"}))).await;
    assert_eq!(s, 200, "{dev}");
    assert_eq!(dev["role"], "developer");
    let (s, body) = call(
        h.http
            .post(h.url("/v1/users"))
            .json(&json!({"username": "dana", "password": "dana-password-1", "role": "viewer"})),
    )
    .await;
    assert_eq!((s, code(&body), body["error"]["details"]["field"].as_str()), (409, "conflict", Some("username")));
    let (s, body) = call(h.http.post(h.url("/v1/users")).json(
        &json!({"username": "dana2", "password": "dana-password-1", "role": "viewer", "email": "DANA@example.com"}),
    ))
    .await;
    assert_eq!((s, body["error"]["details"]["field"].as_str()), (409, Some("email")));
    for (bad, field) in [
        (json!({"username": "x", "password": "long-enough-pw", "role": "viewer"}), "username"),
        (json!({"username": "xavier", "password": "short", "role": "viewer"}), "password"),
        (json!({"username": "xavier", "password": "long-enough-pw", "role": "root"}), "role"),
        (json!({"username": "xavier", "password": "long-enough-pw", "role": "viewer", "email": "nope"}), "email"),
    ] {
        let (s, body) = call(h.http.post(h.url("/v1/users")).json(&bad)).await;
        assert_eq!((s, body["error"]["details"]["field"].as_str()), (400, Some(field)), "{bad}");
    }

    // By username or id.
    let (s, got) = call(h.http.get(h.url("/v1/users/dana"))).await;
    assert_eq!((s, got["email"].as_str()), (200, Some("dana@example.com")));
    let id = got["id"].as_str().unwrap().to_owned();
    assert_eq!(call(h.http.get(h.url(&format!("/v1/users/{id}")))).await.1["username"], "dana");
    let (_, list) = call(h.http.get(h.url("/v1/users"))).await;
    let names: Vec<&str> = list["users"].as_array().unwrap().iter().map(|u| u["username"].as_str().unwrap()).collect();
    assert_eq!(names, ["admin", "dana"]);

    // Nobody changes their own role; an admin changes others'.
    let dana = login(&h.anon, &h.base, "dana", "dana-password-1").await["access_token"].as_str().unwrap().to_owned();
    let (s, body) = call(client_with(&dana).patch(h.url("/v1/users/me")).json(&json!({"role": "admin"}))).await;
    assert_eq!((s, code(&body)), (403, "permission_denied"));
    assert_eq!(body["error"]["details"]["forbidden_fields"], json!(["role"]));
    let (s, body) = call(h.http.patch(h.url("/v1/users/me")).json(&json!({"role": "viewer"}))).await;
    assert_eq!((s, code(&body)), (403, "permission_denied"));
    let (s, body) =
        call(h.http.patch(h.url("/v1/users/dana")).json(&json!({"role": "operator", "display_name": "Dana O."}))).await;
    assert_eq!((s, body["role"].as_str(), body["display_name"].as_str()), (200, Some("operator"), Some("Dana O.")));
    // A role change ends the sessions and tokens issued before it; the new
    // role applies from the next login.
    assert_eq!(code(&call(client_with(&dana).get(h.url("/v1/users"))).await.1), "token_revoked");
    let dana = login(&h.anon, &h.base, "dana", "dana-password-1").await["access_token"].as_str().unwrap().to_owned();
    assert_eq!(call(client_with(&dana).get(h.url("/v1/users"))).await.0, 200);

    // Own password change needs the current password.
    let (s, body) = call(
        client_with(&dana)
            .patch(h.url("/v1/users/me"))
            .json(&json!({"password": "dana-password-2", "current_password": "nope"})),
    )
    .await;
    assert_eq!((s, body["error"]["details"]["field"].as_str()), (400, Some("current_password")));
    let (s, _) = call(
        client_with(&dana)
            .patch(h.url("/v1/users/me"))
            .json(&json!({"password": "dana-password-2", "current_password": "dana-password-1"})),
    )
    .await;
    assert_eq!(s, 200);
    login(&h.anon, &h.base, "dana", "dana-password-2").await;

    // Developers manage only their own tokens; others' do not exist for them.
    let devon = h.user_token("devon", "developer").await;
    let (s, body) =
        call(client_with(&devon).post(h.url("/v1/users/dana/api-tokens")).json(&json!({"name": "x"}))).await;
    assert_eq!((s, code(&body)), (404, "not_found"));
    let (s, body) = call(h.http.post(h.url("/v1/users/devon/api-tokens")).json(&json!({"name": "on-behalf"}))).await;
    assert_eq!(s, 200, "{body}");
    let (_, list) = call(client_with(&devon).get(h.url("/v1/users/me/api-tokens"))).await;
    assert_eq!(list["api_tokens"][0]["name"], "on-behalf");

    // Deleting: not yourself, and the user's credentials die with it.
    let (s, body) = call(h.http.delete(h.url("/v1/users/admin"))).await;
    assert_eq!((s, code(&body)), (409, "conflict"));
    let (s, _) = call(h.http.delete(h.url("/v1/users/devon"))).await;
    assert_eq!(s, 200);
    assert_eq!(code(&call(client_with(&devon).get(h.url("/v1/users/me"))).await.1), "unauthenticated");
    assert_eq!(call(h.http.get(h.url("/v1/users/devon"))).await.0, 404);
    // The username is free again.
    h.user_token("devon", "viewer").await;
}

#[tokio::test]
async fn idempotency_keys_replay_and_refuse_mismatches() {
    let h = Harness::start().await;
    let body = json!({"username": "ida", "password": "ida-password-12", "role": "viewer"});
    let first = call(h.http.post(h.url("/v1/users")).header("Idempotency-Key", "k-1").json(&body)).await;
    assert_eq!(first.0, 200, "{}", first.1);
    let again = call(h.http.post(h.url("/v1/users")).header("Idempotency-Key", "k-1").json(&body)).await;
    assert_eq!(again, first, "the stored response is replayed, not a 409 for the existing user");
    let other = json!({"username": "ida2", "password": "ida-password-12", "role": "viewer"});
    let (s, b) = call(h.http.post(h.url("/v1/users")).header("Idempotency-Key", "k-1").json(&other)).await;
    assert_eq!((s, code(&b)), (409, "idempotency_key_mismatch"));
    // Without a key the same body is a new request: the user exists now.
    assert_eq!(call(h.http.post(h.url("/v1/users")).json(&body)).await.0, 409);
    // Keys are per user: another user's same key is independent.
    let op = h.user_token("olga", "admin").await;
    let (s, _) = call(client_with(&op).post(h.url("/v1/users")).header("Idempotency-Key", "k-1").json(&other)).await;
    assert_eq!(s, 200);

    // gRPC: request_id.
    let mut users = UserServiceClient::new(h.authed(Some(&h.admin_token)).await);
    let req = || CreateUserRequest {
        username: "grace".into(),
        password: "grace-password".into(),
        role: "viewer".into(),
        request_id: "r-1".into(),
        ..Default::default()
    };
    let a = users.create_user(req()).await.unwrap().into_inner();
    let b = users.create_user(req()).await.unwrap().into_inner();
    assert_eq!(a, b);
    let err = users.create_user(CreateUserRequest { role: "developer".into(), ..req() }).await.unwrap_err();
    assert_eq!(ApiError::from_status(&err).code, ErrorCode::IdempotencyKeyMismatch);

    // A failed call is not stored: the retry runs again.
    let bad = json!({"username": "hal", "password": "short", "role": "viewer"});
    assert_eq!(call(h.http.post(h.url("/v1/users")).header("Idempotency-Key", "k-2").json(&bad)).await.0, 400);
    let good = json!({"username": "hal", "password": "hal-password-12", "role": "viewer"});
    assert_eq!(call(h.http.post(h.url("/v1/users")).header("Idempotency-Key", "k-2").json(&good)).await.0, 200);
    assert_eq!(call(h.http.post(h.url("/v1/users")).header("Idempotency-Key", "k-2").json(&good)).await.0, 200);
    assert_eq!(call(h.http.post(h.url("/v1/users")).header("Idempotency-Key", "k-3").json(&good)).await.0, 409);

    // Secrets are never stored for replay.
    let (s, b) = call(
        h.http.post(h.url("/v1/users/me/api-tokens")).header("Idempotency-Key", "k-4").json(&json!({"name": "t"})),
    )
    .await;
    assert_eq!((s, code(&b)), (400, "validation_failed"));
}

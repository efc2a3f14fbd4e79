//! Revocation on reset, idempotency records that keep no guessable hash,
//! default-deny, the last admin and the token cap, against a real etcd and
//! the control plane on a real port. (Login bursts are in login_limits.rs:
//! the hashing pool is per process, so they get a process of their own.)

mod common;

use std::time::Duration;

use common::{ADMIN, DynamicCodec, Harness, client_with, login};
use otherix_errors::ApiError;
use otherix_proto::otherix::store::v1::IdempotencyRecord;
use otherix_proto::v1::UpdateUserRequest;
use otherix_proto::v1::user_service_client::UserServiceClient;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

async fn call(r: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// A user's credentials: access token, refresh token, API token.
async fn credentials(h: &Harness, username: &str, password: &str) -> (String, String, String, String) {
    let l = login(&h.anon, &h.base, username, password).await;
    let access = l["access_token"].as_str().unwrap().to_owned();
    let refresh = l["refresh_token"].as_str().unwrap().to_owned();
    let (s, t) = call(client_with(&access).post(h.url("/v1/users/me/api-tokens")).json(&json!({"name": "ci"}))).await;
    assert_eq!(s, 200, "{t}");
    let api = t["plaintext_token"].as_str().unwrap().to_owned();
    let created = t["api_token"]["created_at"].as_str().unwrap().to_owned();
    (access, refresh, api, created)
}

async fn assert_all_dead(h: &Harness, access: &str, refresh: &str, api: &str) {
    let (s, body) = call(h.anon.post(h.url("/v1/auth/refresh")).json(&json!({"refresh_token": refresh}))).await;
    assert_eq!(s, 401, "the old refresh token still refreshes: {body}");
    let (s, body) = call(client_with(access).get(h.url("/v1/users/me"))).await;
    assert_eq!(s, 401, "the old access token still works: {body}");
    let (s, body) = call(client_with(api).get(h.url("/v1/users/me"))).await;
    assert_eq!(s, 401, "the old API token still works: {body}");
}

fn second_of(rfc3339: &str) -> &str {
    &rfc3339[..19]
}

#[tokio::test]
async fn a_reset_ends_sessions_refresh_and_api_tokens_issued_the_same_second() {
    let h = Harness::start().await;
    let (s, _) = call(
        h.http
            .post(h.url("/v1/users"))
            .json(&json!({"username": "rita", "password": "rita-password-1", "role": "developer"})),
    )
    .await;
    assert_eq!(s, 200);
    let mut same_second = false;
    let mut password = "rita-password-1".to_owned();
    for attempt in 0..5 {
        let (access, refresh, api, created) = credentials(&h, "rita", &password).await;
        password = format!("rita-password-new-{attempt}");
        let (s, reset) = call(h.http.patch(h.url("/v1/users/rita")).json(&json!({"password": password}))).await;
        assert_eq!(s, 200, "{reset}");
        same_second |= second_of(&created) == second_of(reset["updated_at"].as_str().unwrap());
        assert_all_dead(&h, &access, &refresh, &api).await;
        // A new login works, and its credentials do.
        let fresh = login(&h.anon, &h.base, "rita", &password).await;
        let (s, _) = call(client_with(fresh["access_token"].as_str().unwrap()).get(h.url("/v1/users/me"))).await;
        assert_eq!(s, 200);
        let (s, body) =
            call(h.anon.post(h.url("/v1/auth/refresh")).json(&json!({"refresh_token": fresh["refresh_token"]}))).await;
        assert_eq!(s, 200, "{body}");
        if same_second {
            break;
        }
    }
    assert!(same_second, "never managed to issue a token and reset in the same second");

    // A role change ends them too; so does a delete.
    let (access, refresh, api, _) = credentials(&h, "rita", &password).await;
    let (s, _) = call(h.http.patch(h.url("/v1/users/rita")).json(&json!({"role": "viewer"}))).await;
    assert_eq!(s, 200);
    assert_all_dead(&h, &access, &refresh, &api).await;
    let (access, refresh, api, _) = credentials(&h, "rita", &password).await;
    // A display-name change does not.
    let (s, _) = call(h.http.patch(h.url("/v1/users/rita")).json(&json!({"display_name": "Rita"}))).await;
    assert_eq!(s, 200);
    assert_eq!(call(client_with(&api).get(h.url("/v1/users/me"))).await.0, 200);
    assert_eq!(call(client_with(&access).get(h.url("/v1/users/me"))).await.0, 200);
    let (s, _) = call(h.http.delete(h.url("/v1/users/rita"))).await;
    assert_eq!(s, 200);
    assert_all_dead(&h, &access, &refresh, &api).await;
}

async fn store(h: &Harness) -> otherix_store::Store {
    otherix_store::Store::connect(&[h.etcd.endpoint()], Duration::from_secs(5)).await.unwrap()
}

/// Every idempotency record, raw.
async fn idempotency_records(h: &Harness) -> Vec<(String, Vec<u8>)> {
    let s = store(h).await;
    let mut out = Vec::new();
    for (key, _) in s.list::<IdempotencyRecord>("idempotency/").await.unwrap() {
        let rel = key.trim_start_matches("/otherix/").to_owned();
        if let Some(raw) = s.get_raw(&rel).await.unwrap() {
            out.push((rel, raw));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn grpc_framed(payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8];
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

#[tokio::test]
async fn idempotency_records_keep_no_guessable_hash_of_a_password() {
    let h = Harness::start().await;
    h.user_token("dana", "developer").await;
    let password = "dana-new-password-42";
    let req = UpdateUserRequest { user: "dana".into(), password: Some(password.into()), ..Default::default() };
    let encoded = prost::Message::encode_to_vec(&req);
    let mut users = UserServiceClient::new(h.authed(Some(&h.admin_token)).await);
    let mut r = tonic::Request::new(req.clone());
    r.metadata_mut().insert("idempotency-key", "set-dana-password".parse().unwrap());
    users.update_user(r).await.unwrap();
    login(&h.anon, &h.base, "dana", password).await;
    // The replay still works.
    let mut r = tonic::Request::new(req.clone());
    r.metadata_mut().insert("idempotency-key", "set-dana-password".parse().unwrap());
    users.update_user(r).await.unwrap();

    let records = idempotency_records(&h).await;
    assert_eq!(records.len(), 1, "{records:?}");
    for (key, raw) in &records {
        for (what, needle) in [
            ("the password", password.as_bytes().to_vec()),
            ("sha256 of the request", Sha256::digest(&encoded).to_vec()),
            ("sha256 of the framed request", Sha256::digest(grpc_framed(&encoded)).to_vec()),
        ] {
            assert!(!contains(raw, &needle), "{key} holds {what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_idempotent_call_can_be_retried_at_once() {
    let h = Harness::start().await;
    h.user_token("erin", "developer").await;
    let req = UpdateUserRequest {
        user: "erin".into(),
        password: Some("erin-new-password-1".into()),
        request_id: "erin-reset-1".into(),
        ..Default::default()
    };
    let mut users = UserServiceClient::new(h.authed(Some(&h.admin_token)).await);
    let call = {
        let (mut users, req) = (users.clone(), req.clone());
        tokio::spawn(async move { users.update_user(req).await })
    };
    // Cancel the call while its key is held (the password is being hashed):
    // what a client deadline or a disconnect does.
    let mut seen = false;
    for _ in 0..2000 {
        if !idempotency_records(&h).await.is_empty() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    call.abort();
    assert!(seen, "the call never held its key");
    let cancelled = call.await;
    assert!(cancelled.is_err_and(|e| e.is_cancelled()), "the call finished before it was cancelled");
    // At once, with the same key: runs (or replays), never 409 in progress.
    let again = users.update_user(req.clone()).await;
    assert!(again.is_ok(), "retry refused: {:?}", again.err().map(|e| ApiError::from_status(&e)));
    login(&h.anon, &h.base, "erin", "erin-new-password-1").await;
}

#[tokio::test]
async fn a_path_without_an_access_rule_is_refused() {
    let h = Harness::start().await;
    let pool = prost_reflect::DescriptorPool::decode(otherix_proto::FILE_DESCRIPTOR_SET).unwrap();
    let method = pool
        .get_service_by_name("otherix.v1.UserService")
        .unwrap()
        .methods()
        .find(|m| m.name() == "ListUsers")
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(h.grpc_channel().await);
    grpc.ready().await.unwrap();
    // No token, and a path the access table does not know: it used to pass as anonymous.
    let pq: http::uri::PathAndQuery = "/otherix.v1.UserService/NoSuchMethod".parse().unwrap();
    let req = tonic::Request::new(prost_reflect::DynamicMessage::new(method.input()));
    let err = grpc.unary(req, pq, DynamicCodec(method.clone())).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert_eq!(ApiError::from_status(&err).details["reason"], "no_access_rule");
    // Health stays open without a rule.
    let mut health = tonic_health::pb::health_client::HealthClient::new(h.grpc_channel().await);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
}

async fn admin_count(h: &Harness) -> usize {
    store(h)
        .await
        .list::<otherix_proto::otherix::store::v1::UserRecord>("users/")
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, u)| u.value.role == "admin")
        .count()
}

async fn token(h: &Harness, username: &str) -> String {
    login(&h.anon, &h.base, username, &format!("{username}-password-12")).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_demotions_leave_an_admin() {
    let h = Harness::start().await;
    for name in ["ann", "bob"] {
        let (s, body) = call(
            h.http
                .post(h.url("/v1/users"))
                .json(&json!({"username": name, "password": format!("{name}-password-12"), "role": "admin"})),
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    // Two admins left: ann and bob.
    let ann = token(&h, "ann").await;
    let (s, body) = call(client_with(&ann).delete(h.url(&format!("/v1/users/{ADMIN}")))).await;
    assert_eq!(s, 200, "{body}");
    for round in 0..5 {
        assert_eq!(admin_count(&h).await, 2);
        let (ann, bob) = (token(&h, "ann").await, token(&h, "bob").await);
        // ann demotes bob while bob demotes ann.
        let a = tokio::spawn(call(client_with(&ann).patch(h.url("/v1/users/bob")).json(&json!({"role": "viewer"}))));
        let b = tokio::spawn(call(client_with(&bob).patch(h.url("/v1/users/ann")).json(&json!({"role": "viewer"}))));
        let (ra, rb) = (a.await.unwrap(), b.await.unwrap());
        let admins = admin_count(&h).await;
        assert!(admins >= 1, "round {round}: no admin left ({ra:?}, {rb:?})");
        assert!(ra.0 != 200 || rb.0 != 200, "round {round}: both demotions passed");
        // The survivor makes the other an admin again.
        let (keeper, other) = match (ra.0, rb.0) {
            (200, _) => ("ann", "bob"),
            (_, 200) => ("bob", "ann"),
            _ => continue,
        };
        let keeper_token = token(&h, keeper).await;
        let (s, body) = call(
            client_with(&keeper_token).patch(h.url(&format!("/v1/users/{other}"))).json(&json!({"role": "admin"})),
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
}

#[tokio::test]
async fn api_tokens_per_user_are_capped() {
    let h = Harness::start_config(|c| c.auth.max_api_tokens_per_user = 3).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (s, body) =
            call(h.http.post(h.url("/v1/users/me/api-tokens")).json(&json!({"name": format!("t{i}")}))).await;
        assert_eq!(s, 200, "{body}");
        ids.push(body["api_token"]["id"].as_str().unwrap().to_owned());
    }
    let (s, body) = call(h.http.post(h.url("/v1/users/me/api-tokens")).json(&json!({"name": "t3"}))).await;
    assert_eq!((s, code(&body)), (409, "resource_in_use"), "{body}");
    assert_eq!(body["error"]["details"]["limit"], 3);
    // A revoked token frees its place.
    let (s, _) = call(h.http.delete(h.url(&format!("/v1/users/me/api-tokens/{}", ids[0])))).await;
    assert_eq!(s, 200);
    let (s, body) = call(h.http.post(h.url("/v1/users/me/api-tokens")).json(&json!({"name": "t3"}))).await;
    assert_eq!(s, 200, "{body}");
}

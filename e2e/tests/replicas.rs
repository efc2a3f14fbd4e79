//! Two otherix-api processes on one etcd: each serves authentication from
//! its own watch-fed caches, and a revocation made through one replica bites
//! at once there and within a second on the other.

use std::time::{Duration, Instant};

use otherix_e2e::{ADMIN_EMAIL, ADMIN_PASSWORD, ApiProcess, http};
use otherix_testkit::TestEtcd;
use serde_json::{Value, json};

async fn call(r: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn login(base: &str, ident: (&str, &str), password: &str) -> Value {
    let (s, body) =
        call(http().post(format!("{base}/v1/auth/login")).json(&json!({ident.0: ident.1, "password": password}))).await;
    assert_eq!(s, 200, "login: {body}");
    body
}

fn bearer(r: reqwest::RequestBuilder, token: &str) -> reqwest::RequestBuilder {
    r.header("authorization", format!("Bearer {token}"))
}

async fn me(base: &str, token: &str) -> u16 {
    call(bearer(http().get(format!("{base}/v1/users/me")), token)).await.0
}

/// Polls until `token` is refused on `base`; returns how long that took.
async fn refused_within(base: &str, token: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if me(base, token).await == 401 {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{token:.12}… still accepted on {base} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn revocation_reaches_the_other_replica_within_a_second() {
    let etcd = TestEtcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let section = |key: Option<&std::path::Path>| {
        let mut s = format!("  endpoints: [{}]\n", etcd.endpoint());
        if let Some(k) = key {
            s.push_str(&format!("  encryption:\n    key_file: {}\n", k.display()));
        }
        s
    };
    let a = ApiProcess::start_on_etcd(&da, &section(None)).await;
    // The second replica shares the first one's secrets key, as every replica must.
    let key = da.join("api-state/secrets/etcd-encryption.key");
    assert!(key.is_file(), "the first replica made no secrets key at {}", key.display());
    let b = ApiProcess::start_on_etcd(&db, &section(Some(&key))).await;
    let (ra, rb) = (a.base.clone(), b.base.clone());

    // A session made on A works on B at once (a miss is checked against the store).
    let session = login(&ra, ("email", ADMIN_EMAIL), ADMIN_PASSWORD).await;
    let jwt = session["access_token"].as_str().unwrap().to_owned();
    assert_eq!(me(&rb, &jwt).await, 200);
    assert_eq!(me(&ra, &jwt).await, 200);

    // Logout on A: refused on A at once, on B within a second.
    let (s, _) = call(
        bearer(http().post(format!("{ra}/v1/auth/logout")), &jwt)
            .json(&json!({"refresh_token": session["refresh_token"]})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(me(&ra, &jwt).await, 401, "logout did not bite at once on the replica that did it");
    let logout_lag = refused_within(&rb, &jwt, Duration::from_secs(1)).await;

    // An API token made on A, revoked on B: refused on B at once, on A within a second.
    let admin = login(&rb, ("email", ADMIN_EMAIL), ADMIN_PASSWORD).await["access_token"].as_str().unwrap().to_owned();
    let (s, made) =
        call(bearer(http().post(format!("{ra}/v1/users/me/api-tokens")), &admin).json(&json!({"name": "replicated"})))
            .await;
    assert_eq!(s, 200, "{made}");
    let otx = made["plaintext_token"].as_str().unwrap().to_owned();
    let token_id = made["api_token"]["id"].as_str().or(made["token"]["id"].as_str()).unwrap_or_default().to_owned();
    assert!(!token_id.is_empty(), "no token id in {made}");
    assert_eq!(me(&rb, &otx).await, 200);
    assert_eq!(me(&ra, &otx).await, 200);
    let (s, body) = call(bearer(http().delete(format!("{rb}/v1/users/me/api-tokens/{token_id}")), &admin)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(me(&rb, &otx).await, 401);
    let revoke_lag = refused_within(&ra, &otx, Duration::from_secs(1)).await;

    // A role change on A ends the user's sessions: on B within a second.
    let (s, body) = call(bearer(http().post(format!("{ra}/v1/users")), &admin).json(&json!({
        "username": "vic", "email": "vic@example.com", "password": "vic-password-123", "role": "operator"
    })))
    .await;
    assert_eq!(s, 200, "{body}");
    let vic = login(&rb, ("username", "vic"), "vic-password-123").await["access_token"].as_str().unwrap().to_owned();
    assert_eq!(me(&rb, &vic).await, 200);
    let (s, body) =
        call(bearer(http().patch(format!("{ra}/v1/users/vic")), &admin).json(&json!({"role": "viewer"}))).await;
    assert_eq!(s, 200, "{body}");
    let role_lag = refused_within(&rb, &vic, Duration::from_secs(1)).await;

    // A user deleted on B: refused on A within a second.
    let vic = login(&ra, ("username", "vic"), "vic-password-123").await["access_token"].as_str().unwrap().to_owned();
    assert_eq!(me(&ra, &vic).await, 200);
    let (s, body) = call(bearer(http().delete(format!("{rb}/v1/users/vic")), &admin)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(me(&rb, &vic).await, 401);
    let delete_lag = refused_within(&ra, &vic, Duration::from_secs(1)).await;

    eprintln!(
        "revocation lag on the other replica: logout {logout_lag:?}, token revoke {revoke_lag:?}, \
         role change {role_lag:?}, user delete {delete_lag:?}"
    );
}

//! Parallel wrong logins against a real etcd and the control plane on a real
//! port: the limits are reserved before the password check. One test in its
//! own process, because the password hashing pool is per process and these
//! bursts fill it on purpose.

mod common;

use common::{ADMIN, ADMIN_EMAIL, ADMIN_PASSWORD, Harness};
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

/// Fires the login bodies in parallel; returns (401s, 429s) and checks there is nothing else.
async fn parallel_logins(h: &Harness, bodies: Vec<Value>) -> (usize, usize) {
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let (http, url) = (h.anon.clone(), h.url("/v1/auth/login"));
            tokio::spawn(async move { call(http.post(url).json(&b)).await })
        })
        .collect();
    let (mut unauthorized, mut limited) = (0, 0);
    for t in tasks {
        let (s, body) = t.await.unwrap();
        match (s, code(&body)) {
            (401, "invalid_credentials") => unauthorized += 1,
            (429, "rate_limited") => {
                assert!(body["error"]["details"]["retry_after_seconds"].as_u64().unwrap() >= 1, "{body}");
                limited += 1;
            }
            other => panic!("unexpected answer {other:?}: {body}"),
        }
    }
    (unauthorized, limited)
}

async fn one_account() {
    let h = Harness::start().await;
    // One account, by username and by email alike: one bucket of 10.
    let bodies = (0..40)
        .map(|i| {
            let password = format!("wrong-password-{i}");
            if i % 2 == 0 {
                json!({"username": ADMIN, "password": password})
            } else {
                json!({"email": ADMIN_EMAIL.to_uppercase(), "password": password})
            }
        })
        .collect();
    let (unauthorized, limited) = parallel_logins(&h, bodies).await;
    assert!(unauthorized <= 10, "{unauthorized} wrong passwords were checked for one account (limit 10)");
    assert!(unauthorized >= 1, "no password was checked at all");
    assert_eq!(unauthorized + limited, 40);
    // While locked, even the right password is refused.
    let (s, body) =
        call(h.anon.post(h.url("/v1/auth/login")).json(&json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})))
            .await;
    assert_eq!((s, code(&body)), (429, "rate_limited"));
}

async fn one_address() {
    let h = Harness::start().await;
    let bodies = (0..150).map(|i| json!({"username": format!("nobody-{i}"), "password": "wrong-password"})).collect();
    let (unauthorized, limited) = parallel_logins(&h, bodies).await;
    assert!(unauthorized <= 50, "{unauthorized} logins were checked from one address (limit 50)");
    assert_eq!(unauthorized + limited, 150);
    // The address is now spent: a further unknown name is refused unchecked.
    let (s, body) =
        call(h.anon.post(h.url("/v1/auth/login")).json(&json!({"username": "nobody-x", "password": "wrong-pass"})))
            .await;
    assert!(unauthorized < 50 || (s, code(&body)) == (429, "rate_limited"), "{s} {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_wrong_logins_are_counted_before_the_password_check() {
    // One after the other: both fill the same per-process hashing pool.
    one_account().await;
    one_address().await;
}

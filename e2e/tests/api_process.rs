//! otherix-api as a process: its own etcd member never outlives it, and
//! what it stored survives a kill -9.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use otherix_e2e::{ApiProcess, alive, binary, eventually, http};
use serde_json::{Value, json};

fn etcd_pid(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join("api-state/etcd.pid")).unwrap().trim().parse().unwrap()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

#[tokio::test]
async fn kill_9_leaves_no_etcd_behind_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let http = http();
    let mut api = ApiProcess::start(dir.path(), "").await;
    let url = format!("{}/v1/cluster/default-pool", api.base);
    let jwt = api.login().await;
    let r = http.put(&url).bearer_auth(&jwt).json(&json!({"name": "survives-crash"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("{}/v1/users/me/api-tokens", api.base))
        .bearer_auth(&jwt)
        .json(&json!({"name": "ci"}))
        .send()
        .await
        .unwrap();
    let api_token = r.json::<Value>().await.unwrap()["plaintext_token"].as_str().unwrap().to_owned();
    let r = http
        .post(format!("{}/v1/users", api.base))
        .bearer_auth(&jwt)
        .json(&json!({"username": "survivor", "password": "survivor-password", "role": "viewer"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first_etcd = etcd_pid(dir.path());
    assert!(alive(first_etcd));

    api.kill();
    let gone = eventually(Duration::from_secs(10), async || !alive(first_etcd)).await;
    assert!(gone, "etcd member {first_etcd} outlived its kill -9ed control plane");

    api.restart().await;
    // The JWT and the API token issued before the crash still work, and so
    // does the user created then.
    let body: Value = http.get(&url).bearer_auth(&jwt).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["name"], "survives-crash", "{body}");
    let me: Value = http
        .get(format!("{}/v1/users/me", api.base))
        .bearer_auth(&api_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["username"], "admin");
    let r = http
        .post(format!("{}/v1/auth/login", api.base))
        .json(&json!({"username": "survivor", "password": "survivor-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let second_etcd = etcd_pid(dir.path());
    assert_ne!(second_etcd, first_etcd);

    // A clean stop takes the member down and removes its pidfile.
    signal(api.process.0.id(), libc::SIGTERM);
    let status = api.process.0.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!alive(second_etcd));
    assert!(!dir.path().join("api-state/etcd.pid").exists());
}

#[tokio::test]
async fn an_invalid_config_names_the_key_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "server:\n  listen: not-an-address\n").unwrap();
    let out = Command::new(binary("otherix-api")).arg("--config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.listen"), "{err}");

    let out = Command::new(binary("otherix-api"))
        .arg("--config")
        .arg(&path)
        .env("OTHERIX_SERVER__LISTEN", "127.0.0.1:1")
        .env("OTHERIX_ETCD__REQUEST_TIMEOUT_SECONDS", "many")
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("etcd.request_timeout_seconds"));
}

//! `/openapi.json` as a REST team uses it: it validates as OpenAPI 3.1
//! (openapi-spec-validator from PyPI), and a client generated from it with
//! openapi-python-client logs in and lists users against a running otherix-api.

use std::process::Command;

use otherix_e2e::{ADMIN_EMAIL, ADMIN_PASSWORD, ApiProcess, python_venv, repo_root, run};
use serde_json::Value;

#[tokio::test]
async fn openapi_validates_and_a_generated_client_logs_in_and_lists_users() {
    let root = repo_root();
    let bin = python_venv("openapi-venv", "e2e/openapi/requirements.txt");
    let dir = tempfile::tempdir().unwrap();
    let api = ApiProcess::start(dir.path(), "").await;
    let doc = otherix_e2e::http().get(format!("{}/openapi.json", api.base)).send().await.unwrap();
    assert_eq!(doc.status(), 200);
    let spec = dir.path().join("openapi.json");
    std::fs::write(&spec, doc.bytes().await.unwrap()).unwrap();

    let out = run(Command::new(bin.join("openapi-spec-validator")).arg(&spec));
    assert!(out.contains("OK"), "{out}");

    let gen_dir = dir.path().join("gen");
    std::fs::create_dir(&gen_dir).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    run(Command::new(bin.join("openapi-python-client"))
        .args(["generate", "--meta", "none", "--path"])
        .arg(&spec)
        .arg("--output-path")
        .arg(gen_dir.join("otherix_rest"))
        .env("PATH", &path));

    let out = run(Command::new(bin.join("python"))
        .arg(root.join("e2e/openapi/client_smoke.py"))
        .arg(&gen_dir)
        .arg("otherix_rest")
        .arg(&api.base)
        .arg(ADMIN_EMAIL)
        .arg(ADMIN_PASSWORD));
    drop(api);
    let summary: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["user"], "admin");
    assert_eq!(summary["users"], serde_json::json!(["admin"]));
    assert_eq!(summary["anonymous_status"], 401);
    assert_eq!(summary["anonymous_code"], "unauthenticated");
}

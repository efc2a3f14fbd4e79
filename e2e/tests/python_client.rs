//! Teams in other languages use `proto/` as it is: a Python client generated
//! with grpcio-tools (from PyPI) logs in, creates an API token and lists
//! users against a running otherix-api.

use std::path::PathBuf;
use std::process::Command;

use otherix_e2e::{ADMIN_EMAIL, ADMIN_PASSWORD, ApiProcess, python_venv, repo_root, run};
use serde_json::Value;

#[tokio::test]
async fn a_generated_python_client_logs_in_creates_a_token_and_lists_users() {
    let root = repo_root();
    let python = python_venv("py-venv", "e2e/python/requirements.txt").join("python");
    let gen_dir = tempfile::tempdir().unwrap();
    let protos: Vec<PathBuf> = ["otherix/v1", "google/api", "google/rpc"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join("proto").join(d)).unwrap().map(|e| e.unwrap().path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .map(|p| p.strip_prefix(root.join("proto")).unwrap().to_owned())
        .collect();
    run(Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I", "."])
        .arg(format!("--python_out={}", gen_dir.path().display()))
        .arg(format!("--grpc_python_out={}", gen_dir.path().display()))
        .args(&protos)
        .current_dir(root.join("proto")));

    let dir = tempfile::tempdir().unwrap();
    let api = ApiProcess::start(dir.path(), "").await;
    let target = api.base.trim_start_matches("http://").to_owned();

    let out = run(Command::new(&python)
        .arg(root.join("e2e/python/client_smoke.py"))
        .arg(gen_dir.path())
        .arg(&target)
        .arg(ADMIN_EMAIL)
        .arg(ADMIN_PASSWORD));
    drop(api);
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["user"], "admin");
    assert_eq!(summary["role"], "admin");
    assert_eq!(summary["token_prefix"], "otx_");
    assert_eq!(summary["token_name"], "python-client");
    assert_eq!(summary["users"], serde_json::json!(["admin"]));
    assert_eq!(summary["anonymous"], "UNAUTHENTICATED/unauthenticated");
    // Validation errors carry a google.rpc.BadRequest naming the field.
    assert_eq!(summary["invalid"]["code"], "INVALID_ARGUMENT/validation_failed", "{summary}");
    assert_eq!(summary["invalid"]["fields"], serde_json::json!(["name"]), "{summary}");
}

//! Web teams against a running otherix-api: a page on another origin in
//! headless Chromium (Debian's package, driven by puppeteer-core) making
//! grpc-web calls, and a client generated with protoc-gen-es calling over
//! connect-web's grpc-web transport.

use std::path::{Path, PathBuf};
use std::process::Command;

use otherix_e2e::{ADMIN_EMAIL, ADMIN_PASSWORD, ApiProcess, repo_root as root, run};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// clients/ts with its pinned npm packages installed (`make deps` does it too).
fn ts_dir() -> PathBuf {
    let dir = root().join("clients/ts");
    if !dir.join("node_modules/@connectrpc/connect-web").is_dir() {
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund", "--silent"]).current_dir(&dir));
    }
    dir
}

/// Serves `page` to every request on 127.0.0.1 (a second origin), until dropped.
async fn serve_page(page: String) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let page = page.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let (status, body) =
                    if seen.starts_with(b"GET / ") { ("200 OK", page) } else { ("404 Not Found", String::new()) };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (port, task)
}

/// Runs the browser on `url` off the async threads (the page server must keep serving).
async fn browse(ts: &Path, url: &str) -> Value {
    browse_with(ts, url, &[]).await
}

async fn browse_with(ts: &Path, url: &str, extra: &[&str]) -> Value {
    let (ts, url) = (ts.to_owned(), url.to_owned());
    let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new("node").arg(ts.join("browser-grpc-web.mjs")).arg(url).args(extra).current_dir(ts))
    })
    .await
    .unwrap();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test]
async fn a_page_on_another_origin_makes_grpc_web_calls() {
    let ts = ts_dir();
    let dir = tempfile::tempdir().unwrap();
    // Only 127.0.0.1 pages may call; the same page loaded as localhost may not.
    let cors = "  cors:\n    allowed_origins: [\"http://127.0.0.1:*\"]\n";
    let api = ApiProcess::start_with(dir.path(), cors, "").await;
    let page = std::fs::read_to_string(ts.join("browser-page.html"))
        .unwrap()
        .replace("__API_BASE__", &api.base)
        .replace("__EMAIL__", ADMIN_EMAIL)
        .replace("__PASSWORD__", ADMIN_PASSWORD);
    let (port, server) = serve_page(page).await;

    let allowed = browse(&ts, &format!("http://127.0.0.1:{port}/")).await;
    assert_eq!(allowed["ok"], true, "{allowed}");
    assert_ne!(allowed["origin"].as_str(), Some(api.base.as_str()), "the page must be on another origin");
    assert_eq!(allowed["login_status"], "0", "{allowed}");
    assert_eq!(allowed["me_status"], "0", "{allowed}");
    assert_eq!(allowed["username"], "admin", "{allowed}");
    // grpc-status is readable cross-origin: exposed by CORS.
    assert_eq!(allowed["anonymous_status"], "16", "{allowed}");

    // The browser refuses the same calls from an origin the API does not allow.
    let refused = browse(&ts, &format!("http://localhost:{port}/")).await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("Failed to fetch"), "{refused}");
    server.abort();

    // The reference page at /docs renders every operation of /openapi.json.
    let doc: Value =
        otherix_e2e::http().get(format!("{}/openapi.json", api.base)).send().await.unwrap().json().await.unwrap();
    let operations: usize = doc["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
    let docs = browse_with(&ts, &format!("{}/docs", api.base), &["--count", "details"]).await;
    assert_eq!(docs["count"], operations, "{docs}");
}

#[tokio::test]
async fn a_generated_typescript_client_logs_in_lists_users_and_reads_error_info() {
    let ts = ts_dir();
    // Generated inside clients/ts so the code finds the pinned packages.
    let gen_dir = tempfile::Builder::new().prefix(".gen-").tempdir_in(&ts).unwrap();
    let proto = root().join("proto");
    let files: Vec<PathBuf> = ["otherix/v1", "google/api", "google/rpc"]
        .iter()
        .flat_map(|d| std::fs::read_dir(proto.join(d)).unwrap().map(|e| e.unwrap().path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .map(|p| p.strip_prefix(&proto).unwrap().to_owned())
        .collect();
    run(Command::new("protoc")
        .arg(format!("--plugin=protoc-gen-es={}", ts.join("node_modules/.bin/protoc-gen-es").display()))
        .arg(format!("--es_out={}", gen_dir.path().display()))
        .arg("--es_opt=target=js,import_extension=js")
        .arg("-I.")
        .args(&files)
        .current_dir(&proto));

    let dir = tempfile::tempdir().unwrap();
    let api = ApiProcess::start(dir.path(), "").await;
    let out = run(Command::new("node")
        .arg(ts.join("scenario.mjs"))
        .arg(gen_dir.path())
        .arg(&api.base)
        .arg(ADMIN_EMAIL)
        .arg(ADMIN_PASSWORD)
        .current_dir(&ts));
    drop(api);
    let summary: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["user"], "admin");
    assert_eq!(summary["role"], "admin");
    assert_eq!(summary["users"], serde_json::json!(["admin"]));
    // connect's Code.Unauthenticated is 16, InvalidArgument 3.
    assert_eq!(summary["anonymous"]["code"], 16, "{summary}");
    assert_eq!(summary["anonymous"]["reason"], "unauthenticated", "{summary}");
    assert_eq!(summary["anonymous"]["domain"], "otherix.dev", "{summary}");
    assert_eq!(summary["invalid"]["code"], 3, "{summary}");
    assert_eq!(summary["invalid"]["reason"], "validation_failed", "{summary}");
    assert_eq!(summary["invalid"]["violations"], serde_json::json!(["name"]), "{summary}");
    assert!(summary["error_codes"].as_u64().unwrap() > 30, "{summary}");
}

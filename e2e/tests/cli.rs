//! The `otherix` CLI as an operator runs it, against a real otherix-api
//! process with a simulated enrolled agent (real join, real mTLS heartbeat).

use std::process::{Command, Output, Stdio};

use otherix_e2e::{ApiProcess, binary, http};
use otherix_proto::otherix::agent::v1::enrolment_service_client::EnrolmentServiceClient;
use otherix_proto::otherix::agent::v1::heartbeat_service_client::HeartbeatServiceClient;
use otherix_proto::otherix::agent::v1::{Capabilities, HeartbeatRequest, JoinRequest, Resources};
use serde_json::Value;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn otherix(endpoint: Option<&str>, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(binary("otherix"));
    cmd.args(args).env_remove("OTHERIX_SERVER").env_remove("OTHERIX_API_TOKEN").stdin(Stdio::null());
    if let Some(e) = endpoint {
        cmd.env("OTHERIX_SERVER", e);
    }
    if let Some(t) = token {
        cmd.env("OTHERIX_API_TOKEN", t);
    }
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn operators_manage_nodes_and_join_tokens_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiProcess::start(dir.path(), "").await;
    let (base, agent_port) = (api.base.clone(), api.agent_port);

    // The CLI refuses to guess where to go or who it is.
    let out = otherix(None, None, &["node", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no endpoint configured"), "{}", text(&out.stderr));
    let out = otherix(Some(&base), None, &["node", "list"]);
    assert!(text(&out.stderr).contains("no token configured"));
    let out = otherix(Some(&base), Some("otx_wrongwrongwrongwrongwrongwrongwrongwrongwro"), &["node", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).starts_with("api_error: unauthenticated: "), "{}", text(&out.stderr));
    let out = otherix(Some("http://127.0.0.1:1"), Some("x"), &["node", "list"]);
    assert!(text(&out.stderr).starts_with("connection_refused: "), "{}", text(&out.stderr));

    let token = api.login().await;
    let cli = |args: &[&str]| otherix(Some(&base), Some(&token), args);

    // The seed's seed-dev step: a join token as JSON.
    let out = cli(&["node", "join-token", "create", "--node-name", "node-dev", "--ttl", "10m", "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let join_token = created["token"].as_str().unwrap().to_owned();
    assert!(join_token.starts_with("otx_join_"));
    assert!(created["ca_fingerprint_sha256"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(created["join_token"]["max_uses"], 1);
    let out = cli(&["node", "join-token", "list"]);
    assert!(text(&out.stdout).contains("node-dev") && text(&out.stdout).contains("0/1"), "{}", text(&out.stdout));

    // An agent joins and reports (simulated: real CSR, join and mTLS stream).
    let ca: Value = http().get(format!("{base}/v1/ca")).send().await.unwrap().json().await.unwrap();
    let ca_pem = ca["ca_cert_pem"].as_str().unwrap().to_owned();
    let url = format!("https://localhost:{agent_port}");
    let (key, csr) = otherix_pki::generate_agent_key_and_csr("node-dev").unwrap();
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)).domain_name("localhost");
    let ch = Endpoint::from_shared(url.clone()).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let joined = EnrolmentServiceClient::new(ch)
        .join(JoinRequest {
            token: join_token,
            csr_pem: csr,
            node_name: "node-dev".into(),
            architecture: "arm64".into(),
            advertised_endpoint: "127.0.0.1:9443".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let out = cli(&["node", "list"]);
    let listing = text(&out.stdout);
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["NAME", "ARCHITECTURE", "STATUS", "CORDONED", "AGE"]);
    assert_eq!(lines[1].split_whitespace().take(4).collect::<Vec<_>>(), ["node-dev", "arm64", "pending", "no"]);

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .identity(Identity::from_pem(&joined.cert_pem, &key))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(url).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let report = HeartbeatRequest {
        agent_version: "0.1.0".into(),
        architecture: "arm64".into(),
        capabilities: Some(Capabilities {
            cpu_cores: 4,
            memory_bytes: 8 << 30,
            accelerator: "kvm".into(),
            ..Default::default()
        }),
        resources: Some(Resources {
            cpu_available: 3,
            memory_available_bytes: 6 << 30,
            memory_total_bytes: 8 << 30,
            system_disk_total_bytes: 100 << 30,
            system_disk_free_bytes: 60 << 30,
        }),
        pools: vec![],
    };
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(report).await.unwrap();
    let mut answers = HeartbeatServiceClient::new(ch)
        .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    answers.message().await.unwrap().unwrap();

    let out = cli(&["node", "list"]);
    let row = text(&out.stdout).lines().nth(1).unwrap().split_whitespace().take(4).collect::<Vec<_>>().join(" ");
    assert_eq!(row, "node-dev arm64 ready no");
    let out = cli(&["node", "get", "node-dev"]);
    let shown = text(&out.stdout);
    for want in [
        "status: ready",
        "accelerator: kvm",
        "last_heartbeat: ",
        "cpu: 1 used / 4 total",
        "memory: 2.0GiB used / 8.0GiB total",
        "pressure:",
        "memory: ok",
    ] {
        assert!(shown.contains(want), "{want:?} missing from:\n{shown}");
    }
    let out = cli(&["node", "get", "node-dev", "-o", "json"]);
    let n: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n["capacity"]["cpu_cores"], 4);

    let out = cli(&["node", "cordon", "node-dev"]);
    assert_eq!(text(&out.stdout).trim(), "node node-dev cordoned");
    let row =
        text(&cli(&["node", "list"]).stdout).lines().nth(1).unwrap().split_whitespace().nth(3).unwrap().to_owned();
    assert_eq!(row, "yes");
    let out = cli(&["node", "get", "nope"]);
    assert!(text(&out.stderr).starts_with("api_error: not_found: "), "{}", text(&out.stderr));
    let out = cli(&["node", "delete", "node-dev"]);
    assert!(out.status.success());
    let out = cli(&["node", "list"]);
    assert_eq!(text(&out.stdout).lines().count(), 1, "only the header is left");
    drop(tx);
}

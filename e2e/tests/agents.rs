//! Node enrolment end to end, with the real `otherix-api` and real `otherix-agent`
//! processes (no QEMU): two agents on one machine bootstrap and become ready; replayed,
//! expired and mis-pinned joins are refused with the seed's log lines; a killed agent goes
//! unreachable and comes back with its existing cert material; a deleted key is fatal.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use otherix_e2e::{ApiProcess, KillOnDrop, binary, eventually, free_port, http};
use serde_json::{Value, json};

/// A running control plane with an admin session.
struct Cp {
    _api: ApiProcess,
    base: String,
    cp_url: String,
    jwt: String,
    http: reqwest::Client,
}

impl Cp {
    async fn start(dir: &Path) -> Cp {
        let api =
            ApiProcess::start(dir, "nodes:\n  heartbeat_interval_seconds: 1\n  stale_threshold_seconds: 3\n").await;
        let jwt = api.login().await;
        Cp {
            base: api.base.clone(),
            cp_url: format!("https://127.0.0.1:{}", api.agent_port),
            jwt,
            http: http(),
            _api: api,
        }
    }

    /// A join token: (token, CA fingerprint, id).
    async fn join_token(&self, body: Value) -> (String, String, String) {
        let r = self
            .http
            .post(format!("{}/v1/nodes/join-tokens", self.base))
            .bearer_auth(&self.jwt)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        (
            v["token"].as_str().unwrap().to_owned(),
            v["ca_fingerprint_sha256"].as_str().unwrap().to_owned(),
            v["join_token"]["id"].as_str().unwrap().to_owned(),
        )
    }

    async fn revoke(&self, id: &str) {
        let r = self
            .http
            .delete(format!("{}/v1/nodes/join-tokens/{id}", self.base))
            .bearer_auth(&self.jwt)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    async fn node(&self, name: &str) -> Value {
        let r = self.http.get(format!("{}/v1/nodes/{name}", self.base)).bearer_auth(&self.jwt).send().await.unwrap();
        r.json().await.unwrap_or(Value::Null)
    }

    /// Waits up to `limit` for the node's status; returns how long it took.
    async fn wait_status(&self, name: &str, want: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        let ok = eventually(limit, async || self.node(name).await["status"] == want).await;
        assert!(ok, "node {name} never became {want} within {limit:?}: {}", self.node(name).await);
        start.elapsed()
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// A u64 from proto JSON (numbers, or strings for 64-bit fields).
fn num(v: &Value) -> u64 {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or_else(|| panic!("not a number: {v}"))
}

/// One agent's directories and listen port.
struct AgentDirs {
    root: PathBuf,
    port: u16,
}

impl AgentDirs {
    fn new(base: &Path, name: &str) -> AgentDirs {
        let root = base.join(name);
        std::fs::create_dir_all(&root).unwrap();
        AgentDirs { root, port: free_port() }
    }
    fn config(&self) -> PathBuf {
        self.root.join("agent.yaml")
    }
    fn state(&self) -> PathBuf {
        self.root.join("state")
    }
    fn certs(&self) -> PathBuf {
        self.state().join("certs")
    }
    fn log(&self) -> PathBuf {
        self.root.join("agent.log")
    }
    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Runs `otherix-agent bootstrap` to completion with only `env` (plus PATH) in its
/// environment.
fn bootstrap(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary("otherix-agent"));
    cmd.arg("bootstrap").args(args).env_clear().env("RUST_LOG", "info").stdin(Stdio::null());
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run otherix-agent bootstrap")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Starts `otherix-agent serve`, appending its log to the agent's log file.
fn serve(a: &AgentDirs) -> KillOnDrop {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(a.log()).unwrap();
    let child = Command::new(binary("otherix-agent"))
        .arg("serve")
        .arg("--config")
        .arg(a.config())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn otherix-agent serve");
    KillOnDrop(child)
}

/// A config written before bootstrap, with capacity caps, TCG and its own dirs.
fn write_config(a: &AgentDirs, extra: &str) {
    std::fs::write(
        a.config(),
        format!(
            "server:\n  listen: {ep}\nstorage:\n  pool_root: {pools}\ncapacity:\n  max_cpus: 1\n  max_memory_bytes: 1073741824\n\
             runtime:\n  state_dir: {state}\n  qemu:\n    accel: tcg\n{extra}",
            ep = a.endpoint(),
            pools = a.root.join("pools").display(),
            state = a.state().display(),
        ),
    )
    .unwrap();
}

fn pool<'a>(node: &'a Value, name: &str) -> Option<&'a Value> {
    node["pools"].as_array()?.iter().find(|p| p["name"] == name)
}

#[tokio::test]
async fn two_agents_enrol_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Cp::start(dir.path()).await;
    let (multi, fingerprint, _) = cp.join_token(json!({"max_uses": 5})).await;
    let (single, _, _) = cp.join_token(json!({"max_uses": 1})).await;

    // Agent A: the operator writes its config first (control plane, pin, name, caps of 1 CPU
    // and 1 GiB); bootstrap reads it, takes the token from a file, and leaves it as is.
    let a = AgentDirs::new(dir.path(), "a");
    write_config(
        &a,
        &format!(
            "bootstrap:\n  cp_url: {}\n  ca_fingerprint: {fingerprint}\n  node_name: agent-a\n  advertised_endpoint: {}\n",
            cp.cp_url,
            a.endpoint()
        ),
    );
    let config_before = read(&a.config());
    let token_file = a.root.join("token");
    std::fs::write(&token_file, format!("{multi}\n")).unwrap();
    let out =
        bootstrap(&["--token-path", token_file.to_str().unwrap(), "--config-path", a.config().to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("agent: bootstrap complete"), "{}", stderr(&out));
    use std::os::unix::fs::PermissionsExt as _;
    let key_mode = std::fs::metadata(a.certs().join("agent.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    assert_eq!(read(&a.config()), config_before, "an existing config is left as is");

    // Agent B: every bootstrap input from the environment (the seed's bootstrap.env), the
    // token itself included; a 2 GiB memory cap; bootstrap writes its config.
    let b = AgentDirs::new(dir.path(), "b");
    let out = bootstrap(
        &[
            "--state-dir",
            b.state().to_str().unwrap(),
            "--listen",
            &b.endpoint(),
            "--config-path",
            b.config().to_str().unwrap(),
        ],
        &[
            ("OTHERIX_BOOTSTRAP__CP_URL", &cp.cp_url),
            ("OTHERIX_BOOTSTRAP__TOKEN", &single),
            ("OTHERIX_BOOTSTRAP__CA_FINGERPRINT", &fingerprint),
            ("OTHERIX_BOOTSTRAP__NODE_NAME", "agent-b"),
            ("OTHERIX_BOOTSTRAP__ADVERTISED_ENDPOINT", &b.endpoint()),
            ("OTHERIX_CAPACITY__MAX_MEMORY_BYTES", "2147483648"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("agent: bootstrap complete"), "{}", stderr(&out));
    let written = read(&b.config());
    assert!(written.contains("agent-b") && !written.contains(&single), "{written}");

    // Both serve and are ready within one heartbeat of starting.
    let _a_proc = serve(&a);
    let _b_proc = serve(&b);
    // The first report goes out as the stream opens: ready well within one heartbeat
    // interval of the agent's (30 s in these configs until the control plane's 1 s arrives).
    for name in ["agent-a", "agent-b"] {
        let took = cp.wait_status(name, "ready", Duration::from_secs(20)).await;
        assert!(took < Duration::from_secs(15), "{name} took {took:?}");
    }
    for (a_, name) in [(&a, "agent-a"), (&b, "agent-b")] {
        let ok = eventually(Duration::from_secs(10), async || {
            pool(&cp.node(name).await, "default").is_some_and(|p| p["reconciliation_status"] == "ready")
        })
        .await;
        let n = cp.node(name).await;
        assert!(ok, "{name}: no default pool: {n}\n{}", read(&a_.log()));
        // This machine's /dev/kvm cannot run guests: TCG (agent B chose it with accel: auto).
        assert_eq!(n["accelerator"], "tcg", "{n}");
        let p = pool(&n, "default").unwrap();
        let path = PathBuf::from(p["path"].as_str().unwrap());
        assert!(path.is_dir(), "{n}");
        assert!(num(&p["capacity_bytes"]) > 0, "{n}");
        assert_eq!(n["advertised_endpoint"], a_.endpoint(), "{n}");
    }
    let na = cp.node("agent-a").await;
    let nb = cp.node("agent-b").await;
    assert_eq!(num(&na["capacity"]["cpu_cores"]), 1, "{na}");
    assert_eq!(num(&na["capacity"]["memory_bytes"]), 1 << 30, "{na}");
    assert_eq!(num(&na["capacity"]["cpu_available"]), 1, "{na}");
    let b_mem = num(&nb["capacity"]["memory_bytes"]);
    assert!(b_mem > 1 << 30 && b_mem <= 2 << 30, "{nb}");
    assert_eq!(pool(&na, "default").unwrap()["path"], a.root.join("pools/default").display().to_string());
    assert_eq!(pool(&nb, "default").unwrap()["path"], b.state().join("pools/default").display().to_string());

    // Refusals. A replayed single-use token: token_exhausted.
    let c = AgentDirs::new(dir.path(), "c");
    let base_args = |c: &AgentDirs| -> Vec<String> {
        vec![
            "--cp-url".into(),
            cp.cp_url.clone(),
            "--node-name".into(),
            "agent-c".into(),
            "--advertised-endpoint".into(),
            c.endpoint(),
            "--state-dir".into(),
            c.state().display().to_string(),
            "--config-path".into(),
            c.config().display().to_string(),
        ]
    };
    let run = |extra: &[&str]| {
        let mut args: Vec<String> = base_args(&c);
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        bootstrap(&refs, &[])
    };
    let out = run(&["--token", &single, "--ca-fingerprint", &fingerprint]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("bootstrap protocol: CSR submission rejected by CP: HTTP 401 token_exhausted"), "{err}");
    // A revoked (so expired) token: token_expired.
    let (revoked, _, id) = cp.join_token(json!({})).await;
    cp.revoke(&id).await;
    let out = run(&["--token", &revoked, "--ca-fingerprint", &fingerprint]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("HTTP 401 token_expired"), "{}", stderr(&out));
    // A wrong fingerprint: refused before joining, both values printed.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let out = run(&["--token", &multi, "--ca-fingerprint", &wrong]);
    assert!(!out.status.success());
    let err = stderr(&out);
    let want = format!("bootstrap: CA fingerprint mismatch (expected {wrong} got {fingerprint})");
    assert!(err.contains(&want), "want {want:?} in {err}");
    // Nothing was written by the refused runs.
    assert!(!c.certs().join("agent.key").exists() && !c.config().exists());
    // Without a token at all: a clear error.
    let out = run(&["--ca-fingerprint", &fingerprint]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no join token"), "{}", stderr(&out));
}

#[tokio::test]
async fn restart_keeps_the_identity_and_partial_state_is_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Cp::start(dir.path()).await;
    let (token, fingerprint, _) = cp.join_token(json!({"intended_node_name": "agent-r"})).await;

    // The seed-dev flow: `serve` with a bootstrap token in its config and no cert material
    // bootstraps first.
    let a = AgentDirs::new(dir.path(), "r");
    let token_file = a.root.join("bootstrap-token");
    std::fs::write(&token_file, &token).unwrap();
    write_config(
        &a,
        &format!(
            "bootstrap:\n  cp_url: {}\n  token_path: {}\n  ca_fingerprint: {fingerprint}\n  node_name: agent-r\n  advertised_endpoint: {}\n",
            cp.cp_url,
            token_file.display(),
            a.endpoint()
        ),
    );
    let mut agent = serve(&a);
    cp.wait_status("agent-r", "ready", Duration::from_secs(20)).await;
    assert!(read(&a.log()).contains("agent: bootstrap complete"), "{}", read(&a.log()));

    // SIGKILL: unreachable after the 3 s threshold.
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    let killed = Instant::now();
    cp.wait_status("agent-r", "unreachable", Duration::from_secs(15)).await;
    assert!(killed.elapsed() >= Duration::from_secs(1), "unreachable too soon");

    // Restarted: ready again with the same identity (the single-use token is spent, so it
    // could not have joined again).
    let log_before = read(&a.log()).len();
    let mut agent = serve(&a);
    cp.wait_status("agent-r", "ready", Duration::from_secs(20)).await;
    let log = read(&a.log())[log_before..].to_string();
    assert!(log.contains("agent: using existing cert material"), "{log}");
    assert!(!log.contains("bootstrap complete"), "{log}");

    // SIGTERM: a clean stop.
    // SAFETY: kill(2) has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(agent.0.id() as i32, libc::SIGTERM);
    }
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(read(&a.log()).contains("agent stopped"));

    // The key deleted, the cert kept: serve refuses to start.
    std::fs::remove_file(a.certs().join("agent.key")).unwrap();
    let out = Command::new(binary("otherix-agent"))
        .arg("serve")
        .arg("--config")
        .arg(a.config())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("partial bootstrap state"), "{err}");
    assert!(err.contains("agent.key"), "{err}");
}

/// A node's certificate never passes for the control plane: agent B's certificate is refused
/// by agent A's mTLS listener for its identity. Deleting B cuts it off: its heartbeat is
/// refused, it logs why and what to do, and it does not retry hot.
#[tokio::test]
async fn nodes_never_pass_for_the_control_plane_and_a_deleted_node_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Cp::start(dir.path()).await;
    let (token, fingerprint, _) = cp.join_token(json!({"max_uses": 2})).await;
    let start = |name: &str| {
        let a = AgentDirs::new(dir.path(), name);
        let token_file = a.root.join("bootstrap-token");
        std::fs::write(&token_file, &token).unwrap();
        write_config(
            &a,
            &format!(
                "bootstrap:\n  cp_url: {}\n  token_path: {}\n  ca_fingerprint: {fingerprint}\n  node_name: {name}\n  advertised_endpoint: {}\n",
                cp.cp_url,
                token_file.display(),
                a.endpoint()
            ),
        );
        let proc = serve(&a);
        (a, proc)
    };
    let (a, _a_proc) = start("agent-a");
    let (b, _b_proc) = start("agent-b");
    for name in ["agent-a", "agent-b"] {
        cp.wait_status(name, "ready", Duration::from_secs(20)).await;
    }

    // B calls A's VM API with its node certificate, accepting A's certificate the way the
    // control plane would: A refuses B in the handshake.
    let ca = read(&b.certs().join("ca.crt"));
    let tls = tonic::transport::ClientTlsConfig::new().domain_name("localhost").identity(
        tonic::transport::Identity::from_pem(read(&b.certs().join("agent.crt")), read(&b.certs().join("agent.key"))),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", a.endpoint()))
        .unwrap()
        .tls_config_with_verifier(tls, otherix_pki::node_server_verifier(&ca, "agent-a").unwrap())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let refused = match channel.connect().await {
        Err(_) => true,
        Ok(ch) => otherix_proto::otherix::agent::v1::vm_runtime_service_client::VmRuntimeServiceClient::new(ch)
            .list_pools(otherix_proto::otherix::agent::v1::ListPoolsRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "agent A served agent B");
    let needle = "not the control plane: the certificate of node \"agent-b\"";
    let ok = eventually(Duration::from_secs(5), async || read(&a.log()).contains(needle)).await;
    assert!(ok, "{}", read(&a.log()));

    // Delete B: refused from then on, with the reason and the remedy in its log, once.
    let r = cp.http.delete(format!("{}/v1/nodes/agent-b", cp.base)).bearer_auth(&cp.jwt).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let refusal = "heartbeat refused";
    let ok = eventually(Duration::from_secs(15), async || read(&b.log()).contains(refusal)).await;
    assert!(ok, "{}", read(&b.log()));
    let log = read(&b.log());
    assert!(log.contains("refused by the control plane: node_deleted"), "{log}");
    assert!(log.contains("the node was deleted from the cluster"), "{log}");
    assert!(log.contains("bootstrap again (otherix-agent bootstrap --force) with a fresh join token"), "{log}");
    // At the reconnect backoff (1 s, doubling) this would be several attempts by now.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let log = read(&b.log());
    assert_eq!(log.matches(refusal).count(), 1, "{log}");
    assert_eq!(cp.node("agent-b").await.get("name"), None, "agent-b was not re-created");
}

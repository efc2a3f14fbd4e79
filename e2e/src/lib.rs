//! Helpers for the end-to-end tests in `tests/`: the real binaries, run as a
//! user runs them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The path of a workspace binary built by `cargo build --workspace --bins`
/// (`make test` builds them first).
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}

/// Runs a command to completion and returns its stdout; a failure fails the
/// test with the command and both outputs.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A Python virtualenv named `name` under the target dir with the pinned
/// `requirements` (a path under the repository) installed; rebuilt only when
/// the requirements change. Returns its `bin` directory.
pub fn python_venv(name: &str, requirements: &str) -> PathBuf {
    let root = repo_root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let dir = target.join(name);
    let reqs = root.join(requirements);
    let stamp = dir.join(".requirements");
    let wanted = std::fs::read_to_string(&reqs).unwrap_or_else(|e| panic!("{}: {e}", reqs.display()));
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&dir);
        run(std::process::Command::new("python3").args(["-m", "venv"]).arg(&dir));
        run(std::process::Command::new(dir.join("bin/python"))
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&reqs));
        std::fs::write(&stamp, wanted).expect("write the venv stamp");
    }
    dir.join("bin")
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub async fn eventually(limit: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP client (rustls with the ring provider, as the binaries use).
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A child process that is killed when the guard drops, so a failing test
/// leaves nothing running.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The bootstrap admin every end-to-end control plane starts with.
pub const ADMIN_EMAIL: &str = "admin@otherix.local";
/// Its password.
pub const ADMIN_PASSWORD: &str = "correct-horse-battery-staple";

/// A real otherix-api process with its own etcd member, on free loopback
/// ports, its state and log in a directory the test owns.
#[derive(Debug)]
pub struct ApiProcess {
    /// The running process (killed on drop).
    pub process: KillOnDrop,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The agent listener's port.
    pub agent_port: u16,
    /// The config file, for restarts.
    pub config: PathBuf,
    /// The log file (appended across restarts).
    pub log: PathBuf,
}

impl ApiProcess {
    /// Writes a config into `dir` (`extra` is appended YAML, e.g. a `nodes:`
    /// section), starts otherix-api and waits until it is ready.
    pub async fn start(dir: &std::path::Path, extra: &str) -> ApiProcess {
        Self::start_with(dir, "", extra).await
    }

    /// Like [`ApiProcess::start`], with `server_extra` added under `server:`
    /// (indented YAML lines, e.g. `  cors:\n    allowed_origins: [...]\n`).
    pub async fn start_with(dir: &std::path::Path, server_extra: &str, extra: &str) -> ApiProcess {
        let text = format!(
            "state_dir: {state}\nserver:\n  listen: 127.0.0.1:{{port}}\n{server_extra}agent_server:\n  listen: 127.0.0.1:{{agent_port}}\n\
             etcd:\n  heartbeat_interval_ms: 10\n  election_timeout_ms: 100\n\
             logger:\n  level: info\n{extra}",
            state = dir.join("api-state").display()
        );
        Self::launch(dir, text).await
    }

    /// Starts otherix-api on an external etcd: `etcd_section` is the YAML
    /// under `etcd:` (indented lines, e.g. `  endpoints: [http://...]\n`).
    pub async fn start_on_etcd(dir: &std::path::Path, etcd_section: &str) -> ApiProcess {
        let text = format!(
            "state_dir: {state}\nserver:\n  listen: 127.0.0.1:{{port}}\nagent_server:\n  listen: 127.0.0.1:{{agent_port}}\n\
             etcd:\n{etcd_section}logger:\n  level: info\n",
            state = dir.join("api-state").display()
        );
        Self::launch(dir, text).await
    }

    /// Starts otherix-api with both listeners on port 0 (the kernel picks
    /// free ports, no bind-drop-rebind race), reads the ports it bound from
    /// `<state_dir>/run/listen.json`, and writes them into the config so a
    /// restart keeps them.
    async fn launch(dir: &std::path::Path, template: String) -> ApiProcess {
        let config = dir.join("api.yaml");
        std::fs::write(&config, template.replace("{port}", "0").replace("{agent_port}", "0"))
            .expect("write the api config");
        let listen = dir.join("api-state/run/listen.json");
        let _ = std::fs::remove_file(&listen);
        let log = dir.join("api.log");
        let process = Self::spawn(&config, &log).await;
        let bound = eventually(Duration::from_secs(60), async || listen.is_file()).await;
        let text = std::fs::read_to_string(&listen).unwrap_or_default();
        assert!(
            bound,
            "otherix-api did not record its ports; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let v: serde_json::Value = serde_json::from_str(&text).expect("listen.json");
        let port_of = |k: &str| -> u16 {
            v[k].as_str().and_then(|a| a.rsplit(':').next()?.parse().ok()).unwrap_or_else(|| panic!("no {k} in {text}"))
        };
        let (port, agent_port) = (port_of("addr"), port_of("agent_addr"));
        std::fs::write(
            &config,
            template.replace("{port}", &port.to_string()).replace("{agent_port}", &agent_port.to_string()),
        )
        .expect("write the api config");
        let api = ApiProcess { process, base: format!("http://127.0.0.1:{port}"), agent_port, config, log };
        api.wait_ready().await;
        api
    }

    async fn spawn(config: &std::path::Path, log: &std::path::Path) -> KillOnDrop {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open the api log");
        let child = std::process::Command::new(binary("otherix-api"))
            .arg("--config")
            .arg(config)
            .env("OTHERIX_BOOTSTRAP_ADMIN_EMAIL", ADMIN_EMAIL)
            .env("OTHERIX_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn otherix-api");
        KillOnDrop(child)
    }

    /// Waits until `/readyz` answers and the agent listener accepts connections.
    pub async fn wait_ready(&self) {
        let client = http();
        let base = &self.base;
        let ready = eventually(
            Duration::from_secs(60),
            async || matches!(client.get(format!("{base}/readyz")).send().await, Ok(r) if r.status() == 200),
        )
        .await;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(ready, "otherix-api not ready; its log:\n{log}");
        let port = self.agent_port;
        let listening = eventually(Duration::from_secs(30), async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        assert!(listening, "the agent listener is not up");
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
    }

    /// Starts the process again with the same config and waits until it is ready.
    pub async fn restart(&mut self) {
        self.process = Self::spawn(&self.config, &self.log).await;
        self.wait_ready().await;
    }

    /// The admin's access token.
    pub async fn login(&self) -> String {
        let r = http()
            .post(format!("{}/v1/auth/login", self.base))
            .json(&serde_json::json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}))
            .send()
            .await
            .expect("login request");
        assert_eq!(r.status(), 200, "admin login");
        let body: serde_json::Value = r.json().await.expect("login answer");
        body["access_token"].as_str().expect("access_token").to_owned()
    }
}

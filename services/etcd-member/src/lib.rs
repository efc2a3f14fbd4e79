//! Runs and supervises the control plane's own etcd member.
//!
//! The member is spawned from one dedicated thread that lives as long as the
//! member does: `PR_SET_PDEATHSIG` fires when the spawning *thread* exits, so
//! spawning from a tokio blocking thread (which come and go) would kill etcd at
//! random. The same thread waits on the child and restarts it with backoff.
//! A pidfile next to the data dir lets the next start find a member left
//! behind by a `kill -9`ed control plane and stop it before starting anew.
//!
//! The product's member listens on Unix sockets only ([`Listen::Unix`]), in a
//! directory of mode 0700: no TCP port is open, and only the control plane's
//! user (and root) can connect. etcd has no authentication of its own in this
//! set-up, so the directory's mode is the access control. Tests may use
//! loopback TCP ([`Listen::Loopback`]).

#![allow(unsafe_code)] // pre_exec, prctl, kill: the process plumbing this crate exists for.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// The client socket's name inside the socket directory. etcd 3.4 accepts
/// only `unix://host:port` and creates the socket under that name in its
/// working directory, so the name has to look like `host:port`.
pub const CLIENT_SOCKET: &str = "client.sock:0";
/// The peer socket's name inside the socket directory.
pub const PEER_SOCKET: &str = "peer.sock:0";

/// Where the member listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// Unix sockets ([`CLIENT_SOCKET`], [`PEER_SOCKET`]) in this directory,
    /// which is created or chmodded to 0700 and becomes etcd's working directory.
    Unix(PathBuf),
    /// Plain HTTP on 127.0.0.1: any local user can connect. For tests only.
    Loopback {
        /// The client port.
        client_port: u16,
        /// The peer port.
        peer_port: u16,
    },
}

/// How a client reaches the member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEndpoint {
    /// A Unix socket at this absolute path.
    Unix(PathBuf),
    /// An `http://` URL.
    Http(String),
}

impl std::fmt::Display for ClientEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientEndpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            ClientEndpoint::Http(u) => f.write_str(u),
        }
    }
}

/// How to run the member.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    /// The etcd binary (a bare name is looked up on PATH).
    pub binary: PathBuf,
    /// The member name.
    pub name: String,
    /// The data directory (created if missing, mode 0700).
    pub data_dir: PathBuf,
    /// Where it listens for clients and peers.
    pub listen: Listen,
    /// The backend quota in bytes; past it etcd raises a NOSPACE alarm.
    pub quota_backend_bytes: u64,
    /// Periodic auto-compaction retention, e.g. `1h`.
    pub auto_compaction_retention: String,
    /// Raft heartbeat interval (tests use 10 ms).
    pub heartbeat_interval_ms: u32,
    /// Raft election timeout (tests use 100 ms).
    pub election_timeout_ms: u32,
    /// File that receives etcd's own log; `None` discards it.
    pub log_file: Option<PathBuf>,
    /// How long to wait for the member to report healthy.
    pub start_timeout: Duration,
}

impl MemberConfig {
    /// A member named `name` with its data in `data_dir` on the given loopback
    /// ports (reachable by every local user: tests only).
    pub fn new(name: &str, data_dir: &Path, client_port: u16, peer_port: u16) -> Self {
        Self::with_listen(name, data_dir, Listen::Loopback { client_port, peer_port })
    }

    /// A member named `name` with its data in `data_dir`, listening on Unix
    /// sockets in `socket_dir` only.
    pub fn unix(name: &str, data_dir: &Path, socket_dir: &Path) -> Self {
        Self::with_listen(name, data_dir, Listen::Unix(socket_dir.to_owned()))
    }

    fn with_listen(name: &str, data_dir: &Path, listen: Listen) -> Self {
        MemberConfig {
            binary: PathBuf::from("etcd"),
            name: name.to_owned(),
            data_dir: data_dir.to_owned(),
            listen,
            quota_backend_bytes: 2 * 1024 * 1024 * 1024,
            auto_compaction_retention: "1h".to_owned(),
            heartbeat_interval_ms: 100,
            election_timeout_ms: 1000,
            log_file: None,
            start_timeout: Duration::from_secs(30),
        }
    }

    /// The pidfile: beside the data dir, so wiping the data dir does not lose it.
    pub fn pidfile(&self) -> PathBuf {
        let mut name = self.data_dir.file_name().unwrap_or_default().to_os_string();
        name.push(".pid");
        self.data_dir.with_file_name(name)
    }

    /// The URL etcd is told to serve clients on.
    pub fn client_url(&self) -> String {
        match &self.listen {
            Listen::Unix(_) => format!("unix://{CLIENT_SOCKET}"),
            Listen::Loopback { client_port, .. } => format!("http://127.0.0.1:{client_port}"),
        }
    }

    /// The URL etcd is told to serve peers on.
    pub fn peer_url(&self) -> String {
        match &self.listen {
            Listen::Unix(_) => format!("unix://{PEER_SOCKET}"),
            Listen::Loopback { peer_port, .. } => format!("http://127.0.0.1:{peer_port}"),
        }
    }

    /// Where a client connects.
    pub fn client_endpoint(&self) -> ClientEndpoint {
        match &self.listen {
            Listen::Unix(dir) => ClientEndpoint::Unix(dir.join(CLIENT_SOCKET)),
            Listen::Loopback { .. } => ClientEndpoint::Http(self.client_url()),
        }
    }

    fn args(&self) -> Vec<String> {
        let (client_url, peer_url) = (self.client_url(), self.peer_url());
        vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data_dir.display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster={}={peer_url}", self.name),
            "--initial-cluster-state=new".to_owned(),
            format!("--quota-backend-bytes={}", self.quota_backend_bytes),
            "--auto-compaction-mode=periodic".to_owned(),
            format!("--auto-compaction-retention={}", self.auto_compaction_retention),
            format!("--heartbeat-interval={}", self.heartbeat_interval_ms),
            format!("--election-timeout={}", self.election_timeout_ms),
            "--logger=zap".to_owned(),
            "--log-outputs=stderr".to_owned(),
        ]
    }
}

/// Why the member could not be started.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The data directory or pidfile could not be prepared.
    #[error("cannot prepare {path}")]
    Prepare {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The binary could not be spawned.
    #[error("cannot spawn {binary} (is etcd installed? set etcd.binary or install etcd-server)")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The member did not become healthy in time.
    #[error("etcd member at {url} not healthy after {waited:?} (see its log)")]
    NotHealthy {
        /// The client endpoint polled.
        url: ClientEndpoint,
        /// How long it waited.
        waited: Duration,
    },
    /// The member exited during start-up.
    #[error("etcd member exited during start-up: {status}")]
    ExitedEarly {
        /// Its exit status.
        status: String,
    },
}

/// What the supervisor observes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberState {
    /// Spawning, or waiting for health.
    Starting,
    /// Running with this pid.
    Running(u32),
    /// Exited; a restart follows after the backoff.
    Restarting {
        /// How the last run ended.
        last_exit: String,
    },
    /// Stopped for good.
    Stopped,
}

struct Shared {
    stopping: bool,
    pid: Option<u32>,
}

/// A supervised etcd member. Stop it with [`Member::stop`]; dropping it also
/// stops it (blocking briefly).
pub struct Member {
    config: MemberConfig,
    shared: Arc<Mutex<Shared>>,
    state: watch::Receiver<MemberState>,
    wake: mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("client", &self.config.client_endpoint()).finish()
    }
}

impl Member {
    /// Stops any member left behind at the same data dir, starts a new one and
    /// waits until it answers healthy.
    pub async fn start(mut config: MemberConfig) -> Result<Member, MemberError> {
        // Absolute paths: a Unix-socket member runs in its socket directory.
        config.data_dir = absolute(&config.data_dir)?;
        if let Listen::Unix(dir) = &config.listen {
            config.listen = Listen::Unix(absolute(dir)?);
        }
        prepare_dirs(&config)?;
        stop_leftover(&config).await;

        let shared = Arc::new(Mutex::new(Shared { stopping: false, pid: None }));
        let (state_tx, state_rx) = watch::channel(MemberState::Starting);
        let (wake_tx, wake_rx) = mpsc::channel();
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();

        let thread = {
            let config = config.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("etcd-supervisor".into())
                .spawn(move || supervise(config, shared, state_tx, wake_rx, first_tx))
                .map_err(|source| MemberError::Spawn { binary: "etcd-supervisor thread".into(), source })?
        };
        let mut member = Member { config, shared, state: state_rx, wake: wake_tx, thread: Some(thread) };

        match first_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                member.shutdown_blocking_parts();
                return Err(e);
            }
            Err(_) => {
                member.shutdown_blocking_parts();
                return Err(MemberError::ExitedEarly { status: "supervisor ended".into() });
            }
        }

        let deadline = Instant::now() + member.config.start_timeout;
        let mut state = member.state.clone();
        let endpoint = member.config.client_endpoint();
        loop {
            if health(&endpoint).await {
                tracing::info!(%endpoint, pid = ?member.pid(), "etcd member healthy");
                return Ok(member);
            }
            // Copy the state out: the watch guard must not live across an await.
            let exited = match &*state.borrow_and_update() {
                MemberState::Restarting { last_exit } => Some(last_exit.clone()),
                _ => None,
            };
            if let Some(status) = exited {
                member.stop().await;
                return Err(MemberError::ExitedEarly { status });
            }
            if Instant::now() >= deadline {
                let url = endpoint.clone();
                let waited = member.config.start_timeout;
                member.stop().await;
                return Err(MemberError::NotHealthy { url, waited });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where clients connect.
    pub fn client_endpoint(&self) -> ClientEndpoint {
        self.config.client_endpoint()
    }

    /// The config it runs with.
    pub fn config(&self) -> &MemberConfig {
        &self.config
    }

    /// The current pid, when running.
    pub fn pid(&self) -> Option<u32> {
        self.shared.lock().map(|s| s.pid).unwrap_or(None)
    }

    /// A receiver of state changes.
    pub fn state(&self) -> watch::Receiver<MemberState> {
        self.state.clone()
    }

    /// Sends SIGTERM, waits for the exit and removes the pidfile.
    pub async fn stop(mut self) {
        let thread = self.begin_stop();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    fn begin_stop(&mut self) -> Option<std::thread::JoinHandle<()>> {
        if let Ok(mut s) = self.shared.lock() {
            s.stopping = true;
            if let Some(pid) = s.pid {
                signal(pid, libc::SIGTERM);
            }
        }
        let _ = self.wake.send(());
        self.thread.take()
    }

    fn shutdown_blocking_parts(&mut self) {
        if let Some(t) = self.begin_stop() {
            let _ = t.join();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.shutdown_blocking_parts();
    }
}

fn absolute(path: &Path) -> Result<PathBuf, MemberError> {
    std::path::absolute(path).map_err(|source| MemberError::Prepare { path: path.to_owned(), source })
}

fn prepare_dirs(config: &MemberConfig) -> Result<(), MemberError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = &config.data_dir;
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|source| MemberError::Prepare { path: parent.to_owned(), source })?;
    }
    if dir.exists() {
        // etcd refuses data dirs readable by others.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|source| MemberError::Prepare { path: dir.clone(), source })?;
    }
    if let Listen::Unix(sockets) = &config.listen {
        // The directory's mode is what keeps other local users out: etcd
        // makes its sockets 0755 and asks for no credentials. It is chmodded
        // below, so it must be ours: never tighten a shared directory.
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::metadata(sockets) {
            // SAFETY: geteuid(2) cannot fail and touches no memory.
            let me = unsafe { libc::geteuid() };
            if meta.uid() != me {
                let msg =
                    format!("owned by uid {}, not by this process's uid {me}: use a directory of its own", meta.uid());
                return Err(MemberError::Prepare { path: sockets.clone(), source: std::io::Error::other(msg) });
            }
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(sockets)
            .and_then(|()| std::fs::set_permissions(sockets, std::fs::Permissions::from_mode(0o700)))
            .map_err(|source| MemberError::Prepare { path: sockets.clone(), source })?;
    }
    if let Some(log) = &config.log_file
        && let Some(parent) = log.parent()
    {
        std::fs::create_dir_all(parent).map_err(|source| MemberError::Prepare { path: parent.to_owned(), source })?;
    }
    Ok(())
}

/// Stops a member that a killed control plane left running on our data dir:
/// the pidfile's process when its command line proves it is ours, and any
/// other etcd process serving the same data dir.
async fn stop_leftover(config: &MemberConfig) {
    let data_dir_arg = format!("--data-dir={}", config.data_dir.display());
    let mut pids = Vec::new();
    if let Ok(text) = std::fs::read_to_string(config.pidfile())
        && let Ok(pid) = text.trim().parse::<u32>()
        && cmdline_has(pid, &data_dir_arg)
    {
        pids.push(pid);
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && !pids.contains(&pid)
                && cmdline_has(pid, &data_dir_arg)
            {
                pids.push(pid);
            }
        }
    }
    for pid in pids {
        tracing::warn!(pid, data_dir = %config.data_dir.display(), "stopping etcd member left behind by an earlier run");
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if alive(pid) {
            signal(pid, libc::SIGKILL);
            while alive(pid) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let _ = std::fs::remove_file(config.pidfile());
    if let Listen::Unix(dir) = &config.listen {
        // Sockets a killed member left behind.
        let _ = std::fs::remove_file(dir.join(CLIENT_SOCKET));
        let _ = std::fs::remove_file(dir.join(PEER_SOCKET));
    }
}

fn cmdline_has(pid: u32, arg: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| raw.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
        .unwrap_or(false)
}

/// Whether the process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn supervise(
    config: MemberConfig,
    shared: Arc<Mutex<Shared>>,
    state: watch::Sender<MemberState>,
    wake: mpsc::Receiver<()>,
    first: tokio::sync::oneshot::Sender<Result<(), MemberError>>,
) {
    let mut first = Some(first);
    let mut backoff = Duration::from_millis(200);
    loop {
        let spawned = {
            let Ok(mut s) = shared.lock() else { break };
            if s.stopping {
                break;
            }
            let _ = state.send(MemberState::Starting);
            match spawn(&config) {
                Ok(child) => {
                    s.pid = Some(child.id());
                    Ok(child)
                }
                Err(e) => Err(e),
            }
        };
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(e));
                    break;
                }
                tracing::error!(error = %e, "cannot respawn etcd member");
                if wait_or_wake(&wake, backoff) {
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let pid = child.id();
        write_pidfile(&config.pidfile(), pid);
        let _ = state.send(MemberState::Running(pid));
        if let Some(tx) = first.take() {
            let _ = tx.send(Ok(()));
        }
        let started = Instant::now();
        let status = child.wait();
        let stopping = shared.lock().map(|mut s| {
            s.pid = None;
            s.stopping
        });
        let _ = std::fs::remove_file(config.pidfile());
        if stopping.unwrap_or(true) {
            tracing::info!(pid, "etcd member stopped");
            break;
        }
        let last_exit = match status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(pid, %last_exit, "etcd member exited; restarting");
        let _ = state.send(MemberState::Restarting { last_exit });
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        if wait_or_wake(&wake, backoff) {
            break;
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    let _ = state.send(MemberState::Stopped);
}

/// Sleeps for the backoff; true when woken because the member is stopping.
fn wait_or_wake(wake: &mpsc::Receiver<()>, backoff: Duration) -> bool {
    !matches!(wake.recv_timeout(backoff), Err(mpsc::RecvTimeoutError::Timeout))
}

fn spawn(config: &MemberConfig) -> Result<std::process::Child, MemberError> {
    let mut cmd = Command::new(&config.binary);
    cmd.args(config.args()).stdin(Stdio::null()).stdout(Stdio::null());
    if let Listen::Unix(dir) = &config.listen {
        // etcd 3.4 creates `unix://name:port` sockets in its working directory.
        cmd.current_dir(dir);
    }
    match &config.log_file {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| MemberError::Prepare { path: path.clone(), source })?;
            cmd.stderr(file);
        }
        None => {
            cmd.stderr(Stdio::null());
        }
    }
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only calls
    // async-signal-safe functions (prctl, getppid, setpgid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            // Die with the control plane, even on kill -9.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            // Its own process group: a terminal's Ctrl-C reaches the control
            // plane, which then stops etcd in order.
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| MemberError::Spawn { binary: config.binary.clone(), source })
}

fn write_pidfile(path: &Path, pid: u32) {
    let tmp = path.with_extension("pid.tmp");
    let res = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            writeln!(f, "{pid}")?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        tracing::warn!(error = %e, path = %path.display(), "cannot write etcd pidfile");
    }
}

/// Whether the member answers `/health` with `"health":"true"`.
pub async fn health(endpoint: &ClientEndpoint) -> bool {
    async fn ask<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut s: S,
        host: &str,
    ) -> std::io::Result<bool> {
        s.write_all(format!("GET /health HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf).contains("\"health\":\"true\""))
    }
    let attempt = async {
        match endpoint {
            ClientEndpoint::Unix(path) => ask(tokio::net::UnixStream::connect(path).await?, "localhost").await,
            ClientEndpoint::Http(url) => {
                let Some(hostport) = url.strip_prefix("http://") else { return Ok(false) };
                let hostport = hostport.trim_end_matches('/');
                ask(tokio::net::TcpStream::connect(hostport).await?, hostport).await
            }
        }
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), attempt).await, Ok(Ok(true)))
}

/// Two free loopback TCP ports (bound and released; good enough for tests and dev).
pub fn free_ports() -> std::io::Result<(u16, u16)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast(dir: &Path) -> MemberConfig {
        let (c, p) = free_ports().unwrap();
        let mut cfg = MemberConfig::new("t", &dir.join("etcd"), c, p);
        cfg.heartbeat_interval_ms = 10;
        cfg.election_timeout_ms = 100;
        cfg
    }

    #[test]
    fn pidfile_sits_beside_the_data_dir() {
        let cfg = MemberConfig::new("x", Path::new("/s/etcd"), 1, 2);
        assert_eq!(cfg.pidfile(), PathBuf::from("/s/etcd.pid"));
    }

    #[tokio::test]
    async fn restarts_a_killed_member_and_stops_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let member = Member::start(fast(dir.path())).await.unwrap();
        let first = member.pid().unwrap();
        assert!(member.config().pidfile().exists());
        signal(first, libc::SIGKILL);
        let mut state = member.state();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(pid) = member.pid()
                && pid != first
                && health(&member.client_endpoint()).await
            {
                break;
            }
            assert!(Instant::now() < deadline, "member not restarted: {:?}", *state.borrow_and_update());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let second = member.pid().unwrap();
        let pidfile = member.config().pidfile();
        member.stop().await;
        assert!(!alive(second));
        assert!(!pidfile.exists());
    }

    #[tokio::test]
    async fn a_leftover_member_is_stopped_before_a_new_start() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = fast(dir.path());
        // A member started outside the supervisor stands in for one a killed
        // control plane left behind.
        prepare_dirs(&cfg).unwrap();
        let mut orphan = Command::new(&cfg.binary).args(cfg.args()).stderr(Stdio::null()).spawn().unwrap();
        write_pidfile(&cfg.pidfile(), orphan.id());
        let t0 = Instant::now();
        while !health(&cfg.client_endpoint()).await {
            assert!(t0.elapsed() < Duration::from_secs(20));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let member = Member::start(cfg).await.unwrap();
        assert_ne!(member.pid(), Some(orphan.id()));
        assert!(orphan.try_wait().unwrap().is_some(), "the leftover member still runs");
        member.stop().await;
    }

    /// The TCP ports `pid` listens on, from its socket inodes and /proc/net/tcp{,6}.
    fn tcp_listeners(pid: u32) -> Vec<u16> {
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
            .collect();
        let mut ports = Vec::new();
        for table in ["tcp", "tcp6"] {
            let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // local_address, state 0A = LISTEN, inode in column 10.
                if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                    let port = f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
                    ports.extend(port);
                }
            }
        }
        ports
    }

    #[tokio::test]
    async fn a_unix_socket_member_opens_no_tcp_port_and_keeps_its_sockets_private() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let sockets = dir.path().join("run/etcd");
        // A group- and world-readable socket dir from an earlier run is tightened.
        std::fs::create_dir_all(&sockets).unwrap();
        std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cfg = MemberConfig::unix("t", &dir.path().join("etcd"), &sockets);
        cfg.heartbeat_interval_ms = 10;
        cfg.election_timeout_ms = 100;
        let member = Member::start(cfg).await.unwrap();
        let ClientEndpoint::Unix(socket) = member.client_endpoint() else { panic!("not a unix endpoint") };
        assert_eq!(socket, sockets.join(CLIENT_SOCKET));
        assert!(health(&member.client_endpoint()).await);
        assert_eq!(std::fs::metadata(&sockets).unwrap().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(dir.path().join("etcd")).unwrap().mode() & 0o777, 0o700);
        let pid = member.pid().unwrap();
        // The loopback member of the other tests does listen on TCP: the check sees ports.
        assert_eq!(tcp_listeners(pid), Vec::<u16>::new(), "the member listens on TCP");
        member.stop().await;
        assert!(!socket.exists(), "etcd removes its socket on a clean stop");
    }

    #[tokio::test]
    async fn the_tcp_listener_check_sees_a_loopback_member() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = fast(dir.path());
        let Listen::Loopback { client_port, peer_port } = cfg.listen else { panic!() };
        let member = Member::start(cfg).await.unwrap();
        let mut ports = tcp_listeners(member.pid().unwrap());
        ports.sort_unstable();
        let mut want = vec![client_port, peer_port];
        want.sort_unstable();
        assert_eq!(ports, want);
        member.stop().await;
    }

    #[tokio::test]
    async fn a_unix_socket_member_with_relative_paths_restarts_over_stale_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let sockets = dir.path().join("run");
        std::fs::create_dir_all(&sockets).unwrap();
        // A stale socket file where the client socket goes, as a kill -9 leaves it.
        drop(std::os::unix::net::UnixListener::bind(sockets.join(CLIENT_SOCKET)).unwrap());
        let here = std::env::current_dir().unwrap();
        let rel = |p: &Path| pathdiff(p, &here);
        let mut cfg = MemberConfig::unix("t", &rel(&dir.path().join("etcd")), &rel(&sockets));
        cfg.heartbeat_interval_ms = 10;
        cfg.election_timeout_ms = 100;
        let member = Member::start(cfg).await.unwrap();
        assert!(member.config().data_dir.is_absolute());
        assert!(health(&member.client_endpoint()).await);
        member.stop().await;
    }

    /// `path` relative to `base` (both absolute), with `..` as needed.
    fn pathdiff(path: &Path, base: &Path) -> PathBuf {
        let (p, b): (Vec<_>, Vec<_>) = (path.components().collect(), base.components().collect());
        let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
        let mut out = PathBuf::new();
        for _ in common..b.len() {
            out.push("..");
        }
        for c in &p[common..] {
            out.push(c);
        }
        out
    }

    #[tokio::test]
    async fn a_socket_directory_of_another_user_is_refused_not_chmodded() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: chowning to another user needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::os::unix::fs::chown(&shared, Some(65534), Some(65534)).unwrap();
        let err = Member::start(MemberConfig::unix("t", &dir.path().join("etcd"), &shared)).await.unwrap_err();
        assert!(matches!(&err, MemberError::Prepare { path, .. } if *path == shared), "{err}");
        assert!(std::error::Error::source(&err).unwrap().to_string().contains("a directory of its own"));
        assert_eq!(std::fs::metadata(&shared).unwrap().mode() & 0o7777, 0o1777, "the shared directory was chmodded");
    }

    #[tokio::test]
    async fn a_missing_binary_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = fast(dir.path());
        cfg.binary = PathBuf::from("/nonexistent/etcd");
        let err = Member::start(cfg).await.unwrap_err();
        assert!(matches!(err, MemberError::Spawn { .. }), "{err}");
    }
}

//! Test support for the agent's real-QEMU tests: the bootable test image
//! (built once by `dev/images/build-test-image.sh` and cached under `target/`
//! keyed on the script's hash), VM boot slots shared by every test binary
//! (at most two QEMUs at once on our 2-core machines), a tiny HTTP server to
//! serve images from, and clean-up of QEMU processes a test started.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The boot marker the test image prints on its serial console.
pub const BOOT_MARKER: &str = "otherix-test-image: booted";

/// How many VMs may run at once across all test binaries.
pub const VM_SLOTS: usize = 2;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The built test image.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// Directory holding the image files.
    pub dir: PathBuf,
}

impl TestImage {
    /// The qcow2 disk image.
    pub fn qcow2(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    /// The raw disk image.
    pub fn raw(&self) -> PathBuf {
        self.dir.join("disk.raw")
    }
}

/// Returns the test image, building it on first use. Concurrent callers (other
/// test binaries included) wait on a file lock, so the image is built once.
/// `OTHERIX_TEST_IMAGE_DIR` points at a prebuilt image instead.
pub fn test_image() -> TestImage {
    if let Ok(dir) = std::env::var("OTHERIX_TEST_IMAGE_DIR") {
        let image = TestImage { dir: PathBuf::from(dir) };
        assert!(image.qcow2().is_file(), "OTHERIX_TEST_IMAGE_DIR has no disk.qcow2");
        return image;
    }
    let root = workspace_root();
    let script = root.join("dev/images/build-test-image.sh");
    let body = fs::read(&script).expect("read dev/images/build-test-image.sh");
    let key = hex(&Sha256::digest(&body))[..16].to_string();
    let base = root.join("target/otherix-test-image");
    let dir = base.join(&key);
    let image = TestImage { dir: dir.clone() };
    fs::create_dir_all(&base).expect("create target/otherix-test-image");
    let lock = File::create(base.join(".lock")).expect("image lock file");
    rustix::fs::flock(&lock, FlockOperation::LockExclusive).expect("lock image dir");
    if image.qcow2().is_file() && image.raw().is_file() {
        return image;
    }
    let tmp = base.join(format!("{key}.building"));
    let _ = fs::remove_dir_all(&tmp);
    let out = Command::new("bash")
        .arg(&script)
        .env("OUT", &tmp)
        .env("DEBS", base.join("debs-cache"))
        .output()
        .expect("run build-test-image.sh");
    assert!(
        out.status.success(),
        "build-test-image.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fs::rename(&tmp, &dir).expect("publish test image");
    image
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).expect("open file to hash");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read file to hash");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// Boot slots held: while held, the holder may run that many VMs. Released on drop.
#[derive(Debug)]
pub struct VmSlots {
    _files: Vec<File>,
}

/// Takes `n` (1 or 2) of the machine-wide VM slots, waiting until they are
/// free. All `n` are taken together or none, so two waiters never deadlock
/// holding one slot each.
pub fn vm_slots(n: usize) -> VmSlots {
    assert!((1..=VM_SLOTS).contains(&n), "at most {VM_SLOTS} VM slots");
    let dir = std::env::temp_dir().join("otherix-vm-slots");
    fs::create_dir_all(&dir).expect("slot dir");
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let mut held = Vec::new();
        for i in 0..VM_SLOTS {
            let f = File::create(dir.join(format!("slot-{i}.lock"))).expect("slot file");
            if rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).is_ok() {
                held.push(f);
                if held.len() == n {
                    return VmSlots { _files: held };
                }
            }
        }
        drop(held);
        assert!(Instant::now() < deadline, "waited 30 minutes for a VM slot");
        std::thread::sleep(Duration::from_millis(50 + (std::process::id() % 50) as u64));
    }
}

/// Kills (SIGKILL) every process whose command line mentions `needle` (a
/// test's unique temporary directory), so QEMUs a failed test left behind do
/// not outlive it. Returns the pids killed.
pub fn kill_processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut killed = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return killed;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(needle)
            && let Some(p) = rustix::process::Pid::from_raw(pid)
            && rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok()
        {
            killed.push(pid);
        }
    }
    killed
}

/// A temporary directory that kills the processes mentioning it, then removes
/// it, when dropped (also when the test panics).
#[derive(Debug)]
pub struct TestDir {
    /// The directory.
    pub path: PathBuf,
}

impl TestDir {
    /// Makes a fresh directory under the system temp dir (short, because unix
    /// socket paths must fit in 108 bytes).
    pub fn new(tag: &str) -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("otx-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create test dir");
        TestDir { path }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let needle = self.path.to_string_lossy().to_string();
        for _ in 0..50 {
            if kill_processes_mentioning(&needle).is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// What the HTTP server answers on a path.
#[derive(Debug, Clone)]
pub enum Route {
    /// 200 with the file's bytes.
    File(PathBuf),
    /// 200 with these bytes.
    Bytes(Vec<u8>),
    /// This status with an empty body.
    Status(u16),
    /// 302 to this location.
    Redirect(String),
    /// 200 with the file's bytes, sent in 64 KiB pieces with a pause after each
    /// (for watching download progress).
    Slow(PathBuf, Duration),
}

/// A tiny HTTP/1.1 server on 127.0.0.1 serving fixed routes, counting hits.
#[derive(Debug, Clone)]
pub struct HttpServer {
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl HttpServer {
    /// Starts the server on a free port (on the current tokio runtime).
    pub async fn start(routes: HashMap<String, Route>) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let addr = listener.local_addr().expect("http addr");
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let routes = Arc::new(routes);
        let h = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let routes = routes.clone();
                let hits = h.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&req).lines().next().unwrap_or("").to_string();
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    *hits.lock().expect("hits").entry(path.clone()).or_insert(0) += 1;
                    let mut pause = None;
                    let mut location = String::new();
                    let (status, body) = match routes.get(&path) {
                        Some(Route::Redirect(to)) => {
                            location = format!("location: {to}\r\n");
                            (302, Vec::new())
                        }
                        Some(Route::File(p)) => (200, tokio::fs::read(p).await.unwrap_or_default()),
                        Some(Route::Slow(p, d)) => {
                            pause = Some(*d);
                            (200, tokio::fs::read(p).await.unwrap_or_default())
                        }
                        Some(Route::Bytes(b)) => (200, b.clone()),
                        Some(Route::Status(s)) => (*s, Vec::new()),
                        None => (404, Vec::new()),
                    };
                    let head = format!(
                        "HTTP/1.1 {status} X\r\n{location}content-length: {}\r\ncontent-type: application/octet-stream\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    match pause {
                        None => {
                            let _ = sock.write_all(&body).await;
                        }
                        Some(d) => {
                            for piece in body.chunks(64 * 1024) {
                                if sock.write_all(piece).await.is_err() {
                                    return;
                                }
                                tokio::time::sleep(d).await;
                            }
                        }
                    }
                    let _ = sock.shutdown().await;
                });
            }
        });
        HttpServer { base_url: format!("http://{addr}"), hits }
    }

    /// The URL of a path on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// How many requests a path has had.
    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().expect("hits").get(path).copied().unwrap_or(0)
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout`
/// with `what` in the message.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `bytes` to `path` (test fixtures).
pub fn write_file(path: &Path, bytes: &[u8]) {
    let mut f = File::create(path).expect("create fixture");
    f.write_all(bytes).expect("write fixture");
}

/// A running `otherix-agent serve` process, its log appended to a file;
/// SIGKILLed on drop if still running, so a failing test leaves nothing behind.
#[derive(Debug)]
pub struct AgentProcess {
    /// The process.
    pub child: std::process::Child,
}

impl AgentProcess {
    /// Starts `binary serve --config <config>` with `RUST_LOG=info`, stderr appended to `log`.
    pub fn start(binary: &Path, config: &Path, log: &Path) -> AgentProcess {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open the agent log");
        let child = std::process::Command::new(binary)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(log))
            .spawn()
            .expect("spawn otherix-agent");
        AgentProcess { child }
    }

    /// SIGKILL, and wait for the exit.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

//! A local user other than otherix-api's cannot reach the embedded etcd, and
//! what etcd holds does not give the control plane's secrets away. Runs the
//! real otherix-api and tries as `nobody` (the test runs as root, as CI does).

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use otherix_e2e::ApiProcess;

/// The etcd process otherix-api spawned.
fn etcd_child(api_pid: u32) -> u32 {
    let pidfile =
        std::fs::read_dir("/proc").unwrap().flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).find(
            |pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // "pid (comm) state ppid ..."
                let Some((head, rest)) = stat.rsplit_once(')') else { return false };
                head.ends_with("(etcd") && rest.split_whitespace().nth(1) == Some(&api_pid.to_string())
            },
        );
    pidfile.expect("otherix-api runs an etcd member")
}

/// The TCP ports `pid` listens on (its socket inodes matched in /proc/net/tcp{,6}).
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
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                ports.extend(f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()));
            }
        }
    }
    ports
}

/// etcd's v3 JSON range of one Otherix key (the gateway wants base64).
fn range_body(key: &str) -> String {
    format!("{{\"key\":\"{}\"}}", STANDARD.encode(format!("/otherix/{key}")))
}

/// Runs curl (verbose: it prints how the connection went), as `nobody` when asked.
fn curl(as_nobody: bool, args: &[&str]) -> (bool, String, String) {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "curl"]);
        c
    } else {
        Command::new("curl")
    };
    let out = cmd.args(["-v", "-sS", "-m", "5"]).args(args).output().expect("setpriv and curl are installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o777
}

#[tokio::test]
async fn a_local_user_cannot_reach_the_embedded_etcd_nor_read_its_secrets() {
    assert_eq!(rustix::process::geteuid().as_raw(), 0, "this test switches to nobody: run it as root");
    let dir = tempfile::tempdir().unwrap();
    // Everything above the socket directory is open to all: only the
    // product's own modes stand between `nobody` and etcd.
    let state = dir.path().join("api-state");
    std::fs::create_dir_all(state.join("run")).unwrap();
    for d in [dir.path(), &state, &state.join("run")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let api = ApiProcess::start(dir.path(), "").await;
    // otherix-api keeps `run/` private too; open it again (once it has written
    // there) so that the socket directory's own mode is the only barrier left.
    let listen = state.join("run/listen.json");
    assert!(otherix_e2e::eventually(std::time::Duration::from_secs(10), async || listen.exists()).await);
    std::fs::set_permissions(state.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let etcd = etcd_child(api.process.0.id());

    // No TCP listener at all; any there was is tried as nobody below.
    let ports = tcp_listeners(etcd);
    for port in &ports {
        let url = format!("http://127.0.0.1:{port}/v3/kv/range");
        let (ok, out, err) = curl(true, &["-X", "POST", &url, "-d", &range_body("pki/cluster_ca")]);
        assert!(!ok, "nobody read etcd over TCP port {port}: {out}\n{err}");
    }
    assert_eq!(ports, Vec::<u16>::new(), "the embedded etcd listens on TCP");

    // The Unix socket: in a 0700 directory, with the data dir and key file private too.
    let sockets = state.join("run/etcd");
    let socket = sockets.join("client.sock:0");
    assert!(std::fs::symlink_metadata(&socket).unwrap().file_type().is_socket());
    assert_eq!(mode(&sockets), 0o700);
    assert_eq!(mode(&state.join("etcd")), 0o700);
    assert_eq!(mode(&state.join("secrets")), 0o700);
    assert_eq!(mode(&state.join("secrets/etcd-encryption.key")), 0o600);
    assert_eq!(std::fs::metadata(state.join("secrets/etcd-encryption.key")).unwrap().len(), 32);

    // Control: nobody can walk down to the socket directory itself, so what
    // refuses it below is that directory's mode and nothing above it.
    let ls = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "ls"])
        .arg(state.join("run"))
        .output()
        .unwrap();
    assert!(ls.status.success() && String::from_utf8_lossy(&ls.stdout).contains("etcd"), "{ls:?}");

    let sock = socket.display().to_string();
    let body = range_body("pki/cluster_ca");
    let args = ["--unix-socket", sock.as_str(), "-X", "POST", "http://localhost/v3/kv/range", "-d", body.as_str()];
    // As nobody: the connection is attempted and refused by the file system.
    let (ok, out, err) = curl(true, &args);
    assert!(!ok, "nobody read etcd through its socket: {out}");
    // (curl 7.88 prints the socket path with its last character cut off.)
    assert!(err.contains(&format!("Trying {}/client.soc", sockets.display())), "curl did not try the socket: {err}");
    assert!(err.contains("Permission denied"), "not refused for permission: {err}");

    // As otherix-api's user (root here) the same command reads the CA record,
    // and its private key is sealed: no PEM, only the sealed form.
    let (ok, out, err) = curl(false, &args);
    assert!(ok && out.contains("\"kvs\""), "the owner cannot read etcd: {out}\n{err}");
    let value = out.split("\"value\":\"").nth(1).and_then(|v| v.split('"').next()).expect("a value");
    let raw = STANDARD.decode(value).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("BEGIN CERTIFICATE"), "the CA certificate is stored in the clear, as it should be");
    assert!(!text.contains("PRIVATE KEY"), "the CA private key is stored in plaintext");
    assert!(text.contains("otherix-sealed:"), "the CA private key is not sealed: {text}");
    drop(api);
}

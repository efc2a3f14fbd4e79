//! A burst of wrong logins against a real otherix-api process: the limits
//! hold under concurrency, memory returns to its baseline, and what was
//! typed into the username box never reaches the log.

use std::time::{Duration, Instant};

use otherix_e2e::{ADMIN_EMAIL, ApiProcess, http};
use serde_json::{Value, json};

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process is alive");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Fires the login bodies at once; returns how many answered 401 and 429.
async fn burst(base: &str, bodies: Vec<Value>) -> (usize, usize) {
    let client = http();
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let (client, url) = (client.clone(), format!("{base}/v1/auth/login"));
            tokio::spawn(async move {
                let r = client.post(url).json(&b).send().await.expect("login request");
                (r.status().as_u16(), r.text().await.unwrap_or_default())
            })
        })
        .collect();
    let (mut unauthorized, mut limited) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (401, _) => unauthorized += 1,
            (429, body) => {
                assert!(body.contains("retry_after_seconds"), "{body}");
                limited += 1;
            }
            (s, body) => panic!("unexpected answer {s}: {body}"),
        }
    }
    (unauthorized, limited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_wrong_logins_is_limited_and_memory_comes_back() {
    const LIMIT_KIB: u64 = 150 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let api = ApiProcess::start(dir.path(), "").await;
    let pid = api.process.0.id();
    let baseline = status_kib(pid, "VmRSS");

    // 40 wrong passwords for one account, all at once.
    let bodies = (0..40).map(|i| json!({"email": ADMIN_EMAIL, "password": format!("wrong-password-{i}")})).collect();
    let (unauthorized, limited) = burst(&api.base, bodies).await;
    assert!(unauthorized <= 10, "{unauthorized} x 401 for one account (limit 10)");
    assert_eq!(unauthorized + limited, 40);

    // Then 150 from the same address across names nobody has, one of them
    // what a user types into the username box by mistake: a password.
    let typed = "Typed-Password-In-Username-Box";
    let bodies = (0..150).map(|i| json!({"username": format!("{typed}{i}"), "password": "wrong-password"})).collect();
    let (unauthorized, limited) = burst(&api.base, bodies).await;
    assert!(unauthorized <= 50, "{unauthorized} x 401 from one address (limit 50)");
    assert_eq!(unauthorized + limited, 150);
    let peak = status_kib(pid, "VmHWM");

    // Memory back under the bound: poll, fail after a minute.
    let start = Instant::now();
    let mut rss = status_kib(pid, "VmRSS");
    while rss >= LIMIT_KIB && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss = status_kib(pid, "VmRSS");
    }
    eprintln!(
        "otherix-api RSS: {} MiB before, peak {} MiB, {} MiB after {:.1} s",
        baseline / 1024,
        peak / 1024,
        rss / 1024,
        start.elapsed().as_secs_f64()
    );
    assert!(rss < LIMIT_KIB, "RSS {} MiB a minute after the burst (peak {} MiB)", rss / 1024, peak / 1024);
    // Idle hashing threads free their work areas (5 s): back near the baseline.
    let near = baseline + 24 * 1024;
    let start = Instant::now();
    while rss > near && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss = status_kib(pid, "VmRSS");
    }
    eprintln!("otherix-api RSS {} MiB after {:.1} s idle", rss / 1024, start.elapsed().as_secs_f64());
    assert!(rss <= near, "RSS {} MiB stays above the baseline of {} MiB", rss / 1024, baseline / 1024);

    let log = std::fs::read_to_string(&api.log).unwrap().to_ascii_lowercase();
    assert!(log.contains("login failed"), "the failures were not logged at all");
    assert!(!log.contains(&typed.to_ascii_lowercase()), "the typed identifier reached the log");
    assert!(!log.contains(&ADMIN_EMAIL.to_ascii_lowercase()), "the typed email reached the log");
}

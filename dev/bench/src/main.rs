//! `make bench`: GetDefaultPool, GetMe and Login over gRPC and over REST
//! next to a raw etcd get measured in the same run, so the control plane's
//! overhead reads as a ratio; and the share of GetMe spent verifying the
//! caller's token. The server and the load run on separate tokio runtimes pinned to
//! separate cores (etcd floats), so they do not steal each other's CPU.

#![allow(clippy::print_stdout)] // A command-line report, not a daemon.
#![allow(unsafe_code)] // sched_setaffinity.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use otherix_api::identity::bootstrap::BootstrapAdmin;
use otherix_proto::v1::auth_service_client::AuthServiceClient;
use otherix_proto::v1::cluster_service_client::ClusterServiceClient;
use otherix_proto::v1::user_service_client::UserServiceClient;
use otherix_proto::v1::{GetDefaultPoolRequest, GetMeRequest, LoginRequest};
use otherix_testkit::TestEtcd;
use tokio::sync::Mutex;

/// Load benchmarks of otherix-api.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds of measurement per scenario (after a one-second warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

const ADMIN: &str = "admin";
const PASSWORD: &str = "bench-password-123";

/// Adds a bearer token to gRPC calls.
#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

fn pin_current_thread(core: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within its bounds for small core numbers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn runtime(core: usize, name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let core = core % cores;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .on_thread_start(move || pin_current_thread(core))
        .enable_all()
        .build()
        .context("runtime")
}

struct Report {
    name: &'static str,
    count: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Report {
    fn rps(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }
}

/// Runs `op` from `concurrency` tasks for a warm-up second, then for `seconds`.
async fn load<F, Fut>(name: &'static str, seconds: u64, concurrency: usize, op: F) -> Report
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let warm_end = Instant::now() + Duration::from_secs(1);
    let end = warm_end + Duration::from_secs(seconds);
    let lat = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (op, lat, errors) = (op.clone(), lat.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let ok = op().await;
                if t >= warm_end {
                    if ok {
                        mine.push(t.elapsed());
                    } else {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            lat.lock().await.extend(mine);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut latencies = std::mem::take(&mut *lat.lock().await);
    latencies.sort_unstable();
    Report {
        name,
        count: latencies.len(),
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        elapsed: Duration::from_secs(seconds),
        latencies,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server_rt = runtime(0, "api")?;
    let load_rt = runtime(1, "load")?;

    let state = tempfile::tempdir()?;
    let mut config = otherix_api::Config { state_dir: state.path().to_owned(), ..Default::default() };
    let api_config = config.clone();
    let (etcd, api) = server_rt.block_on(async {
        let etcd = TestEtcd::start().await;
        config.server.listen = "127.0.0.1:0".into();
        config.etcd.endpoints = vec![etcd.endpoint()];
        config.logger.level = "warn".into();
        config.agent_server.enabled = false;
        let admin = BootstrapAdmin { email: String::new(), username: ADMIN.into(), password: PASSWORD.into() };
        let options = otherix_api::StartOptions { bootstrap_admin: Some(admin) };
        let api = otherix_api::ApiServer::start_with(config.clone(), options).await?;
        anyhow::Ok((etcd, api))
    })?;
    let base = format!("http://{}", api.addr());
    let endpoint = etcd.endpoint();
    let Args { seconds, concurrency } = args;

    let verify_endpoint = endpoint.clone();
    let (reports, token) = load_rt.block_on(async move {
        let anon = reqwest::Client::new();
        let login_url = format!("{base}/v1/auth/login");
        let login_body = serde_json::json!({"username": ADMIN, "password": PASSWORD});
        let login: serde_json::Value = anon.post(&login_url).json(&login_body).send().await?.json().await?;
        let token = login["access_token"].as_str().context("login failed")?.to_owned();
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("authorization", format!("Bearer {token}").parse()?);
        let http = reqwest::Client::builder().default_headers(headers).build()?;
        let pool_url = format!("{base}/v1/cluster/default-pool");
        // Wait for the first-boot seeding so every scenario reads the same record.
        for _ in 0..200 {
            if http.get(&pool_url).send().await.is_ok_and(|r| r.status() == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let bearer = Bearer(format!("Bearer {token}").parse()?);
        let channel = tonic::transport::Endpoint::from_shared(base.clone())?.connect().await?;
        let etcd_client = etcd_client::Client::connect([endpoint], None).await?;

        let mut out = Vec::new();
        out.push(
            load("raw etcd get", seconds, concurrency, move || {
                let mut kv = etcd_client.kv_client();
                async move { kv.get("/otherix/cluster_settings", None).await.is_ok() }
            })
            .await,
        );
        let (ch, b) = (channel.clone(), bearer.clone());
        out.push(
            load("gRPC GetDefaultPool", seconds, concurrency, move || {
                let mut c = ClusterServiceClient::with_interceptor(ch.clone(), b.clone());
                async move { c.get_default_pool(GetDefaultPoolRequest {}).await.is_ok() }
            })
            .await,
        );
        let h = http.clone();
        out.push(
            load("REST GET /v1/cluster/default-pool", seconds, concurrency, move || {
                ok_get(h.clone(), pool_url.clone())
            })
            .await,
        );
        let (ch, b) = (channel.clone(), bearer.clone());
        out.push(
            load("gRPC GetMe", seconds, concurrency, move || {
                let mut c = UserServiceClient::with_interceptor(ch.clone(), b.clone());
                async move { c.get_me(GetMeRequest {}).await.is_ok() }
            })
            .await,
        );
        let (h, me_url) = (http.clone(), format!("{base}/v1/users/me"));
        out.push(load("REST GET /v1/users/me", seconds, concurrency, move || ok_get(h.clone(), me_url.clone())).await);
        let ch = channel.clone();
        out.push(
            load("gRPC Login (argon2id)", seconds, concurrency, move || {
                let mut c = AuthServiceClient::new(ch.clone());
                async move {
                    let req = LoginRequest { username: ADMIN.into(), email: String::new(), password: PASSWORD.into() };
                    c.login(req).await.is_ok()
                }
            })
            .await,
        );
        out.push(
            load("REST POST /v1/auth/login (argon2id)", seconds, concurrency, move || {
                let (a, u, b) = (anon.clone(), login_url.clone(), login_body.clone());
                async move { matches!(a.post(&u).json(&b).send().await, Ok(r) if r.status() == 200) }
            })
            .await,
        );
        anyhow::Ok((out, token))
    })?;

    // Token verification alone, in this process against the same etcd: the
    // HMAC check by itself, and the full check (signature, user, session).
    let bench_token = token.clone();
    let (sig_us, full) = load_rt.block_on(async move {
        // The signing keys are sealed in etcd: open them with the api's key.
        let sealer = otherix_store::Sealer::load(&api_config.etcd_encryption_key_file(), &[])?;
        let store = otherix_store::Store::connect(&[verify_endpoint], Duration::from_secs(5))
            .await?
            .with_sealer(std::sync::Arc::new(sealer));
        let identity = otherix_api::identity::Identity::new(
            store,
            &otherix_api::config::AuthConfig::default(),
            tokio_util::sync::CancellationToken::new(),
        );
        identity.ready().await?;
        let keys = identity.signing_keys().await?;
        let n = 20_000;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(
                otherix_auth::jwt::verify(&token, &keys, now_secs(), &otherix_auth::jwt::Limits::for_ttl(15 * 60))
                    .is_ok(),
            );
        }
        let sig_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
        let id = Arc::new(identity);
        let full = load("token verification (signature + user + session reads)", 2, 1, move || {
            let (id, token) = (id.clone(), token.clone());
            async move { id.authenticate(&token).await.is_ok() }
        })
        .await;
        anyhow::Ok((sig_us, full))
    })?;

    println!("{concurrency} requests in flight, {seconds} s per scenario, server and load pinned to separate cores");
    println!();
    println!("| scenario | requests/s | p50 | p99 | errors | p50 vs etcd | throughput vs etcd |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let base_p50 = reports[0].pct(0.5).as_secs_f64();
    let base_rps = reports[0].rps();
    for r in &reports {
        println!(
            "| {} | {:.0} | {:.3} ms | {:.3} ms | {} | {:.2}x | {:.2}x |",
            r.name,
            r.rps(),
            r.pct(0.5).as_secs_f64() * 1e3,
            r.pct(0.99).as_secs_f64() * 1e3,
            r.errors,
            r.pct(0.5).as_secs_f64() / base_p50,
            r.rps() / base_rps,
        );
    }
    let getme = reports.iter().find(|r| r.name == "gRPC GetMe").map_or(0.0, |r| r.pct(0.5).as_secs_f64());
    let verify = full.pct(0.5).as_secs_f64();
    println!();
    println!(
        "Token verification: HMAC-SHA256 check {sig_us:.2} us; full check (signature, user and session reads, one at a time) p50 {:.3} ms, p99 {:.3} ms, {:.0}% of gRPC GetMe's p50 under load ({:.3} ms).",
        verify * 1e3,
        full.pct(0.99).as_secs_f64() * 1e3,
        100.0 * verify / getme.max(f64::EPSILON),
        getme * 1e3
    );
    let ratio = |a: &str, b: &str| {
        let rps = |n: &str| reports.iter().find(|r| r.name == n).map_or(0.0, Report::rps);
        rps(a) / rps(b).max(f64::EPSILON)
    };
    println!(
        "REST vs gRPC throughput: GetMe {:.2}x, GetDefaultPool {:.2}x.",
        ratio("REST GET /v1/users/me", "gRPC GetMe"),
        ratio("REST GET /v1/cluster/default-pool", "gRPC GetDefaultPool")
    );

    // The same comparison with an independent load generator: h2load sends
    // gRPC frames over one HTTP/2 connection with `concurrency` streams.
    match h2load_available() {
        false => println!("\nh2load not found (apt install nghttp2-client): independent-generator figures skipped."),
        true => {
            println!();
            println!("h2load, 1 connection, {concurrency} streams, {seconds} s after a 1 s warm-up, pinned to core 1:");
            println!();
            println!("| target | requests/s | mean | vs etcd |");
            println!("|---|---:|---:|---:|");
            // RangeRequest { key: "/otherix/cluster_settings" }.
            let key = b"/otherix/cluster_settings";
            let mut range = vec![0x0a, key.len() as u8];
            range.extend_from_slice(key);
            let etcd_url = format!("{}/etcdserverpb.KV/Range", etcd.endpoint());
            let raw = h2load(&etcd_url, &[], &range, seconds, concurrency)?;
            let auth = format!("authorization: Bearer {bench_token}");
            let base = format!("http://{}", api.addr());
            let me = h2load(&format!("{base}/otherix.v1.UserService/GetMe"), &[&auth], &[], seconds, concurrency)?;
            let pool = h2load(
                &format!("{base}/otherix.v1.ClusterService/GetDefaultPool"),
                &[&auth],
                &[],
                seconds,
                concurrency,
            )?;
            let raw_rps = raw.0;
            for (name, (rps, mean)) in [("raw etcd KV/Range", raw), ("gRPC GetMe", me), ("gRPC GetDefaultPool", pool)] {
                println!("| {name} | {rps:.0} | {mean} | {:.2}x |", rps / raw_rps.max(f64::EPSILON));
            }
        }
    }
    server_rt.block_on(api.shutdown());
    drop(etcd);
    Ok(())
}

fn h2load_available() -> bool {
    std::process::Command::new("h2load").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Runs h2load against a gRPC method with one framed request body; returns
/// requests per second and the mean time per request as h2load prints it.
fn h2load(url: &str, headers: &[&str], message: &[u8], seconds: u64, streams: usize) -> anyhow::Result<(f64, String)> {
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    body.extend_from_slice(message);
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &body)?;
    let mut cmd = std::process::Command::new("taskset");
    cmd.args(["-c", "1", "h2load", "-c", "1", "-m"])
        .arg(streams.to_string())
        .args(["-D", &seconds.to_string(), "--warm-up-time", "1"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg("-d").arg(file.path()).arg(url).output().context("run h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in ")?.split(", ").nth(1)?.strip_suffix(" req/s")?.parse::<f64>().ok())
        .with_context(|| format!("unexpected h2load output:\n{text}"))?;
    let failed = text.lines().find(|l| l.starts_with("requests:")).unwrap_or_default();
    if !failed.contains(" 0 failed") || !failed.contains(" 0 errored") {
        anyhow::bail!("h2load saw failures against {url}: {failed}");
    }
    let mean = text
        .lines()
        .find_map(|l| l.strip_prefix("time for request:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("?")
        .to_owned();
    Ok((rps, mean))
}

async fn ok_get(http: reqwest::Client, url: String) -> bool {
    match http.get(&url).send().await {
        Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
        _ => false,
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

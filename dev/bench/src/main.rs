//! `make bench`: GetDefaultPool over gRPC and over REST against a raw etcd
//! get measured in the same run, so the control plane's overhead reads as a
//! ratio. The server and the load run on separate tokio runtimes pinned to
//! separate cores (etcd floats), so they do not steal each other's CPU.

#![allow(clippy::print_stdout)] // A command-line report, not a daemon.
#![allow(unsafe_code)] // sched_setaffinity.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use otherix_proto::v1::GetDefaultPoolRequest;
use otherix_proto::v1::cluster_service_client::ClusterServiceClient;
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

    let (etcd, api) = server_rt.block_on(async {
        let etcd = TestEtcd::start().await;
        let mut config = otherix_api::Config::default();
        config.server.listen = "127.0.0.1:0".into();
        config.etcd.endpoints = vec![etcd.endpoint()];
        config.logger.level = "warn".into();
        let api = otherix_api::ApiServer::start(config).await?;
        anyhow::Ok((etcd, api))
    })?;
    let base = format!("http://{}", api.addr());
    let endpoint = etcd.endpoint();
    let Args { seconds, concurrency } = args;

    let reports = load_rt.block_on(async move {
        let http = reqwest::Client::new();
        let url = format!("{base}/v1/cluster/default-pool");
        // Wait for the first-boot seeding so every scenario reads the same record.
        for _ in 0..200 {
            if http.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let etcd_client = etcd_client::Client::connect([endpoint], None).await?;
        let raw = load("raw etcd get", seconds, concurrency, move || {
            let mut kv = etcd_client.kv_client();
            async move { kv.get("/otherix/cluster_settings", None).await.is_ok() }
        })
        .await;
        let channel = tonic::transport::Endpoint::from_shared(base.clone())?.connect().await?;
        let grpc = load("gRPC GetDefaultPool", seconds, concurrency, move || {
            let mut c = ClusterServiceClient::new(channel.clone());
            async move { c.get_default_pool(GetDefaultPoolRequest {}).await.is_ok() }
        })
        .await;
        let rest = load("REST GET /v1/cluster/default-pool", seconds, concurrency, move || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
        })
        .await;
        anyhow::Ok(vec![raw, grpc, rest])
    })?;

    println!(
        "GetDefaultPool, {concurrency} in flight, {seconds} s per scenario, server and load pinned to separate cores"
    );
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
    server_rt.block_on(api.shutdown());
    drop(etcd);
    Ok(())
}

//! `make bench` (agent plane): simulates N enrolled agents (real joins, real
//! mTLS, heartbeat streams at the dev cadence, no QEMU) against one
//! otherix-api process, and reports the server's CPU and memory at 100 and
//! 1,000 nodes and how long listing 1,000 nodes takes. The server is pinned
//! to core 0 and this load tool to core 1.

#![allow(clippy::print_stdout)] // A command-line report, not a daemon.
#![allow(unsafe_code)] // sched_setaffinity.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use otherix_proto::otherix::agent::v1::enrolment_service_client::EnrolmentServiceClient;
use otherix_proto::otherix::agent::v1::heartbeat_service_client::HeartbeatServiceClient;
use otherix_proto::otherix::agent::v1::{Capabilities, HeartbeatRequest, JoinRequest, Resources};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Simulated agents against one otherix-api.
#[derive(Debug, Parser)]
struct Args {
    /// The otherix-api binary (a release build).
    #[arg(long, default_value = "target/release/otherix-api")]
    api: PathBuf,
    /// Node counts to measure at, ascending.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    nodes: Vec<usize>,
    /// Heartbeat interval in seconds (the dev cadence is 15).
    #[arg(long, default_value_t = 15)]
    interval: u32,
    /// Measurement window per node count, in seconds (longer than the
    /// node record's one-minute refresh, so etcd writes/s include it).
    #[arg(long, default_value_t = 75)]
    window: u64,
}

const ADMIN_PASSWORD: &str = "agent-load-password";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM lets it stop its etcd member in order.
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn pin_to(core: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within its bounds.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// CPU seconds (user + system) and RSS of a process.
fn usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat")?.1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let hz = 100.0; // USER_HZ on Linux
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_default();
    Ok((ticks / hz, rss_kib * 1024))
}

fn report(i: usize) -> HeartbeatRequest {
    HeartbeatRequest {
        agent_version: "load".into(),
        architecture: "amd64".into(),
        capabilities: Some(Capabilities {
            cpu_cores: 16,
            memory_bytes: 64 << 30,
            accelerator: "kvm".into(),
            qemu_version: "7.2.22".into(),
            ..Default::default()
        }),
        resources: Some(Resources {
            cpu_available: 16,
            memory_available_bytes: (48 << 30) + i as u64,
            memory_total_bytes: 64 << 30,
            system_disk_total_bytes: 500 << 30,
            system_disk_free_bytes: 400 << 30,
        }),
        pools: vec![],
    }
}

async fn start_server(args: &Args, dir: &Path) -> anyhow::Result<(Server, String, String, u32)> {
    let (port, agent_port) = (free_port()?, free_port()?);
    let config = dir.join("api.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nserver:\n  listen: 127.0.0.1:{port}\nagent_server:\n  listen: 127.0.0.1:{agent_port}\n\
             logger:\n  level: warn\n\
             nodes:\n  heartbeat_interval_seconds: {}\n  stale_threshold_seconds: {}\n",
            dir.join("state").display(),
            args.interval,
            args.interval * 3
        ),
    )?;
    let child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(&args.api)
        .arg("--config")
        .arg(&config)
        .env("OTHERIX_BOOTSTRAP_ADMIN_USERNAME", "admin")
        .env("OTHERIX_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("api.log"))?)
        .spawn()
        .with_context(|| format!("start {} (run `cargo build --release -p otherix-api`)", args.api.display()))?;
    let pid = child.id();
    let server = Server(child);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            return Ok((server, base, format!("https://localhost:{agent_port}"), pid));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("otherix-api not ready; see {}", dir.join("api.log").display())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    pin_to(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(|| pin_to(1))
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, base, agent_url, pid) = start_server(&args, dir.path()).await?;
    let http = reqwest::Client::new();
    let login: serde_json::Value = http
        .post(format!("{base}/v1/auth/login"))
        .json(&serde_json::json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await?
        .json()
        .await?;
    let jwt = login["access_token"].as_str().context("login")?.to_owned();
    let token: serde_json::Value = http
        .post(format!("{base}/v1/nodes/join-tokens"))
        .bearer_auth(&jwt)
        .json(&serde_json::json!({"ttl_seconds": 86400, "max_uses": 0}))
        .send()
        .await?
        .json()
        .await?;
    let join_token = token["token"].as_str().context("join token")?.to_owned();
    let ca: serde_json::Value = http.get(format!("{base}/v1/ca")).send().await?.json().await?;
    let ca_pem = ca["ca_cert_pem"].as_str().context("ca")?.to_owned();

    let plain_tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)).domain_name("localhost");
    let enrol_channel = Endpoint::from_shared(agent_url.clone())?.tls_config(plain_tls)?.connect().await?;
    let (idle_cpu, idle_rss) = usage(pid)?;
    let idle_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_pct = (usage(pid)?.0 - idle_cpu) / idle_at.elapsed().as_secs_f64() * 100.0;
    println!("Simulated agents: heartbeat every {} s, server pinned to core 0, load to core 1.", args.interval);
    println!();
    // etcd's revision moves by one per write: writes per second are its
    // slope over the window (read through the member's private socket).
    let socket = dir.path().join("state/run/etcd").join(otherix_etcd_member::CLIENT_SOCKET);
    let store =
        otherix_store::Store::connect_with(&otherix_store::ConnectConfig::unix(socket, Duration::from_secs(5))).await?;
    println!(
        "| nodes | server CPU | server RSS | heartbeats/s | etcd writes/s | p50 report->answer | p99 | ListNodes (REST) p50 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!("| 0 | {idle_pct:.1}% | {:.1} MiB | - | - | - | - | - |", idle_rss as f64 / 1048576.0);

    let latencies = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::<Duration>::new()));
    let mut joined = 0usize;
    let mut tasks = Vec::new();
    for &target in &args.nodes {
        while joined < target {
            let name = format!("sim-{joined:05}");
            let (key, csr) = otherix_pki::generate_agent_key_and_csr(&name)?;
            let resp = EnrolmentServiceClient::new(enrol_channel.clone())
                .join(JoinRequest {
                    token: join_token.clone(),
                    csr_pem: csr,
                    node_name: name.clone(),
                    architecture: "amd64".into(),
                    advertised_endpoint: format!("10.0.{}.{}:9443", joined / 250, joined % 250 + 1),
                })
                .await?
                .into_inner();
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca_pem))
                .identity(Identity::from_pem(&resp.cert_pem, &key))
                .domain_name("localhost");
            let channel = Endpoint::from_shared(agent_url.clone())?.tls_config(tls)?.connect().await?;
            let (interval, lat, i) = (args.interval, latencies.clone(), joined);
            tasks.push(tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                let mut answers = match HeartbeatServiceClient::new(channel)
                    .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                {
                    Ok(r) => r.into_inner(),
                    Err(_) => return,
                };
                // Stagger the agents across the interval, as real ones drift apart.
                let offset = Duration::from_millis((i as u64 * 7919) % (u64::from(interval) * 1000));
                tokio::time::sleep(offset).await;
                let mut tick = tokio::time::interval(Duration::from_secs(u64::from(interval)));
                loop {
                    tick.tick().await;
                    let sent = Instant::now();
                    if tx.send(report(i)).await.is_err() {
                        return;
                    }
                    match answers.message().await {
                        Ok(Some(_)) => lat.lock().await.push(sent.elapsed()),
                        _ => return,
                    }
                }
            }));
            joined += 1;
        }
        // One full interval for every agent to report, then measure.
        tokio::time::sleep(Duration::from_secs(u64::from(args.interval) + 2)).await;
        latencies.lock().await.clear();
        let (cpu0, _) = usage(pid)?;
        let rev0 = store.current_revision().await?;
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.window)).await;
        let (cpu1, rss) = usage(pid)?;
        let rev1 = store.current_revision().await?;
        let wall = t0.elapsed().as_secs_f64();
        let mut lat = std::mem::take(&mut *latencies.lock().await);
        lat.sort_unstable();
        let pct = |p: f64| lat.get(((lat.len().max(1) - 1) as f64 * p) as usize).copied().unwrap_or_default();
        let mut list = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let r = http.get(format!("{base}/v1/nodes?page_size=1000")).bearer_auth(&jwt).send().await?;
            let body: serde_json::Value = r.json().await?;
            list.push(t.elapsed());
            let n = body["nodes"].as_array().map_or(0, Vec::len);
            if n != target {
                bail!("ListNodes returned {n} nodes, expected {target}");
            }
        }
        list.sort_unstable();
        println!(
            "| {target} | {:.1}% | {:.1} MiB | {:.1} | {:.1} | {:.2} ms | {:.2} ms | {:.1} ms |",
            (cpu1 - cpu0) / wall * 100.0,
            rss as f64 / 1048576.0,
            lat.len() as f64 / wall,
            (rev1 - rev0) as f64 / wall,
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            list[list.len() / 2].as_secs_f64() * 1e3,
        );
    }
    for t in tasks {
        t.abort();
    }
    drop(server);
    Ok(())
}

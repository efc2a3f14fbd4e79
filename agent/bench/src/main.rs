//! `otherix-agent-bench`: the agent's create-to-running latency with a cached
//! image (task accepted by the agent -> QMP reports running, from the task's
//! own timestamps) next to a bare `qemu-system-x86_64` launch of the same
//! image and command line in the same run, and the agent's RSS with 0 and
//! with N running VMs (booted at most two at a time). Holds both machine-wide
//! VM slots, so no test boots VMs meanwhile.

// Printing the figures is this tool's whole job.
#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use hyper_util::rt::TokioIo;
use otherix_agent_testkit::{BOOT_MARKER, HttpServer, Route, TestDir, vm_slots};
use otherix_proto::otherix::agent::v1::vm_runtime_service_client::VmRuntimeServiceClient;
use otherix_proto::otherix::agent::v1::{
    CloudInit, CreateVmRequest, DeleteVmRequest, GetTaskRequest, ImageFormat, ImageSource, ReadLogRequest, Task,
    TaskState, VmSpec,
};
use otherix_qmp::Qmp;
use otherix_vm_runtime::config::{AccelSetting, QemuConfig};
use otherix_vm_runtime::qemu::{self, Launch};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, Parser)]
#[command(about = "Agent create-to-running latency vs a bare QEMU launch, and agent RSS")]
struct Args {
    /// The otherix-agent binary (default: beside this one).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Timed creates (and as many bare launches).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// VMs running for the second RSS figure.
    #[arg(long, default_value_t = 10)]
    vms: usize,
    /// Guest memory per VM in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
}

type Client = VmRuntimeServiceClient<Channel>;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

async fn connect(socket: &Path) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = socket.to_path_buf();
        let ch = Endpoint::try_from("http://agent.local")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let s = s.clone();
                async move { UnixStream::connect(s).await.map(TokioIo::new) }
            }))
            .await;
        match ch {
            Ok(ch) => return Ok(VmRuntimeServiceClient::new(ch)),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(e).context("connect to the agent"),
        }
    }
}

async fn finish(c: &mut Client, t: Task) -> anyhow::Result<Task> {
    loop {
        let t = c.get_task(GetTaskRequest { task_id: t.task_id.clone(), wait_ms: 60_000 }).await?.into_inner();
        if t.state == TaskState::Succeeded as i32 {
            return Ok(t);
        }
        if t.state == TaskState::Failed as i32 {
            bail!("task {} failed: {:?}", t.task_id, t.error);
        }
    }
}

fn secs(t: Option<prost_types::Timestamp>) -> f64 {
    t.map_or(0.0, |t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

fn spec(name: &str, url: &str, memory_mib: u64) -> VmSpec {
    VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib,
        disk_gib: 0,
        pool: "default".into(),
        image: Some(ImageSource { url: url.into(), sha256: String::new(), format: ImageFormat::Qcow2 as i32 }),
        cloud_init: Some(CloudInit::default()),
    }
}

async fn create(c: &mut Client, task: &str, name: &str, url: &str, mem: u64) -> anyhow::Result<(String, Task)> {
    let id = uuid::Uuid::new_v4().to_string();
    let t = c
        .create_vm(CreateVmRequest {
            task_id: task.into(),
            vm_id: id.clone(),
            generation: 1,
            spec: Some(spec(name, url, mem)),
        })
        .await?
        .into_inner();
    Ok((id, finish(c, t).await?))
}

async fn delete(c: &mut Client, task: &str, id: &str) -> anyhow::Result<()> {
    let t = c.delete_vm(DeleteVmRequest { task_id: task.into(), vm_id: id.into() }).await?.into_inner();
    finish(c, t).await.map(|_| ())
}

/// Follows the VM's serial log until the boot marker; returns when seen.
async fn wait_marker(c: &mut Client, id: &str) -> anyhow::Result<()> {
    let mut stream =
        c.read_log(ReadLogRequest { vm_id: id.into(), tail_bytes: None, follow: true }).await?.into_inner();
    let mut seen = Vec::new();
    while let Some(m) = stream.message().await? {
        seen.extend_from_slice(&m.data);
        if String::from_utf8_lossy(&seen).contains(BOOT_MARKER) {
            return Ok(());
        }
    }
    bail!("vm {id} stopped before printing the boot marker")
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{:?}: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A bare QEMU launch: the same command line the agent builds (without -S,
/// nobody needs to attach first), disk and seed made beforehand; timed from
/// spawn until QMP reports running.
async fn bare_launch(dir: &Path, image: &Path, mem: u64, n: usize) -> anyhow::Result<(Duration, Duration)> {
    let run_dir = dir.join(format!("bare-{n}"));
    std::fs::create_dir_all(&run_dir)?;
    let disk = run_dir.join("disk.qcow2");
    run(Command::new("qemu-img").args(["convert", "-q", "-f", "qcow2", "-O", "qcow2"]).arg(image).arg(&disk))?;
    std::fs::write(run_dir.join("meta-data"), format!("instance-id: bare-{n}\nlocal-hostname: bare-{n}\n"))?;
    std::fs::write(run_dir.join("user-data"), "#cloud-config\n")?;
    let seed = run_dir.join("seed.iso");
    run(Command::new("genisoimage")
        .args(["-quiet", "-output"])
        .arg(&seed)
        .args(["-volid", "cidata", "-joliet", "-rock"])
        .arg(run_dir.join("user-data"))
        .arg(run_dir.join("meta-data")))?;
    let q = QemuConfig::default();
    let launch = Launch {
        name: format!("bare-{n}"),
        uuid: uuid::Uuid::new_v4(),
        accel: qemu::choose_accel(AccelSetting::Auto),
        vcpus: 1,
        memory_mib: mem,
        run_dir: run_dir.clone(),
        disk,
        seed: Some(seed),
    };
    let args: Vec<_> = qemu::command_line(&launch, &q)?.into_iter().filter(|a| a != "-S").collect();
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(&q.binary)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let qmp = Qmp::connect(&run_dir.join("qmp.sock"), Duration::from_secs(30), Duration::from_secs(10)).await?;
    while qmp.query_status().await?.status != "running" {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let to_running = t0.elapsed();
    let log = run_dir.join("console.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read(&log).is_ok_and(|b| String::from_utf8_lossy(&b).contains(BOOT_MARKER)) {
        if Instant::now() > deadline {
            bail!("bare VM never printed the boot marker");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let to_marker = t0.elapsed();
    let _ = qmp.execute("quit", None).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok((to_running, to_marker))
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let agent_bin = match args.agent_bin {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("otherix-agent"),
    };
    if args.runs == 0 || args.vms == 0 {
        bail!("--runs and --vms must be at least 1");
    }
    let image = otherix_agent_testkit::test_image();
    let _slots = vm_slots(2);
    let dir = TestDir::new("bench");
    let mut routes = HashMap::new();
    routes.insert("/img/bench.qcow2".to_string(), Route::File(image.qcow2()));
    let http = HttpServer::start(routes).await;
    let url = http.url("/img/bench.qcow2");
    let socket = dir.path.join("agent.sock");
    let config = dir.path.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  unix_socket: {}\nlog:\n  level: warn\nruntime:\n  state_dir: {d}/state\n  pools:\n    - name: default\n      path: {d}/pool\n  images:\n    allowed_schemes: [http]\n    fetch_allow: [127.0.0.1]\n",
            socket.display(),
            d = dir.path.display()
        ),
    )?;
    let agent = Agent(
        Command::new(&agent_bin)
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", agent_bin.display()))?,
    );
    let mut c = connect(&socket).await?;
    let accel = qemu::choose_accel(AccelSetting::Auto);

    // Warm the image cache: every timed create then finds the image cached.
    let (warm, _) = create(&mut c, "warm", "warm", &url, args.memory_mib).await?;
    delete(&mut c, "warm-del", &warm).await?;
    let rss0 = rss_kib(agent.0.id())?;

    let mut agent_s = Vec::new();
    let mut agent_boot = Vec::new();
    let mut bare_s = Vec::new();
    let mut bare_boot = Vec::new();
    for n in 0..args.runs {
        let t0 = Instant::now();
        let (id, t) = create(&mut c, &format!("lat-{n}"), &format!("lat-{n}"), &url, args.memory_mib).await?;
        agent_s.push(secs(t.updated_at) - secs(t.created_at));
        wait_marker(&mut c, &id).await?;
        agent_boot.push(t0.elapsed().as_secs_f64());
        delete(&mut c, &format!("lat-del-{n}"), &id).await?;
        let (run, boot) = bare_launch(&dir.path, &image.qcow2(), args.memory_mib, n).await?;
        bare_s.push(run.as_secs_f64());
        bare_boot.push(boot.as_secs_f64());
    }

    // N running VMs, booted two at a time.
    let mut ids = Vec::new();
    let mut n = 0;
    while n < args.vms {
        let batch = (args.vms - n).min(2);
        let mut pending = Vec::new();
        for k in n..n + batch {
            let id = uuid::Uuid::new_v4().to_string();
            let t = c
                .create_vm(CreateVmRequest {
                    task_id: format!("rss-{k}"),
                    vm_id: id.clone(),
                    generation: 1,
                    spec: Some(spec(&format!("rss-{k}"), &url, args.memory_mib)),
                })
                .await?
                .into_inner();
            pending.push((id, t));
        }
        // The next pair starts only when this pair has booted.
        for (id, t) in pending {
            finish(&mut c, t).await?;
            wait_marker(&mut c, &id).await?;
            ids.push(id);
        }
        n += batch;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_n = rss_kib(agent.0.id())?;
    let vms = c.list_vms(otherix_proto::otherix::agent::v1::ListVmsRequest {}).await?.into_inner().vms;
    let qemu_rss: u64 = vms.iter().filter_map(|v| rss_kib(v.pid as u32).ok()).sum();
    let running = vms.iter().filter(|v| v.qmp_status == "running").count();
    for (k, id) in ids.iter().enumerate() {
        delete(&mut c, &format!("rss-del-{k}"), id).await?;
    }

    let (amin, amed, amax) = stats(&mut agent_s);
    let (bmin, bmed, bmax) = stats(&mut bare_s);
    let (cmin, cmed, cmax) = stats(&mut agent_boot);
    let (dmin, dmed, dmax) = stats(&mut bare_boot);
    println!("otherix-agent bench ({accel:?}, test image, cached, -m {}M, {} runs)", args.memory_mib, args.runs);
    println!(
        "create-to-running via agent (task accepted -> QMP running): min {amin:.3}s  median {amed:.3}s  max {amax:.3}s"
    );
    println!(
        "bare qemu launch (spawn -> QMP running), same command line:  min {bmin:.3}s  median {bmed:.3}s  max {bmax:.3}s"
    );
    println!("agent overhead (median ratio): {:.2}x  (+{:.3}s)", amed / bmed, amed - bmed);
    println!(
        "to the guest's boot marker: via agent (RPC sent) min {cmin:.2}s median {cmed:.2}s max {cmax:.2}s; bare (spawn) min {dmin:.2}s median {dmed:.2}s max {dmax:.2}s; ratio {:.2}x",
        cmed / dmed
    );
    println!("agent RSS with 0 VMs: {:.1} MiB", rss0 as f64 / 1024.0);
    println!(
        "agent RSS with {} running VMs: {:.1} MiB  (QEMU total {:.0} MiB)",
        running,
        rss_n as f64 / 1024.0,
        qemu_rss as f64 / 1024.0
    );
    drop(agent);
    Ok(())
}

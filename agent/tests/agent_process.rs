//! The real `otherix-agent` binary over its unix socket: create two VMs from
//! an HTTP server, use the console and the log reader, `kill -9` the agent,
//! and check that a restarted agent re-adopts both running VMs (same pids)
//! and can stop them through ACPI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use otherix_agent::service::error_code;
use otherix_agent_testkit::{AgentProcess, BOOT_MARKER, HttpServer, Route, TestDir, vm_slots, wait_for};
use otherix_proto::otherix::agent::v1::vm_runtime_service_client::VmRuntimeServiceClient;
use otherix_proto::otherix::agent::v1::{
    CloudInit, ConsoleOpen, ConsoleRequest, CreateVmRequest, DeleteVmRequest, GetTaskRequest, ImageFormat, ImageSource,
    ListPoolsRequest, ListVmsRequest, ReadLogRequest, StopVmRequest, Task, TaskState, VmPhase, VmSpec, console_request,
};
use tokio::net::UnixStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint, Uri};

type Client = VmRuntimeServiceClient<Channel>;

/// Starts the agent binary built for these tests.
fn start_agent(config: &Path, log: &Path) -> AgentProcess {
    AgentProcess::start(Path::new(env!("CARGO_BIN_EXE_otherix-agent")), config, log)
}

async fn connect(socket: PathBuf) -> Client {
    let ch = wait_for("the agent socket", Duration::from_secs(60), || {
        let socket = socket.clone();
        async move {
            let ep = Endpoint::try_from("http://agent.local").unwrap();
            ep.connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { UnixStream::connect(socket).await.map(TokioIo::new) }
            }))
            .await
            .ok()
        }
    })
    .await;
    VmRuntimeServiceClient::new(ch)
}

async fn finish(c: &mut Client, t: Task) -> Task {
    for _ in 0..4 {
        let t = c.get_task(GetTaskRequest { task_id: t.task_id.clone(), wait_ms: 60_000 }).await.unwrap().into_inner();
        if t.state != TaskState::Running as i32 {
            return t;
        }
    }
    panic!("task {} did not finish", t.task_id);
}

fn assert_ok(t: &Task) {
    assert_eq!(t.state, TaskState::Succeeded as i32, "{:?}", t.error);
}

fn spec(name: &str, url: String, format: ImageFormat) -> VmSpec {
    VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 0,
        pool: "default".into(),
        image: Some(ImageSource { url, sha256: String::new(), format: format as i32 }),
        cloud_init: Some(CloudInit::default()),
    }
}

/// Reads the VM's log (following) until `needle` shows up.
async fn log_until(c: &mut Client, vm_id: &str, needle: &str) -> String {
    let mut stream =
        c.read_log(ReadLogRequest { vm_id: vm_id.into(), tail_bytes: None, follow: true }).await.unwrap().into_inner();
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(Ok(m)) = stream.next().await {
            seen.push_str(&String::from_utf8_lossy(&m.data));
            if seen.contains(needle) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "{needle:?} not in the log: {seen}");
    seen
}

/// Logs in on the console and checks the guest computes an answer.
async fn console_echo(c: &mut Client, vm_id: &str, token: &str) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(ConsoleRequest { kind: Some(console_request::Kind::Open(ConsoleOpen { vm_id: vm_id.into() })) })
        .await
        .unwrap();
    let mut out = c.console(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    // A second session is refused while this one is open.
    let (tx2, rx2) = tokio::sync::mpsc::channel(1);
    tx2.send(ConsoleRequest { kind: Some(console_request::Kind::Open(ConsoleOpen { vm_id: vm_id.into() })) })
        .await
        .unwrap();
    let second = c.console(tokio_stream::wrappers::ReceiverStream::new(rx2)).await;
    let err = second.expect_err("second console session accepted");
    assert_eq!(error_code(&err).as_deref(), Some("console_in_use"));
    let input = |s: &str| ConsoleRequest { kind: Some(console_request::Kind::Input(s.as_bytes().to_vec())) };
    let mut seen = String::new();
    // Reads the console until `needle` appears after what was seen so far.
    async fn until(
        out: &mut tonic::Streaming<otherix_proto::otherix::agent::v1::ConsoleResponse>,
        seen: &mut String,
        needle: &str,
    ) -> bool {
        let start = seen.len();
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(Ok(m)) = out.next().await {
                seen.push_str(&String::from_utf8_lossy(&m.output));
                if seen[start..].contains(needle) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false)
    }
    // Enter for a fresh prompt, log in, then ask for arithmetic the echo cannot fake.
    tx.send(input("\n")).await.unwrap();
    assert!(until(&mut out, &mut seen, "login:").await, "no login prompt: {seen:?}");
    tx.send(input("root\n")).await.unwrap();
    assert!(until(&mut out, &mut seen, "#").await, "no shell prompt: {seen:?}");
    tx.send(input(&format!("echo {token}-$((6*7))-done\n"))).await.unwrap();
    let want = format!("{token}-42-done");
    assert!(until(&mut out, &mut seen, &want).await, "no {want:?} from the guest: {seen:?}");
}

/// The session id of a process (field 6 of /proc/<pid>/stat).
fn session_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) may hold spaces; fields after its ')' are plain.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(3).unwrap().parse().unwrap()
}

fn pid_alive_as_vm(pid: i32, vm_id: &str) -> bool {
    otherix_vm_runtime::qemu::pid_runs_vm(pid, &uuid::Uuid::parse_str(vm_id).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_survive_agent_kill_and_are_readopted() {
    let _slots = vm_slots(2);
    let image = otherix_agent_testkit::test_image();
    let dir = TestDir::new("agent");
    let mut routes = HashMap::new();
    routes.insert("/img/test.qcow2".to_string(), Route::File(image.qcow2()));
    routes.insert("/img/test.raw".to_string(), Route::File(image.raw()));
    let http = HttpServer::start(routes).await;
    let socket = dir.path.join("agent.sock");
    let config = dir.path.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  unix_socket: {sock}\nruntime:\n  state_dir: {d}/state\n  pools:\n    - name: default\n      path: {d}/pool\n  qemu:\n    accel: tcg\n    stop_timeout_secs: 60\n  images:\n    allowed_schemes: [http]\n    fetch_allow: [127.0.0.1]\n",
            sock = socket.display(),
            d = dir.path.display()
        ),
    )
    .unwrap();
    let agent_log = dir.path.join("agent.log");

    let mut agent = start_agent(&config, &agent_log);
    let mut c = connect(socket.clone()).await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    let (a, b) = (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
    let ta = c
        .create_vm(CreateVmRequest {
            task_id: "k-a".into(),
            vm_id: a.clone(),
            generation: 1,
            spec: Some(spec("vm-a", http.url("/img/test.qcow2"), ImageFormat::Qcow2)),
        })
        .await
        .unwrap()
        .into_inner();
    let tb = c
        .create_vm(CreateVmRequest {
            task_id: "k-b".into(),
            vm_id: b.clone(),
            generation: 1,
            spec: Some(spec("vm-b", http.url("/img/test.raw"), ImageFormat::Raw)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ok(&finish(&mut c, ta).await);
    assert_ok(&finish(&mut c, tb).await);
    let l = log_until(&mut c, &a, BOOT_MARKER).await;
    assert!(l.contains("local-hostname=vm-a"), "{l}");
    let l = log_until(&mut c, &b, "vm-b login:").await;
    assert!(l.contains("local-hostname=vm-b"), "{l}");
    console_echo(&mut c, &a, "before-kill").await;

    // A repeated create is the same task and makes no second QEMU.
    let again = c
        .create_vm(CreateVmRequest {
            task_id: "k-a".into(),
            vm_id: a.clone(),
            generation: 1,
            spec: Some(spec("vm-a", http.url("/img/test.qcow2"), ImageFormat::Qcow2)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.state, TaskState::Succeeded as i32);

    let vms = c.list_vms(ListVmsRequest {}).await.unwrap().into_inner().vms;
    let pids: HashMap<String, i32> = vms.iter().map(|v| (v.id.clone(), v.pid)).collect();
    assert_eq!(pids.len(), 2);
    assert!(vms.iter().all(|v| v.phase == VmPhase::Running as i32 && v.qmp_status == "running"));
    let pools = c.list_pools(ListPoolsRequest {}).await.unwrap().into_inner().pools;
    let mut cached: Vec<_> = pools[0].images.iter().map(|i| i.name.as_str()).collect();
    cached.sort();
    assert_eq!(cached, ["test.qcow2", "test.raw"]);

    // Each QEMU leads its own session, apart from the agent's.
    let agent_session = session_of(agent.child.id() as i32);
    for pid in pids.values() {
        assert_eq!(session_of(*pid), *pid, "qemu {pid} is not a session leader");
        assert_ne!(session_of(*pid), agent_session);
    }

    // kill -9 the agent: both VMs keep running.
    agent.kill9();
    drop(c);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (id, pid) in &pids {
        assert!(pid_alive_as_vm(*pid, id), "vm {id} (pid {pid}) died with the agent");
    }

    // A new agent re-adopts both: same pids, running, console and log work, stop works.
    let mut agent2 = start_agent(&config, &agent_log);
    let mut c = connect(socket.clone()).await;
    let vms = c.list_vms(ListVmsRequest {}).await.unwrap().into_inner().vms;
    assert_eq!(vms.len(), 2);
    for v in &vms {
        assert_eq!(v.phase, VmPhase::Running as i32, "{v:?}");
        assert_eq!(v.qmp_status, "running");
        assert_eq!(Some(&v.pid), pids.get(&v.id), "pid changed for {}", v.id);
    }
    // The boot output from before the restart is still readable (from the serial log).
    let l = log_until(&mut c, &a, BOOT_MARKER).await;
    assert!(l.contains("local-hostname=vm-a"));
    console_echo(&mut c, &b, "after-restart").await;
    // Tasks from before the restart are still answered.
    let t = c.get_task(GetTaskRequest { task_id: "k-b".into(), wait_ms: 0 }).await.unwrap().into_inner();
    assert_eq!(t.state, TaskState::Succeeded as i32);

    // A re-adopted QEMU that dies is noticed through its pidfd.
    let pid_b = rustix::process::Pid::from_raw(pids[b.as_str()]).unwrap();
    rustix::process::kill_process(pid_b, rustix::process::Signal::KILL).unwrap();
    let crashed = wait_for("vm-b to show as crashed", Duration::from_secs(30), || {
        let mut c = c.clone();
        let b = b.clone();
        async move {
            let v = c.get_vm(otherix_proto::otherix::agent::v1::GetVmRequest { vm_id: b }).await.unwrap().into_inner();
            (v.phase == VmPhase::Failed as i32).then_some(v)
        }
    })
    .await;
    assert_eq!((crashed.reason.as_str(), crashed.pid), ("crashed", 0));

    for (n, id) in [&a].into_iter().enumerate() {
        let t = c
            .stop_vm(StopVmRequest { task_id: format!("s-{n}"), vm_id: id.clone(), timeout_seconds: 0 })
            .await
            .unwrap()
            .into_inner();
        assert_ok(&finish(&mut c, t).await);
        let pid = pids[id.as_str()];
        assert!(!pid_alive_as_vm(pid, id), "vm {id} still runs after stop");
        let v =
            c.get_vm(otherix_proto::otherix::agent::v1::GetVmRequest { vm_id: id.clone() }).await.unwrap().into_inner();
        assert_eq!((v.phase, v.reason.as_str()), (VmPhase::Stopped as i32, "stopped"));
    }
    let l = std::fs::read_to_string(dir.path.join(format!("state/vms/{a}/console.log"))).unwrap();
    assert!(l.contains("ACPI power button -> poweroff"), "stop did not go through ACPI");

    // A QEMU that ends while the agent is down shows as gone after the restart.
    let t = c
        .start_vm(otherix_proto::otherix::agent::v1::StartVmRequest { task_id: "restart-a".into(), vm_id: a.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_ok(&finish(&mut c, t).await);
    let pid_a =
        c.get_vm(otherix_proto::otherix::agent::v1::GetVmRequest { vm_id: a.clone() }).await.unwrap().into_inner().pid;
    agent2.kill9();
    drop(c);
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid_a).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    wait_for("qemu a to end", Duration::from_secs(10), || async { (!pid_alive_as_vm(pid_a, &a)).then_some(()) }).await;
    let _agent3 = start_agent(&config, &agent_log);
    let mut c = connect(socket.clone()).await;
    let v = c.get_vm(otherix_proto::otherix::agent::v1::GetVmRequest { vm_id: a.clone() }).await.unwrap().into_inner();
    assert_eq!((v.phase, v.reason.as_str(), v.pid), (VmPhase::Stopped as i32, "process_gone", 0));

    // Delete both; deleting again reports the VM gone.
    for (n, id) in [&a, &b].into_iter().enumerate() {
        let t =
            c.delete_vm(DeleteVmRequest { task_id: format!("d-{n}"), vm_id: id.clone() }).await.unwrap().into_inner();
        assert_ok(&finish(&mut c, t).await);
        let t =
            c.delete_vm(DeleteVmRequest { task_id: format!("d2-{n}"), vm_id: id.clone() }).await.unwrap().into_inner();
        let t = finish(&mut c, t).await;
        assert_eq!(t.error.map(|e| e.code).as_deref(), Some("vm_not_found"));
    }
    let err = c.get_vm(otherix_proto::otherix::agent::v1::GetVmRequest { vm_id: a.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(error_code(&err).as_deref(), Some("vm_not_found"));
    let err = c.get_task(GetTaskRequest { task_id: "nope".into(), wait_ms: 0 }).await.unwrap_err();
    assert_eq!(error_code(&err).as_deref(), Some("not_found"));
    let log = std::fs::read_to_string(&agent_log).unwrap();
    assert!(log.contains("re-adopted running qemu"), "{log}");
}

//! Shared set-up for the runtime's real-QEMU tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use otherix_agent_testkit::{HttpServer, Route, TestDir, TestImage};
use otherix_proto::otherix::agent::v1::{
    CloudInit, CreateVmRequest, ImageFormat, ImageSource, Task, TaskState, VmSpec,
};
use otherix_qmp::Qmp;
use otherix_vm_runtime::config::{AccelSetting, PoolConfig};
use otherix_vm_runtime::{Runtime, RuntimeConfig};

/// A runtime on a fresh state dir with one pool `default`, and an HTTP server
/// serving the test image.
pub struct Env {
    pub rt: Runtime,
    pub http: HttpServer,
    pub image: TestImage,
    pub pool: PathBuf,
    pub dir: TestDir,
}

pub fn config(dir: &TestDir) -> RuntimeConfig {
    let mut cfg = RuntimeConfig::new(dir.path.join("state"));
    cfg.pools = vec![PoolConfig { name: "default".into(), path: dir.path.join("pool") }];
    cfg.qemu.accel = AccelSetting::Tcg;
    cfg.qemu.stop_timeout_secs = 30;
    cfg.images.allowed_schemes = vec!["http".into(), "file".into()];
    // The test HTTP server listens on loopback, which the fetch policy refuses by default.
    cfg.images.fetch_allow = vec!["127.0.0.1".into()];
    // file:// reads only the test image's directory.
    cfg.images.file_dir = Some(otherix_agent_testkit::test_image().raw().parent().expect("image dir").to_path_buf());
    cfg
}

pub async fn env(tag: &str, extra_routes: HashMap<String, Route>) -> Env {
    env_with(tag, extra_routes, |_| {}).await
}

/// Like [`env`], with a chance to change the config first.
pub async fn env_with(tag: &str, extra_routes: HashMap<String, Route>, tweak: impl FnOnce(&mut RuntimeConfig)) -> Env {
    let image = otherix_agent_testkit::test_image();
    let dir = TestDir::new(tag);
    let mut routes = extra_routes;
    routes.insert("/images/test.qcow2".into(), Route::File(image.qcow2()));
    routes.insert("/images/test.raw".into(), Route::File(image.raw()));
    let http = HttpServer::start(routes).await;
    let mut cfg = config(&dir);
    tweak(&mut cfg);
    let rt = Runtime::open(cfg).await.expect("open runtime");
    Env { rt, http, image, pool: dir.path.join("pool"), dir }
}

pub fn spec(name: &str, url: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 0,
        pool: "default".into(),
        image: Some(ImageSource { url: url.into(), sha256: String::new(), format: ImageFormat::Qcow2 as i32 }),
        cloud_init: Some(CloudInit {
            disabled: false,
            user_data: "#cloud-config\n# otherix-message: hello from the test\n".into(),
            network_config: String::new(),
        }),
    }
}

pub fn create_req(task_id: &str, vm_id: &str, spec: VmSpec) -> CreateVmRequest {
    CreateVmRequest { task_id: task_id.into(), vm_id: vm_id.into(), generation: 1, spec: Some(spec) }
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Waits until the task finishes (at most 3 minutes).
pub async fn finish(rt: &Runtime, task: Task) -> Task {
    for _ in 0..3 {
        let t = rt.get_task(&task.task_id, Duration::from_secs(60)).await.expect("task");
        if t.state != TaskState::Running as i32 {
            return t;
        }
    }
    panic!("task {} still running after 3 minutes", task.task_id);
}

pub fn assert_ok(t: &Task) {
    assert_eq!(t.state, TaskState::Succeeded as i32, "task failed: {:?}", t.error);
}

pub fn assert_failed(t: &Task, code: &str) {
    assert_eq!(t.state, TaskState::Failed as i32, "task did not fail: {t:?}");
    assert_eq!(t.error.as_ref().map(|e| e.code.as_str()), Some(code), "{t:?}");
}

/// The serial output the runtime retains for a VM.
pub async fn log(rt: &Runtime, vm_id: &str) -> String {
    let mut r = rt.read_log(vm_id, None, false).expect("read log");
    let mut out = Vec::new();
    while let Some((b, _)) = r.next().await {
        out.extend_from_slice(&b);
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Waits until the serial output contains `needle` at least `count` times.
pub async fn wait_log(rt: &Runtime, vm_id: &str, needle: &str, count: usize) -> String {
    otherix_agent_testkit::wait_for(
        &format!("{needle:?} x{count} in the serial log"),
        Duration::from_secs(60),
        || async {
            let l = log(rt, vm_id).await;
            (l.matches(needle).count() >= count).then_some(l)
        },
    )
    .await
}

/// An independent QMP session on the VM's operator socket.
pub async fn ops_qmp(rt: &Runtime, vm_id: &str) -> Qmp {
    let path = rt.vm_dir(vm_id).unwrap().join("qmp-ops.sock");
    Qmp::connect(&path, Duration::from_secs(5), Duration::from_secs(10)).await.expect("ops qmp")
}

pub async fn qmp_status(rt: &Runtime, vm_id: &str) -> String {
    ops_qmp(rt, vm_id).await.query_status().await.expect("query-status").status
}

/// Pids of processes whose command line carries `-uuid <vm_id>`.
pub fn qemu_pids(vm_id: &str) -> Vec<i32> {
    let u = uuid::Uuid::parse_str(vm_id).unwrap();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>()
            && otherix_vm_runtime::qemu::pid_runs_vm(pid, &u)
        {
            out.push(pid);
        }
    }
    out
}

/// Files left anywhere under the pool's disks dir and the state's vms dir.
pub fn leftovers(env: &Env) -> Vec<String> {
    let mut out = Vec::new();
    for d in [env.pool.join("disks"), env.dir.path.join("state/vms"), env.pool.join("images/.partial")] {
        if let Ok(it) = std::fs::read_dir(&d) {
            out.extend(it.flatten().map(|e| e.path().display().to_string()));
        }
    }
    out
}

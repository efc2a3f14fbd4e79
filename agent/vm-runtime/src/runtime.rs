//! The runtime: VMs and tasks, their records on disk, QEMU processes and their
//! monitors, and re-adoption of running QEMUs after an agent restart.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use otherix_proto::otherix::agent::v1::{
    Accelerator, CreateVmRequest, ImageFormat, Pool, Task, TaskError, TaskKind, TaskProgress, TaskState, Vm, VmPhase,
    VmSpec,
};
use otherix_qmp::{Event, Qmp};
use rustix::process::{Pid, PidfdFlags, Signal};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, watch};
use tracing::{Instrument, error, info, info_span, warn};
use uuid::Uuid;

use crate::cache::{ImageCache, ImageRequest};
use crate::config::RuntimeConfig;
use crate::console::{Console, LogReader, Session};
use crate::qemu::{self, HostLimits, Launch};
use crate::state::{self, Layout, Pending, Persister, vm_files};
use crate::{AgentError, disk, pool, validate};

/// Largest user-data accepted.
const MAX_USER_DATA: usize = 1 << 20;
/// Largest network-config accepted.
const MAX_NETWORK_CONFIG: usize = 64 << 10;
/// Bound on any single QMP command.
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// RESET events closer together than this are one reset: after a host reset
/// SeaBIOS resets the machine itself once or more (measured here: one to four
/// guest RESETs within ~120 ms), far sooner than any guest could boot and reboot.
const RESET_BURST_WINDOW: Duration = Duration::from_secs(3);
/// Longest GetTask wait.
const MAX_TASK_WAIT: Duration = Duration::from_secs(60);

/// Machine-readable reasons in `Vm.reason`.
pub mod reason {
    /// The guest powered itself off (or answered an ACPI power-down).
    pub const GUEST_SHUTDOWN: &str = "guest_shutdown";
    /// A StopVm completed.
    pub const STOPPED: &str = "stopped";
    /// A PoweroffVm ended QEMU.
    pub const POWERED_OFF: &str = "powered_off";
    /// QEMU exited without a shutdown event.
    pub const CRASHED: &str = "crashed";
    /// The guest stopped with QMP status internal-error.
    pub const ACCELERATOR_FAILURE: &str = "accelerator_failure";
    /// QEMU ended while the agent was not running.
    pub const PROCESS_GONE: &str = "process_gone";
    /// PauseVm paused the guest.
    pub const PAUSED: &str = "paused";
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the agent is ending a QEMU process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    Stop,
    Poweroff,
}

/// The running QEMU of a VM.
#[derive(Debug, Clone)]
struct Proc {
    pid: i32,
    qmp: Qmp,
    exited: watch::Receiver<bool>,
}

impl Proc {
    /// Waits until the process has exited, up to `timeout`; true if it did.
    async fn wait_exit(&self, timeout: Duration) -> bool {
        let mut rx = self.exited.clone();
        matches!(tokio::time::timeout(timeout, rx.wait_for(|e| *e)).await, Ok(Ok(_)) | Ok(Err(_)))
    }
}

#[derive(Debug)]
struct VmHandle {
    id: Uuid,
    dir: PathBuf,
    persist: Persister,
    record: Mutex<Vm>,
    /// A start is admitted and under way: the VM's memory counts as placed.
    starting: AtomicBool,
    op: tokio::sync::Mutex<()>,
    console: Arc<Console>,
    proc_: Mutex<Option<Proc>>,
    intent: Mutex<Option<Intent>>,
}

impl VmHandle {
    fn record(&self) -> Vm {
        lock(&self.record).clone()
    }

    fn proc_(&self) -> Option<Proc> {
        lock(&self.proc_).clone()
    }

    /// Changes the record and queues its write (in the order of changes; the
    /// writer thread logs a failure). Await the result for durability.
    fn update(&self, f: impl FnOnce(&mut Vm)) -> Pending {
        let mut r = lock(&self.record);
        f(&mut r);
        self.persist.save(&self.dir.join(vm_files::RECORD), &*r)
    }

    /// Memory (MiB) the VM holds on the host: QEMU runs, or a create or start is under way.
    fn placed_memory_mib(&self) -> u64 {
        // A QEMU that still runs holds its memory whatever the phase says (e.g. FAILED on an
        // accelerator error).
        let running = self.proc_().is_some();
        let r = lock(&self.record);
        let placed = running
            || self.starting.load(Ordering::SeqCst)
            || matches!(
                VmPhase::try_from(r.phase),
                Ok(VmPhase::Creating | VmPhase::Running | VmPhase::Paused | VmPhase::Stopping)
            );
        if placed { r.spec.as_ref().map_or(0, |s| s.memory_mib) } else { 0 }
    }

    fn set_phase(&self, phase: VmPhase, reason: &str, message: &str) -> Pending {
        self.update(|r| {
            r.phase = phase as i32;
            r.reason = reason.to_string();
            r.message = message.to_string();
        })
    }
}

struct Shared {
    cfg: RuntimeConfig,
    persist: Persister,
    layout: Layout,
    accel: Accelerator,
    host: HostLimits,
    cache: ImageCache,
    pools: Mutex<BTreeMap<String, PathBuf>>,
    vms: Mutex<BTreeMap<Uuid, Arc<VmHandle>>>,
    tasks: Mutex<HashMap<String, Task>>,
    task_changed: watch::Sender<u64>,
}

/// The agent's VM runtime. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    s: Arc<Shared>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("state_dir", &self.s.layout.root).finish()
    }
}

impl Runtime {
    /// Opens the runtime on its state dir: loads task and VM records,
    /// re-adopts every QEMU still running, cleans up after interrupted work.
    pub async fn open(cfg: RuntimeConfig) -> Result<Runtime, AgentError> {
        let span = info_span!("runtime.open", state_dir = %cfg.state_dir.display());
        async move {
            if !cfg.state_dir.is_absolute() {
                return Err(AgentError::Validation("state_dir must be an absolute path".into()));
            }
            // Unix socket paths must fit in 108 bytes: state_dir/vms/<uuid>/qmp-ops.sock.
            if cfg.state_dir.as_os_str().len() + 5 + 36 + 14 > 107 {
                return Err(AgentError::Validation("state_dir is too long for unix socket paths".into()));
            }
            for s in &cfg.images.allowed_schemes {
                if !matches!(s.as_str(), "https" | "http" | "file") {
                    return Err(AgentError::Validation(format!("images.allowed_schemes: unknown scheme {s:?}")));
                }
            }
            if cfg.images.allowed_schemes.iter().any(|s| s == "file") && cfg.images.file_dir.is_none() {
                return Err(AgentError::Validation(
                    "images.allowed_schemes has file, but images.file_dir (the only directory file:// may read) is not set"
                        .into(),
                ));
            }
            let layout = Layout { root: cfg.state_dir.clone() };
            let (l, c) = (layout.clone(), cfg.clone());
            let (pools, accel, host) = state::blocking(move || {
                state::private_dir(&l.vms())?;
                state::private_dir(&l.tasks())?;
                state::sweep_temp_files(&l.tasks());
                let mut pools = BTreeMap::new();
                for p in &c.pools {
                    pool::validate(&p.name, &p.path)?;
                    pool::ensure(&p.path)?;
                    sweep_partial_downloads(&p.path);
                    pools.insert(p.name.clone(), p.path.clone());
                }
                Ok((pools, qemu::choose_accel(c.qemu.accel), qemu::host_limits()))
            })
            .await?;
            info!(accelerator = ?accel, cpus = host.cpus, memory_mib = host.memory_mib, "host");
            let rt = Runtime {
                s: Arc::new(Shared {
                    cache: ImageCache::new(cfg.images.clone())?,
                    persist: Persister::start()?,
                    cfg,
                    layout,
                    accel,
                    host,
                    pools: Mutex::new(pools),
                    vms: Mutex::new(BTreeMap::new()),
                    tasks: Mutex::new(HashMap::new()),
                    task_changed: watch::channel(0).0,
                }),
            };
            rt.load_tasks().await?;
            rt.load_vms().await?;
            Ok(rt)
        }
        .instrument(span)
        .await
    }

    /// The accelerator new VMs get.
    pub fn accelerator(&self) -> Accelerator {
        self.s.accel
    }

    /// The host's CPU and memory limits.
    pub fn host_limits(&self) -> HostLimits {
        self.s.host
    }

    /// Declares a pool (from the control plane); its directory is created now.
    pub async fn declare_pool(&self, name: &str, path: &Path) -> Result<(), AgentError> {
        pool::validate(name, path)?;
        let p = path.to_path_buf();
        state::blocking(move || pool::ensure(&p)).await?;
        lock(&self.s.pools).insert(name.to_string(), path.to_path_buf());
        Ok(())
    }

    fn pool_path(&self, name: &str) -> Result<PathBuf, AgentError> {
        lock(&self.s.pools).get(name).cloned().ok_or_else(|| AgentError::PoolNotFound(name.to_string()))
    }

    /// Every pool, scanned now (on the blocking pool: statvfs and directory scans).
    pub async fn list_pools(&self) -> Vec<Pool> {
        let pools: Vec<_> = lock(&self.s.pools).clone().into_iter().collect();
        let rt = self.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            pools
                .into_iter()
                .filter_map(|(name, path)| match pool::scan(&name, &path, &rt.s.cache) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        warn!(pool = %name, error = %e.message(), "pool scan failed");
                        None
                    }
                })
                .collect()
        })
        .await;
        scanned.unwrap_or_default()
    }

    /// Scans one pool.
    pub async fn scan_pool(&self, name: &str) -> Result<Pool, AgentError> {
        let span = info_span!("pool.scan", pool = name);
        let path = self.pool_path(name)?;
        let (rt, name) = (self.clone(), name.to_string());
        state::blocking(move || pool::scan(&name, &path, &rt.s.cache)).instrument(span).await
    }

    // ---------------------------------------------------------------- tasks

    async fn load_tasks(&self) -> Result<(), AgentError> {
        let retention = Duration::from_secs(self.s.cfg.task_retention_hours * 3600);
        let dir = self.s.layout.tasks();
        let loaded = state::blocking(move || {
            let now = SystemTime::now();
            let entries = std::fs::read_dir(&dir).map_err(|e| AgentError::io("read tasks dir", e))?;
            let mut out = Vec::new();
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_none_or(|x| x != "pb") {
                    continue;
                }
                let Ok(Some(mut t)) = state::load::<Task>(&path) else {
                    warn!(path = %path.display(), "unreadable task record skipped");
                    continue;
                };
                if t.state != TaskState::Running as i32 && task_age(&t, now) > retention {
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                if t.state == TaskState::Running as i32 {
                    // The agent died while the task ran; its caller starts a new task.
                    fail_task(&mut t, &AgentError::TaskLost);
                    state::save(&path, &t)?;
                }
                out.push(t);
            }
            Ok(out)
        })
        .await?;
        let mut tasks = lock(&self.s.tasks);
        for t in loaded {
            tasks.insert(t.task_id.clone(), t);
        }
        Ok(())
    }

    /// Forgets finished tasks older than the retention, in memory and on disk.
    /// Prunes finished tasks every hour until `stop` resolves; long-running
    /// agents would otherwise keep every task forever. Run it under the
    /// daemon's supervisor.
    pub async fn run_pruning(&self, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => self.prune_tasks().await,
                () = &mut stop => return,
            }
        }
    }

    async fn prune_tasks(&self) {
        let retention = Duration::from_secs(self.s.cfg.task_retention_hours * 3600);
        let now = SystemTime::now();
        let files: Vec<PathBuf> = {
            let mut tasks = lock(&self.s.tasks);
            let old: Vec<String> = tasks
                .values()
                .filter(|t| t.state != TaskState::Running as i32 && task_age(t, now) > retention)
                .map(|t| t.task_id.clone())
                .collect();
            old.iter().filter_map(|id| tasks.remove(id)).map(|t| self.s.layout.task(&t.task_id)).collect()
        };
        let _ = tokio::task::spawn_blocking(move || {
            for f in files {
                let _ = std::fs::remove_file(f);
            }
        })
        .await;
    }

    /// Registers a task and runs `op` in the background; a task id seen before
    /// returns the existing record and runs nothing.
    async fn submit<F, Fut>(&self, task_id: &str, kind: TaskKind, vm_id: &str, op: F) -> Result<Task, AgentError>
    where
        F: FnOnce(Runtime) -> Fut,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        validate::task_id(task_id)?;
        let (task, written) = {
            let mut tasks = lock(&self.s.tasks);
            if let Some(t) = tasks.get(task_id) {
                if t.kind != kind as i32 || t.vm_id != vm_id {
                    return Err(AgentError::Conflict(format!(
                        "task id {task_id} was already used for another operation"
                    )));
                }
                return Ok(t.clone());
            }
            let now = state::now();
            let t = Task {
                task_id: task_id.to_string(),
                kind: kind as i32,
                vm_id: vm_id.to_string(),
                state: TaskState::Running as i32,
                progress: Some(TaskProgress { step: "accepted".into(), ..Default::default() }),
                error: None,
                created_at: Some(now),
                updated_at: Some(now),
            };
            let written = self.s.persist.save(&self.s.layout.task(task_id), &t);
            tasks.insert(task_id.to_string(), t.clone());
            (t, written)
        };
        // The record is on disk before the task is acknowledged (or runs).
        if let Err(e) = written.wait().await {
            lock(&self.s.tasks).remove(task_id);
            return Err(e);
        }
        let fut = op(self.clone());
        let rt = self.clone();
        let id = task_id.to_string();
        let span = info_span!("agent.task", task_id, kind = ?kind, vm_id);
        tokio::spawn(
            async move {
                let res = fut.await;
                match &res {
                    Ok(()) => info!("task succeeded"),
                    Err(e) => warn!(code = e.code(), error = %e.message(), "task failed"),
                }
                rt.finish_task(&id, res).await;
            }
            .instrument(span),
        );
        Ok(task)
    }

    /// Records a task's outcome. The task reads as finished only once its record is on
    /// disk, and, the record writer being first-in first-out, so is every VM record the
    /// operation changed: a caller that sees the task done can rely on both after a crash.
    async fn finish_task(&self, task_id: &str, res: Result<(), AgentError>) {
        let (done, written) = {
            let tasks = lock(&self.s.tasks);
            let Some(t) = tasks.get(task_id) else {
                return;
            };
            let mut t = t.clone();
            match res {
                Ok(()) => {
                    t.state = TaskState::Succeeded as i32;
                    if let Some(p) = t.progress.as_mut() {
                        p.step = "done".into();
                    }
                }
                Err(e) => fail_task(&mut t, &e),
            }
            t.updated_at = Some(state::now());
            let written = self.s.persist.save(&self.s.layout.task(task_id), &t);
            (t, written)
        };
        if let Err(e) = written.wait().await {
            error!(task_id, error = %e.message(), "cannot write the finished task's record");
        }
        lock(&self.s.tasks).insert(task_id.to_string(), done);
        self.s.task_changed.send_modify(|n| *n += 1);
    }

    fn change_task(&self, task_id: &str, persist: bool, f: impl FnOnce(&mut Task)) {
        {
            let mut tasks = lock(&self.s.tasks);
            let Some(t) = tasks.get_mut(task_id) else {
                return;
            };
            f(t);
            t.updated_at = Some(state::now());
            if persist {
                // Queued, not awaited: the writer thread logs a failure.
                drop(self.s.persist.save(&self.s.layout.task(task_id), &*t));
            }
        }
        self.s.task_changed.send_modify(|n| *n += 1);
    }

    fn progress(&self, task_id: &str, step: &str, done: u64, total: u64) {
        let new_step =
            lock(&self.s.tasks).get(task_id).is_some_and(|t| t.progress.as_ref().is_none_or(|p| p.step != step));
        // Byte counts change often; only step changes are worth a disk write.
        self.change_task(task_id, new_step, |t| {
            t.progress = Some(TaskProgress { step: step.to_string(), bytes_done: done, bytes_total: total });
        });
    }

    /// Returns a task, waiting up to `wait` for it to finish.
    pub async fn get_task(&self, task_id: &str, wait: Duration) -> Result<Task, AgentError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_TASK_WAIT);
        let mut changed = self.s.task_changed.subscribe();
        loop {
            let t = lock(&self.s.tasks)
                .get(task_id)
                .cloned()
                .ok_or_else(|| AgentError::TaskNotFound(task_id.to_string()))?;
            if t.state != TaskState::Running as i32 {
                return Ok(t);
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return Ok(t);
            }
        }
    }

    // ------------------------------------------------------------------ VMs

    fn vm(&self, id: &Uuid) -> Result<Arc<VmHandle>, AgentError> {
        lock(&self.s.vms).get(id).cloned().ok_or_else(|| AgentError::VmNotFound(id.to_string()))
    }

    /// One VM with its live QMP status.
    pub async fn get_vm(&self, vm_id: &str) -> Result<Vm, AgentError> {
        let id = validate::vm_id(vm_id)?;
        let vm = self.vm(&id)?;
        Ok(live_view(&vm).await)
    }

    /// Every VM, by id.
    pub async fn list_vms(&self) -> Vec<Vm> {
        let vms: Vec<_> = lock(&self.s.vms).values().cloned().collect();
        let mut out = Vec::with_capacity(vms.len());
        for vm in vms {
            out.push(live_view(&vm).await);
        }
        out
    }

    /// CreateVm.
    pub async fn create_vm(&self, req: CreateVmRequest) -> Result<Task, AgentError> {
        let id = validate::vm_id(&req.vm_id)?;
        let task_id = req.task_id.clone();
        let tid = task_id.clone();
        self.submit(
            &tid,
            TaskKind::CreateVm,
            &id.to_string(),
            move |rt| async move { rt.create(&task_id, id, req).await },
        )
        .await
    }

    /// Checks a spec against the request rules and the host; returns the pool path and image request.
    fn check_spec(&self, spec: &VmSpec) -> Result<(PathBuf, ImageRequest), AgentError> {
        let v = |m: &str| Err(AgentError::Validation(m.to_string()));
        if !validate::is_dns_label(&spec.name) {
            return v("name must be a lowercase RFC 1123 label of at most 63 characters");
        }
        if spec.vcpus == 0 || spec.vcpus > 255 {
            return v("vcpus must be between 1 and 255");
        }
        if spec.memory_mib < 16 {
            return v("memory_mib must be at least 16");
        }
        if spec.disk_gib > 65536 {
            return v("disk_gib must be at most 65536");
        }
        let Some(image) = &spec.image else {
            return v("image is required");
        };
        let format = ImageFormat::try_from(image.format)
            .map_err(|_| AgentError::Validation(format!("unknown image format {}", image.format)))?;
        let sha256 = validate::sha256_pin(&image.sha256)?;
        let url = validate::image_url(&image.url, &self.s.cfg.images.allowed_schemes)?;
        if let Some(ci) = &spec.cloud_init {
            if ci.disabled && (!ci.user_data.is_empty() || !ci.network_config.is_empty()) {
                return v("cloud_init.disabled excludes user_data and network_config");
            }
            if ci.user_data.len() > MAX_USER_DATA {
                return v("user_data is larger than 1 MiB");
            }
            if ci.network_config.len() > MAX_NETWORK_CONFIG {
                return v("network_config is larger than 64 KiB");
            }
        }
        let host = self.s.host;
        if spec.vcpus > host.cpus {
            return Err(AgentError::InsufficientResources {
                resource: "vcpus",
                requested: spec.vcpus.into(),
                available: host.cpus.into(),
                unit: "vcpus",
            });
        }
        // Memory is admitted against what other VMs hold, under the VM map's lock (create, start).
        let pool = self.pool_path(&spec.pool)?;
        Ok((pool, ImageRequest { url, sha256, format }))
    }

    /// Memory (MiB) left for a VM: the host's total minus what every other VM holds.
    /// Call with the VM map locked, so two admissions cannot both take the last of it.
    fn unallocated_memory_mib(&self, vms: &BTreeMap<Uuid, Arc<VmHandle>>, except: &Uuid) -> u64 {
        let held: u64 = vms.iter().filter(|(id, _)| *id != except).map(|(_, vm)| vm.placed_memory_mib()).sum();
        self.s.host.memory_mib.saturating_sub(held)
    }

    /// Refuses a disk of `bytes` that the pool's file system has no room for.
    async fn admit_disk(&self, pool_path: &Path, bytes: u64) -> Result<(), AgentError> {
        let p = pool_path.to_path_buf();
        let (_, free) = state::blocking(move || pool::capacity(&p)).await?;
        if bytes > free {
            return Err(AgentError::InsufficientResources {
                resource: "disk",
                requested: bytes,
                available: free,
                unit: "bytes",
            });
        }
        Ok(())
    }

    async fn create(&self, task_id: &str, id: Uuid, req: CreateVmRequest) -> Result<(), AgentError> {
        let spec = req.spec.clone().ok_or_else(|| AgentError::Validation("spec is required".into()))?;
        let (pool_path, image_req) = self.check_spec(&spec)?;
        if spec.disk_gib > 0 {
            // Before the download: a disk the pool cannot hold is refused at once.
            self.admit_disk(&pool_path, u64::from(spec.disk_gib) * disk::GIB).await?;
        }
        let dir = self.s.layout.vm_dir(&id);
        let vm = {
            let mut vms = lock(&self.s.vms);
            if vms.contains_key(&id) {
                return Err(AgentError::Conflict(format!("vm {id} already exists")));
            }
            let available = self.unallocated_memory_mib(&vms, &id);
            if spec.memory_mib > available {
                return Err(AgentError::InsufficientResources {
                    resource: "memory",
                    requested: spec.memory_mib,
                    available,
                    unit: "MiB",
                });
            }
            let now = state::now();
            let record = Vm {
                id: id.to_string(),
                spec: Some(spec.clone()),
                phase: VmPhase::Creating as i32,
                observed_generation: req.generation,
                accelerator: self.s.accel as i32,
                disk_path: pool::disks_dir(&pool_path).join(format!("{id}.qcow2")).to_string_lossy().to_string(),
                created_at: Some(now),
                ..Default::default()
            };
            let vm = Arc::new(VmHandle {
                id,
                dir: dir.clone(),
                persist: self.s.persist.clone(),
                starting: AtomicBool::new(false),
                record: Mutex::new(record),
                op: tokio::sync::Mutex::new(()),
                console: Console::new(id.to_string(), self.s.cfg.console.ring_buffer_bytes),
                proc_: Mutex::new(None),
                intent: Mutex::new(None),
            });
            vms.insert(id, vm.clone());
            vm
        };
        let _op = vm.op.lock().await;
        let res = async {
            let (d, p) = (dir.clone(), pool_path.clone());
            state::blocking(move || state::private_dir(&d)).await?;
            // The record exists from the start so a restart can clean up a half-made VM.
            vm.update(|_| {}).wait().await?;
            state::blocking(move || pool::ensure(&p)).await?;
            self.progress(task_id, "image", 0, 0);
            let rt = self.clone();
            let tid = task_id.to_string();
            let lease = self
                .s
                .cache
                .acquire(&pool::images_dir(&pool_path), &image_req, &move |d, t| rt.progress(&tid, "image", d, t))
                .await?;
            let size = disk::disk_size(spec.disk_gib, lease.info.virtual_size)?;
            self.admit_disk(&pool_path, size).await?;
            self.progress(task_id, "disk", 0, 0);
            let disk_path = PathBuf::from(vm.record().disk_path);
            let src_format = if lease.info.format == ImageFormat::Raw { "raw" } else { "qcow2" };
            let span = info_span!("vm.disk", size);
            disk::make_disk(&self.s.cfg.qemu, &lease.path, src_format, &disk_path, size).instrument(span).await?;
            drop(lease);
            drop(vm.update(|r| r.disk_size_bytes = size));
            let ci = spec.cloud_init.clone().unwrap_or_default();
            if !ci.disabled {
                self.progress(task_id, "seed", 0, 0);
                disk::make_seed(
                    &self.s.cfg.qemu.genisoimage_binary,
                    &dir,
                    &dir.join(vm_files::SEED),
                    &disk::meta_data(&id, &spec.name),
                    &ci.user_data,
                    &ci.network_config,
                )
                .instrument(info_span!("vm.seed"))
                .await?;
            }
            self.progress(task_id, "boot", 0, 0);
            self.start_process(&vm).await
        }
        .await;
        if let Err(e) = &res {
            info!(vm = %id, code = e.code(), "create failed; removing what it made");
            self.poweroff_proc(&vm).await;
            if let Err(e) = remove_vm_files_async(&vm).await {
                error!(vm = %id, error = %e.message(), "cleanup after a failed create is incomplete");
            }
            lock(&self.s.vms).remove(&id);
        }
        res
    }

    /// Spawns QEMU for a VM and brings it to running.
    async fn start_process(&self, vm: &Arc<VmHandle>) -> Result<(), AgentError> {
        let span = info_span!("vm.start_process", vm = %vm.id);
        async {
            let rec = vm.record();
            let spec = rec.spec.clone().unwrap_or_default();
            let dir = &vm.dir;
            for f in [vm_files::QMP, vm_files::QMP_OPS, vm_files::SERIAL, vm_files::PIDFILE] {
                let _ = tokio::fs::remove_file(dir.join(f)).await;
            }
            let seed = dir.join(vm_files::SEED);
            let has_seed = tokio::fs::metadata(&seed).await.is_ok_and(|m| m.is_file());
            let launch = Launch {
                name: spec.name.clone(),
                uuid: vm.id,
                accel: self.s.accel,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                run_dir: dir.clone(),
                disk: PathBuf::from(&rec.disk_path),
                seed: has_seed.then_some(seed),
            };
            let args = qemu::command_line(&launch, &self.s.cfg.qemu)?;
            let stderr_path = dir.join(vm_files::STDERR);
            let sp = stderr_path.clone();
            let stderr = state::blocking(move || {
                std::fs::File::create(&sp).map_err(|e| AgentError::io("create the qemu stderr file", e))
            })
            .await?;
            let mut child = qemu::spawn(&self.s.cfg.qemu.binary, &args, stderr)?;
            let pid = child.id().map(|p| p as i32).unwrap_or(0);
            let timeout = Duration::from_secs(self.s.cfg.qemu.start_timeout_secs);
            let qmp_path = dir.join(vm_files::QMP);
            let connected: Result<Qmp, (String, Option<crate::Cause>)> = tokio::select! {
                r = Qmp::connect(&qmp_path, timeout, QMP_COMMAND_TIMEOUT) => {
                    r.map_err(|e| ("cannot connect QMP".to_string(), Some(Arc::new(e) as crate::Cause)))
                }
                st = child.wait() => Err((
                    format!("qemu exited at once ({})", st.map(|s| s.to_string()).unwrap_or_default()),
                    None,
                )),
            };
            // QEMU's stderr says why, when it says anything; else what the agent saw.
            let stderr_of = |path: PathBuf| async move {
                tokio::fs::read_to_string(&path).await.unwrap_or_default().trim().to_string()
            };
            let qmp = match connected {
                Ok(q) => q,
                Err((why, source)) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    let stderr = stderr_of(stderr_path.clone()).await;
                    let message = if stderr.is_empty() { why } else { stderr };
                    return Err(AgentError::QemuSpawnFailed { message, source });
                }
            };
            let serial = match connect_unix(&dir.join(vm_files::SERIAL), timeout).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    let stderr = stderr_of(stderr_path.clone()).await;
                    let message = if stderr.is_empty() { "cannot connect the serial socket".into() } else { stderr };
                    return Err(AgentError::QemuSpawnFailed { message, source: Some(Arc::new(e)) });
                }
            };
            vm.console.attach(serial, dir.join(vm_files::CONSOLE_LOG), self.s.cfg.console.log_max_bytes).await;
            let events = qmp.events();
            let (exited_tx, exited_rx) = watch::channel(false);
            *lock(&vm.proc_) = Some(Proc { pid, qmp: qmp.clone(), exited: exited_rx });
            *lock(&vm.intent) = None;
            tokio::spawn(monitor(vm.clone(), qmp.clone(), events, Exit::Child(child), exited_tx, pid));
            let started = async {
                qmp.execute("cont", None).await?;
                qmp.query_status().await
            }
            .await;
            match started {
                Ok(st) if st.status == "running" => {
                    // Holding proc_ orders this update before the monitor's exit update.
                    let proc_guard = lock(&vm.proc_);
                    if proc_guard.is_none() {
                        return Err(AgentError::QemuSpawnFailed {
                            message: "qemu exited right after starting".into(),
                            source: None,
                        });
                    }
                    drop(vm.update(|r| {
                        r.pid = pid;
                        r.phase = VmPhase::Running as i32;
                        r.reason.clear();
                        r.message.clear();
                        r.accelerator = self.s.accel as i32;
                        r.started_at = Some(state::now());
                    }));
                    drop(proc_guard);
                    info!(pid, "qemu running");
                    Ok(())
                }
                Ok(st) => {
                    self.poweroff_proc(vm).await;
                    Err(AgentError::QemuSpawnFailed {
                        message: format!("qemu reports status {} after cont", st.status),
                        source: None,
                    })
                }
                Err(e) => {
                    self.poweroff_proc(vm).await;
                    let stderr = stderr_of(stderr_path.clone()).await;
                    let message = if stderr.is_empty() { "cont failed".into() } else { stderr };
                    Err(AgentError::QemuSpawnFailed { message, source: Some(Arc::new(e)) })
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Ends the VM's QEMU if one runs: QMP quit, then SIGKILL after the grace time.
    async fn poweroff_proc(&self, vm: &Arc<VmHandle>) {
        let Some(p) = vm.proc_() else { return };
        *lock(&vm.intent) = Some(Intent::Poweroff);
        let grace = Duration::from_secs(self.s.cfg.qemu.kill_grace_secs);
        let _ = tokio::time::timeout(Duration::from_secs(5), p.qmp.execute("quit", None)).await;
        if p.wait_exit(grace).await {
            return;
        }
        // The pid is still ours only if the process still carries our uuid.
        if p.pid > 0
            && pid_runs_vm(p.pid, vm.id).await
            && let Some(pid) = Pid::from_raw(p.pid)
        {
            warn!(vm = %vm.id, pid = p.pid, "qemu ignored quit; sending SIGKILL");
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
        if !p.wait_exit(Duration::from_secs(10)).await {
            error!(vm = %vm.id, pid = p.pid, "qemu did not exit after SIGKILL");
        }
    }

    /// DeleteVm.
    pub async fn delete_vm(&self, task_id: &str, vm_id: &str) -> Result<Task, AgentError> {
        let id = validate::vm_id(vm_id)?;
        self.submit(task_id, TaskKind::DeleteVm, &id.to_string(), move |rt| async move {
            let vm = rt.vm(&id)?;
            let _op = vm.op.lock().await;
            if !lock(&rt.s.vms).contains_key(&id) {
                return Err(AgentError::VmNotFound(id.to_string()));
            }
            vm.set_phase(VmPhase::Deleting, "", "").wait().await?;
            rt.poweroff_proc(&vm).await;
            // On failure the VM stays listed (DELETING), so a new delete task can finish it.
            remove_vm_files_async(&vm).await?;
            lock(&rt.s.vms).remove(&id);
            Ok(())
        })
        .await
    }

    /// StartVm.
    pub async fn start_vm(&self, task_id: &str, vm_id: &str) -> Result<Task, AgentError> {
        let id = validate::vm_id(vm_id)?;
        self.submit(task_id, TaskKind::StartVm, &id.to_string(), move |rt| async move {
            let vm = rt.vm(&id)?;
            let _op = vm.op.lock().await;
            if vm.proc_().is_some() {
                return Ok(());
            }
            let _admitted = rt.admit_start(&vm)?;
            rt.start_process(&vm).await
        })
        .await
    }

    /// StopVm: ACPI power-down, waiting up to `timeout` (0 = the configured default).
    pub async fn stop_vm(&self, task_id: &str, vm_id: &str, timeout_secs: u32) -> Result<Task, AgentError> {
        let id = validate::vm_id(vm_id)?;
        self.submit(task_id, TaskKind::StopVm, &id.to_string(), move |rt| async move {
            let vm = rt.vm(&id)?;
            let _op = vm.op.lock().await;
            rt.graceful_stop(&vm, timeout_secs).await
        })
        .await
    }

    /// Admits a start of a VM that holds no memory now against what the others
    /// hold; the VM counts as placed until the returned guard drops (by then QEMU runs).
    fn admit_start(&self, vm: &Arc<VmHandle>) -> Result<StartGuard, AgentError> {
        let vms = lock(&self.s.vms);
        let want = vm.record().spec.map_or(0, |s| s.memory_mib);
        let available = self.unallocated_memory_mib(&vms, &vm.id);
        if vm.placed_memory_mib() == 0 && want > available {
            return Err(AgentError::InsufficientResources {
                resource: "memory",
                requested: want,
                available,
                unit: "MiB",
            });
        }
        vm.starting.store(true, Ordering::SeqCst);
        Ok(StartGuard(vm.clone()))
    }

    async fn graceful_stop(&self, vm: &Arc<VmHandle>, timeout_secs: u32) -> Result<(), AgentError> {
        let Some(p) = vm.proc_() else { return Ok(()) };
        let timeout = if timeout_secs == 0 { self.s.cfg.qemu.stop_timeout_secs } else { u64::from(timeout_secs) };
        let before = vm.record();
        *lock(&vm.intent) = Some(Intent::Stop);
        drop(vm.set_phase(VmPhase::Stopping, "", "ACPI power-down sent"));
        let sent = async {
            // A paused guest cannot see the power button.
            if p.qmp.query_status().await?.status == "paused" {
                p.qmp.execute("cont", None).await?;
            }
            p.qmp.execute("system_powerdown", None).await
        }
        .await;
        if let Err(e) = sent
            && !p.qmp.is_closed()
        {
            *lock(&vm.intent) = None;
            drop(vm.set_phase(
                VmPhase::try_from(before.phase).unwrap_or(VmPhase::Running),
                &before.reason,
                &before.message,
            ));
            return Err(AgentError::internal_from("system_powerdown", e));
        }
        if p.wait_exit(Duration::from_secs(timeout)).await {
            return Ok(());
        }
        *lock(&vm.intent) = None;
        if vm.proc_().is_some() {
            drop(vm.set_phase(VmPhase::Running, "", "the guest ignored the ACPI power-down"));
        }
        Err(AgentError::StopTimeout(timeout))
    }

    /// PoweroffVm.
    pub async fn poweroff_vm(&self, task_id: &str, vm_id: &str) -> Result<Task, AgentError> {
        let id = validate::vm_id(vm_id)?;
        self.submit(task_id, TaskKind::PoweroffVm, &id.to_string(), move |rt| async move {
            let vm = rt.vm(&id)?;
            let _op = vm.op.lock().await;
            rt.poweroff_proc(&vm).await;
            Ok(())
        })
        .await
    }

    /// RebootVm: graceful stop, then a new QEMU process.
    pub async fn reboot_vm(&self, task_id: &str, vm_id: &str, timeout_secs: u32) -> Result<Task, AgentError> {
        let id = validate::vm_id(vm_id)?;
        self.submit(task_id, TaskKind::RebootVm, &id.to_string(), move |rt| async move {
            let vm = rt.vm(&id)?;
            let _op = vm.op.lock().await;
            if vm.proc_().is_none() {
                return Err(AgentError::VmNotRunning(id.to_string()));
            }
            // The VM keeps its memory between the stop and the new start.
            vm.starting.store(true, Ordering::SeqCst);
            let _admitted = StartGuard(vm.clone());
            rt.graceful_stop(&vm, timeout_secs).await?;
            rt.start_process(&vm).await
        })
        .await
    }

    async fn qmp_verb(
        &self,
        task_id: &str,
        vm_id: &str,
        kind: TaskKind,
        command: &'static str,
        after: Option<(VmPhase, &'static str)>,
    ) -> Result<Task, AgentError> {
        let id = validate::vm_id(vm_id)?;
        self.submit(task_id, kind, &id.to_string(), move |rt| async move {
            let vm = rt.vm(&id)?;
            let _op = vm.op.lock().await;
            let p = vm.proc_().ok_or_else(|| AgentError::VmNotRunning(id.to_string()))?;
            p.qmp.execute(command, None).await.map_err(|e| AgentError::internal_from(format!("qmp {command}"), e))?;
            if let Some((phase, why)) = after {
                drop(vm.set_phase(phase, why, ""));
            }
            Ok(())
        })
        .await
    }

    /// PauseVm (QMP stop).
    pub async fn pause_vm(&self, task_id: &str, vm_id: &str) -> Result<Task, AgentError> {
        self.qmp_verb(task_id, vm_id, TaskKind::PauseVm, "stop", Some((VmPhase::Paused, reason::PAUSED))).await
    }

    /// ResumeVm (QMP cont).
    pub async fn resume_vm(&self, task_id: &str, vm_id: &str) -> Result<Task, AgentError> {
        self.qmp_verb(task_id, vm_id, TaskKind::ResumeVm, "cont", Some((VmPhase::Running, ""))).await
    }

    /// ResetVm (QMP system_reset).
    pub async fn reset_vm(&self, task_id: &str, vm_id: &str) -> Result<Task, AgentError> {
        self.qmp_verb(task_id, vm_id, TaskKind::ResetVm, "system_reset", None).await
    }

    /// Opens the VM's interactive console session.
    pub fn open_console(&self, vm_id: &str) -> Result<Session, AgentError> {
        let id = validate::vm_id(vm_id)?;
        let vm = self.vm(&id)?;
        let _span = info_span!("vm.console", vm = %id).entered();
        vm.console.open_session()
    }

    /// A reader of the VM's serial output.
    pub fn read_log(&self, vm_id: &str, tail: Option<u64>, follow: bool) -> Result<LogReader, AgentError> {
        let id = validate::vm_id(vm_id)?;
        let vm = self.vm(&id)?;
        Ok(vm.console.reader(tail, follow))
    }

    /// The directory holding a VM's sockets, seed and serial log (for operators and tests).
    pub fn vm_dir(&self, vm_id: &str) -> Result<PathBuf, AgentError> {
        Ok(self.s.layout.vm_dir(&validate::vm_id(vm_id)?))
    }

    // ---------------------------------------------------------- re-adoption

    async fn load_vms(&self) -> Result<(), AgentError> {
        let root = self.s.layout.vms();
        // Directory scan, record reads and /proc checks on the blocking pool.
        let found = state::blocking(move || {
            let entries = std::fs::read_dir(&root).map_err(|e| AgentError::io("read vms dir", e))?;
            let mut out = Vec::new();
            for e in entries.flatten() {
                let dir = e.path();
                let Some(id) = dir.file_name().and_then(|n| Uuid::parse_str(&n.to_string_lossy()).ok()) else {
                    continue;
                };
                state::sweep_temp_files(&dir);
                let rec = match state::load::<Vm>(&dir.join(vm_files::RECORD)) {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        warn!(vm = %id, "vm dir without a record (interrupted create); removing it");
                        let _ = std::fs::remove_dir_all(&dir);
                        continue;
                    }
                    Err(e) => {
                        error!(vm = %id, error = %e.message(), "unreadable vm record; leaving it alone");
                        continue;
                    }
                };
                let pid = read_pidfile(&dir.join(vm_files::PIDFILE)).unwrap_or(rec.pid);
                let alive = pid > 0 && qemu::pid_runs_vm(pid, &id);
                out.push((id, dir, rec, pid, alive));
            }
            Ok(out)
        })
        .await?;
        for (id, dir, rec, pid, mut alive) in found {
            let vm = Arc::new(VmHandle {
                id,
                dir: dir.clone(),
                persist: self.s.persist.clone(),
                starting: AtomicBool::new(false),
                record: Mutex::new(rec.clone()),
                op: tokio::sync::Mutex::new(()),
                console: Console::new(id.to_string(), self.s.cfg.console.ring_buffer_bytes),
                proc_: Mutex::new(None),
                intent: Mutex::new(None),
            });
            let phase = VmPhase::try_from(rec.phase).unwrap_or(VmPhase::Unspecified);
            if matches!(phase, VmPhase::Creating | VmPhase::Deleting) {
                info!(vm = %id, ?phase, "finishing an interrupted create/delete: removing the vm");
                if alive && let Some(p) = Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(p, Signal::KILL);
                }
                if let Err(e) = remove_vm_files_async(&vm).await {
                    error!(vm = %id, error = %e.message(), "cleanup of an interrupted create/delete is incomplete");
                }
                continue;
            }
            if alive {
                match self.adopt(&vm, pid).await {
                    Ok(()) => info!(vm = %id, pid, "re-adopted running qemu"),
                    Err(e) if !still_running(pid, &id).await => {
                        // It was on its way out (killed just before we looked).
                        info!(vm = %id, pid, error = %e.message(), "qemu ended while being re-adopted");
                        alive = false;
                    }
                    Err(e) => {
                        error!(vm = %id, pid, error = %e.message(), "cannot re-adopt qemu");
                        drop(vm.set_phase(VmPhase::Failed, "adopt_failed", &e.message()));
                    }
                }
            }
            if !alive && matches!(phase, VmPhase::Running | VmPhase::Paused | VmPhase::Stopping) {
                drop(vm.update(|r| {
                    r.phase = VmPhase::Stopped as i32;
                    r.reason = reason::PROCESS_GONE.into();
                    r.message = "QEMU ended while the agent was not running".into();
                    r.pid = 0;
                }));
            }
            lock(&self.s.vms).insert(id, vm);
        }
        Ok(())
    }

    /// Takes over a QEMU started by an earlier agent: pidfd for its exit,
    /// QMP and the serial socket, and the serial log's tail as history.
    async fn adopt(&self, vm: &Arc<VmHandle>, pid: i32) -> Result<(), AgentError> {
        let p = Pid::from_raw(pid).ok_or_else(|| AgentError::internal("pid 0"))?;
        let pidfd =
            rustix::process::pidfd_open(p, PidfdFlags::empty()).map_err(|e| AgentError::io("pidfd_open", e.into()))?;
        let exit = pidfd_exit(pidfd)?;
        let timeout = Duration::from_secs(5);
        let qmp = Qmp::connect(&vm.dir.join(vm_files::QMP), timeout, QMP_COMMAND_TIMEOUT)
            .await
            .map_err(|e| AgentError::internal_from("connect qmp", e))?;
        let log = vm.dir.join(vm_files::CONSOLE_LOG);
        let (l, n) = (log.clone(), self.s.cfg.console.ring_buffer_bytes as u64);
        let tail = tokio::task::spawn_blocking(move || read_tail(&l, n)).await.unwrap_or_default();
        vm.console.seed_history(&tail);
        match connect_unix(&vm.dir.join(vm_files::SERIAL), timeout).await {
            Ok(serial) => vm.console.attach(serial, log, self.s.cfg.console.log_max_bytes).await,
            Err(e) => {
                warn!(vm = %vm.id, error = %e, path = %vm.dir.join(vm_files::SERIAL).display(), "serial socket not reachable; console unavailable")
            }
        }
        let events = qmp.events();
        let status = qmp.query_status().await.map_err(|e| AgentError::internal_from("qmp query-status", e))?;
        let (exited_tx, exited_rx) = watch::channel(false);
        *lock(&vm.proc_) = Some(Proc { pid, qmp: qmp.clone(), exited: exited_rx });
        let (phase, why) = phase_of_status(&status.status);
        drop(vm.update(|r| {
            r.pid = pid;
            r.phase = phase as i32;
            r.reason = why.to_string();
        }));
        tokio::spawn(monitor(vm.clone(), qmp, events, Exit::Pidfd(exit), exited_tx, pid));
        Ok(())
    }
}

/// The phase a QMP run state means for an existing process.
fn phase_of_status(status: &str) -> (VmPhase, &'static str) {
    match status {
        "running" => (VmPhase::Running, ""),
        "internal-error" => (VmPhase::Failed, reason::ACCELERATOR_FAILURE),
        "guest-panicked" => (VmPhase::Failed, reason::CRASHED),
        "shutdown" => (VmPhase::Stopped, reason::GUEST_SHUTDOWN),
        _ => (VmPhase::Paused, reason::PAUSED),
    }
}

/// How long ago a task record last changed.
fn task_age(t: &Task, now: SystemTime) -> Duration {
    t.updated_at
        .map(|u| SystemTime::UNIX_EPOCH + Duration::from_secs(u.seconds.max(0) as u64))
        .and_then(|u| now.duration_since(u).ok())
        .unwrap_or_default()
}

fn fail_task(t: &mut Task, e: &AgentError) {
    t.state = TaskState::Failed as i32;
    t.error = Some(TaskError { code: e.code().to_string(), message: e.message() });
}

/// [`remove_vm_files`] on the blocking pool.
async fn remove_vm_files_async(vm: &Arc<VmHandle>) -> Result<(), AgentError> {
    let vm = vm.clone();
    state::blocking(move || remove_vm_files(&vm)).await
}

/// Keeps a VM's memory counted as placed while a start is under way.
struct StartGuard(Arc<VmHandle>);

impl Drop for StartGuard {
    fn drop(&mut self) {
        self.0.starting.store(false, Ordering::SeqCst);
    }
}

/// Whether `pid` runs the VM (a /proc read, on the blocking pool).
async fn pid_runs_vm(pid: i32, id: Uuid) -> bool {
    tokio::task::spawn_blocking(move || qemu::pid_runs_vm(pid, &id)).await.unwrap_or(false)
}

/// Removes a VM's disk and its dir (record, sockets, seed, logs); the first
/// failure is returned after trying everything. Blocking.
fn remove_vm_files(vm: &VmHandle) -> Result<(), AgentError> {
    let rec = vm.record();
    let mut first_err = None;
    let mut note = |what: &Path, e: std::io::Error| {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %what.display(), error = %e, "cannot remove");
            first_err.get_or_insert(AgentError::io(format!("remove {}", what.display()), e));
        }
    };
    if !rec.disk_path.is_empty() {
        for p in [PathBuf::from(&rec.disk_path), PathBuf::from(&rec.disk_path).with_extension("qcow2.partial")] {
            if let Err(e) = std::fs::remove_file(&p) {
                note(&p, e);
            }
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&vm.dir) {
        note(&vm.dir, e);
    }
    first_err.map_or(Ok(()), Err)
}

/// The record plus QEMU's live run state.
async fn live_view(vm: &VmHandle) -> Vm {
    let mut r = vm.record();
    if let Some(p) = vm.proc_()
        && let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(2), p.qmp.query_status()).await
    {
        r.qmp_status = st.status;
    }
    r
}

/// Whether `pid` still runs the VM a second from now (a dying process is given time to go).
async fn still_running(pid: i32, id: &Uuid) -> bool {
    for _ in 0..10 {
        if !pid_runs_vm(pid, *id).await {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

fn read_pidfile(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok().filter(|p| *p > 0)
}

fn read_tail(path: &Path, n: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(n)));
    let mut out = Vec::new();
    let _ = f.take(n).read_to_end(&mut out);
    out
}

/// Blocking.
fn sweep_partial_downloads(pool: &Path) {
    let Ok(entries) = std::fs::read_dir(pool::images_dir(pool).join(".partial")) else {
        return;
    };
    for e in entries.flatten() {
        let _ = std::fs::remove_file(e.path());
    }
}

async fn connect_unix(path: &Path, timeout: Duration) -> Result<UnixStream, std::io::Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            // QEMU creates the socket a moment after the QMP one.
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits for a pidfd to become readable (the process exited) on a thread of
/// its own: a blocking poll(2) needs no unsafe registration with the reactor.
fn pidfd_exit(pidfd: rustix::fd::OwnedFd) -> Result<tokio::sync::oneshot::Receiver<()>, AgentError> {
    use rustix::event::{PollFd, PollFlags, poll};
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("otherix-pidfd".into())
        .spawn(move || {
            let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
            // EINTR: poll again; anything else ends the wait as an exit.
            while let Err(rustix::io::Errno::INTR) = poll(&mut fds, None) {}
            let _ = tx.send(());
        })
        .map_err(|e| AgentError::io("start the pidfd thread", e))?;
    Ok(rx)
}

/// How a monitor learns that QEMU exited.
enum Exit {
    /// Our own child: wait() also reaps it.
    Child(tokio::process::Child),
    /// A re-adopted process: its pidfd becomes readable at exit.
    Pidfd(tokio::sync::oneshot::Receiver<()>),
}

impl Exit {
    async fn wait(self) -> Option<std::process::ExitStatus> {
        match self {
            Exit::Child(mut c) => c.wait().await.ok(),
            Exit::Pidfd(rx) => {
                let _ = rx.await;
                None
            }
        }
    }
}

/// Watches one QEMU process: QMP events update the VM's phase; the process
/// exit decides how the VM ended.
async fn monitor(
    vm: Arc<VmHandle>,
    qmp: Qmp,
    mut events: broadcast::Receiver<Event>,
    exit: Exit,
    exited: watch::Sender<bool>,
    pid: i32,
) {
    let span = info_span!("vm.monitor", vm = %vm.id, pid);
    async move {
        let mut shutdown: Option<(bool, String)> = None;
        let mut last_reset: Option<i64> = None;
        let exit_fut = exit.wait();
        tokio::pin!(exit_fut);
        let mut events_open = true;
        let status = loop {
            tokio::select! {
                st = &mut exit_fut => break st,
                ev = events.recv(), if events_open => match ev {
                    Ok(ev) => on_event(&vm, &qmp, &ev, &mut shutdown, &mut last_reset).await,
                    Err(broadcast::error::RecvError::Lagged(n)) => warn!(lost = n, "qmp events lost"),
                    Err(broadcast::error::RecvError::Closed) => events_open = false,
                },
            }
        };
        // Drain events that arrived just before the exit (the SHUTDOWN).
        while let Ok(ev) = events.try_recv() {
            on_event(&vm, &qmp, &ev, &mut shutdown, &mut last_reset).await;
        }
        let ours = {
            let mut p = lock(&vm.proc_);
            let ours = p.as_ref().is_some_and(|p| p.pid == pid);
            if ours {
                *p = None;
            }
            ours
        };
        if !ours {
            // A newer QEMU already took over the VM; its own monitor speaks for it.
            let _ = exited.send(true);
            return;
        }
        let intent = lock(&vm.intent).take();
        let (phase, why, msg) = match (intent, &shutdown) {
            (Some(Intent::Stop), _) => (VmPhase::Stopped, reason::STOPPED.to_string(), String::new()),
            (Some(Intent::Poweroff), _) => (VmPhase::Stopped, reason::POWERED_OFF.to_string(), String::new()),
            (None, Some((true, _))) => (VmPhase::Stopped, reason::GUEST_SHUTDOWN.to_string(), String::new()),
            (None, Some((false, r))) => {
                (VmPhase::Stopped, r.replace('-', "_"), "QEMU was shut down from the host".to_string())
            }
            (None, None) => {
                let stderr = tokio::fs::read_to_string(vm.dir.join(vm_files::STDERR)).await.unwrap_or_default();
                let code = status.map(|s| s.to_string()).unwrap_or_else(|| "unknown status".into());
                (
                    VmPhase::Failed,
                    reason::CRASHED.to_string(),
                    format!("QEMU exited without a shutdown ({code}): {}", stderr.trim()),
                )
            }
        };
        info!(phase = ?phase, reason = %why, "qemu exited");
        drop(vm.update(|r| {
            r.phase = phase as i32;
            r.reason = why;
            r.message = msg;
            r.pid = 0;
        }));
        let _ = exited.send(true);
    }
    .instrument(span)
    .await
}

async fn on_event(
    vm: &VmHandle,
    qmp: &Qmp,
    ev: &Event,
    shutdown: &mut Option<(bool, String)>,
    last_reset: &mut Option<i64>,
) {
    match ev.name.as_str() {
        "SHUTDOWN" => {
            let guest = ev.data.get("guest").and_then(serde_json::Value::as_bool).unwrap_or(false);
            let why = ev.data.get("reason").and_then(serde_json::Value::as_str).unwrap_or("").to_string();
            *shutdown = Some((guest, why));
        }
        "STOP" => {
            if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(5), qmp.query_status()).await
                && st.status == "internal-error"
            {
                error!("guest stopped with internal-error: accelerator failure");
                drop(vm.set_phase(
                    VmPhase::Failed,
                    reason::ACCELERATOR_FAILURE,
                    "the guest stopped with QMP status internal-error; the accelerator cannot run it",
                ));
            }
        }
        "RESUME" if vm.record().phase == VmPhase::Paused as i32 => {
            drop(vm.set_phase(VmPhase::Running, "", ""));
        }
        "RESET" => {
            // QEMU's own timestamps: the agent may read the events late.
            let window = RESET_BURST_WINDOW.as_micros() as i64;
            let same_burst = last_reset.is_some_and(|t| ev.timestamp_us - t < window);
            *last_reset = Some(ev.timestamp_us);
            if !same_burst {
                drop(vm.update(|r| r.reset_count += 1));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ages() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        let t = Task { updated_at: Some(prost_types::Timestamp { seconds: 4_000, nanos: 0 }), ..Default::default() };
        assert_eq!(task_age(&t, now), Duration::from_secs(6_000));
        let future =
            Task { updated_at: Some(prost_types::Timestamp { seconds: 20_000, nanos: 0 }), ..Default::default() };
        assert_eq!(task_age(&future, now), Duration::ZERO);
    }

    #[test]
    fn statuses_map_to_phases() {
        assert_eq!(phase_of_status("running").0, VmPhase::Running);
        assert_eq!(phase_of_status("paused").0, VmPhase::Paused);
        assert_eq!(phase_of_status("internal-error"), (VmPhase::Failed, reason::ACCELERATOR_FAILURE));
    }
}

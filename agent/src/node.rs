//! What the heartbeat reports and what it applies, over the VM runtime: host facts with the
//! accelerator actually in use, CPUs not promised to VMs, the runtime's pools with their
//! image caches; and the pools the control plane declares, put into the runtime.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use otherix_agent_enrolment::{DeclaredPoolsSink, FactsProvider, HostFactsProvider, confine_pool_path};
use otherix_proto::otherix::agent::v1::{Accelerator, DeclaredPool, HeartbeatRequest, Pool, PoolStatus, Vm, VmPhase};
use otherix_vm_runtime::Runtime;
use tracing::{info, warn};

/// The heartbeat's name for an accelerator: `kvm` or `tcg`.
pub fn accelerator_name(a: Accelerator) -> &'static str {
    match a {
        Accelerator::Kvm => "kvm",
        _ => "tcg",
    }
}

/// The vCPUs promised to VMs: those being created or with a QEMU process.
pub fn vcpus_in_use(vms: &[Vm]) -> u32 {
    vms.iter()
        .filter(|v| {
            matches!(
                VmPhase::try_from(v.phase),
                Ok(VmPhase::Creating | VmPhase::Running | VmPhase::Paused | VmPhase::Stopping)
            )
        })
        .map(|v| v.spec.as_ref().map_or(0, |s| s.vcpus))
        .sum()
}

/// Declared pools that could not be put in place, by name: (path, error).
type Failed = Mutex<BTreeMap<String, (PathBuf, String)>>;

/// Puts the pools the control plane declares into the runtime: an empty path means
/// `<pool_root>/<name>`. The directories are created; failures are reported in the next
/// heartbeat as `failed` with the reason.
#[derive(Debug)]
pub struct RuntimePools {
    rt: Runtime,
    handle: tokio::runtime::Handle,
    root: PathBuf,
    declared: Mutex<BTreeMap<String, PathBuf>>,
    failed: Arc<Failed>,
}

impl RuntimePools {
    /// Pools of `rt`, placed under `pool_root` unless declared with a path. Must be created
    /// inside the tokio runtime.
    pub fn new(rt: Runtime, pool_root: PathBuf) -> Self {
        let handle = tokio::runtime::Handle::current();
        RuntimePools { rt, handle, root: pool_root, declared: Mutex::default(), failed: Arc::default() }
    }
}

impl DeclaredPoolsSink for RuntimePools {
    fn declared_pools(&self, pools: Vec<DeclaredPool>) {
        let mut failed = BTreeMap::new();
        let mut declared = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        for p in pools {
            // Confined to the pool root before anything is created or chmod'ed.
            let path = match confine_pool_path(&self.root, &p.name, &p.path) {
                Ok(path) => path,
                Err(e) => {
                    let shown = if p.path.is_empty() { self.root.join(&p.name) } else { PathBuf::from(&p.path) };
                    warn!(pool = %p.name, path = %shown.display(), error = %e, "declared pool refused");
                    declared.remove(&p.name);
                    failed.insert(p.name.clone(), (shown, e.to_string()));
                    continue;
                }
            };
            // Called on a blocking thread (see DeclaredPoolsSink): blocking on the runtime is fine.
            match self.handle.block_on(self.rt.declare_pool(&p.name, &path)) {
                Ok(()) => {
                    if declared.get(&p.name) != Some(&path) {
                        info!(pool = %p.name, path = %path.display(), "pool ready");
                        declared.insert(p.name.clone(), path);
                    }
                }
                Err(e) => {
                    warn!(pool = %p.name, path = %path.display(), error = %e.message(), "pool reconciliation failed");
                    declared.remove(&p.name);
                    failed.insert(p.name.clone(), (path, e.message()));
                }
            }
        }
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = failed;
    }
}

/// The heartbeat report: [`HostFactsProvider`]'s host facts, with the runtime's accelerator,
/// CPUs not promised to VMs, and the runtime's pools (image cache included) plus the
/// declared pools that failed.
pub struct RuntimeFacts {
    host: HostFactsProvider,
    rt: Runtime,
    handle: tokio::runtime::Handle,
    failed: Arc<Failed>,
}

impl std::fmt::Debug for RuntimeFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeFacts").field("host", &self.host).finish_non_exhaustive()
    }
}

impl RuntimeFacts {
    /// Reports `host` facts corrected by `rt`; `pools` is the sink whose failures are
    /// reported. Must be created inside the tokio runtime.
    pub fn new(host: HostFactsProvider, rt: Runtime, pools: &RuntimePools) -> Self {
        RuntimeFacts { host, rt, handle: tokio::runtime::Handle::current(), failed: pools.failed.clone() }
    }
}

impl FactsProvider for RuntimeFacts {
    fn report(&self) -> HeartbeatRequest {
        let mut r = self.host.report();
        if let Some(c) = r.capabilities.as_mut() {
            c.accelerator = accelerator_name(self.rt.accelerator()).to_string();
        }
        // Called on a blocking thread (see FactsProvider), so blocking on the runtime is fine.
        let vms = self.handle.block_on(self.rt.list_vms());
        let used = vcpus_in_use(&vms);
        if let Some(res) = r.resources.as_mut() {
            res.cpu_available = res.cpu_available.saturating_sub(used);
        }
        let mut pools: Vec<PoolStatus> = self
            .handle
            .block_on(self.rt.list_pools())
            .into_iter()
            .map(|p| PoolStatus {
                pool: Some(p),
                reconciliation_status: "ready".into(),
                reconciliation_error: String::new(),
            })
            .collect();
        for (name, (path, err)) in self.failed.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if pools.iter().any(|p| p.pool.as_ref().is_some_and(|p| &p.name == name)) {
                continue;
            }
            pools.push(PoolStatus {
                pool: Some(Pool { name: name.clone(), path: path.display().to_string(), ..Pool::default() }),
                reconciliation_status: "failed".into(),
                reconciliation_error: err.clone(),
            });
        }
        r.pools = pools;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use otherix_proto::otherix::agent::v1::VmSpec;

    fn vm(phase: VmPhase, vcpus: u32) -> Vm {
        Vm { phase: phase as i32, spec: Some(VmSpec { vcpus, ..Default::default() }), ..Default::default() }
    }

    #[test]
    fn vcpus_of_live_vms() {
        let vms = [
            vm(VmPhase::Running, 2),
            vm(VmPhase::Paused, 1),
            vm(VmPhase::Stopped, 4),
            vm(VmPhase::Failed, 8),
            vm(VmPhase::Creating, 1),
        ];
        assert_eq!(vcpus_in_use(&vms), 4);
        assert_eq!(accelerator_name(Accelerator::Kvm), "kvm");
        assert_eq!(accelerator_name(Accelerator::Tcg), "tcg");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn reports_runtime_pools_and_failures() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = otherix_vm_runtime::RuntimeConfig::new(dir.path().join("state"));
        cfg.qemu.accel = otherix_vm_runtime::config::AccelSetting::Tcg;
        let rt = Runtime::open(cfg).await.unwrap();
        let pools = RuntimePools::new(rt.clone(), dir.path().join("pools"));
        let facts = RuntimeFacts::new(
            HostFactsProvider::new(otherix_agent_enrolment::FactsConfig::new(dir.path()), "0.1.0", None),
            rt,
            &pools,
        );
        let facts = std::sync::Arc::new(facts);
        let pools = std::sync::Arc::new(pools);
        let report = tokio::task::spawn_blocking(move || {
            pools.declared_pools(vec![
                DeclaredPool { name: "default".into(), path: String::new() },
                DeclaredPool { name: "bad".into(), path: "relative".into() },
                DeclaredPool { name: "escape".into(), path: "/etc/otherix-escape".into() },
            ]);
            facts.report()
        })
        .await
        .unwrap();
        assert!(dir.path().join("pools/default/images").is_dir());
        assert_eq!(report.capabilities.unwrap().accelerator, "tcg");
        let by = |n: &str| report.pools.iter().find(|p| p.pool.as_ref().unwrap().name == n).unwrap().clone();
        assert_eq!(by("default").reconciliation_status, "ready");
        assert!(by("default").pool.unwrap().capacity_bytes > 0);
        assert_eq!(by("bad").reconciliation_status, "failed");
        assert!(!by("bad").reconciliation_error.is_empty());
        assert_eq!(by("escape").reconciliation_status, "failed");
        assert!(by("escape").reconciliation_error.contains("outside the pool root"));
        assert!(!std::path::Path::new("/etc/otherix-escape").exists());
    }
}

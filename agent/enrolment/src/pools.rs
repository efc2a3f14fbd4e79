//! A minimal pool reconciler for declared pools: create the directories, report their
//! filesystem's capacity. The VM runtime may replace it with its own [`DeclaredPoolsSink`].

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use otherix_proto::otherix::agent::v1::{DeclaredPool, Pool, PoolStatus};

use crate::heartbeat::DeclaredPoolsSink;

/// How reconciling one declared pool went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolReport {
    /// The pool name.
    pub name: String,
    /// Its directory.
    pub path: PathBuf,
    /// `Ok` when the directory exists, else why not.
    pub result: Result<(), String>,
}

/// Keeps the declared pools as directories: an empty declared path puts the pool at
/// `<pool_root>/<name>`. Pools that are no longer declared are dropped from the reports
/// (their directories are left alone).
#[derive(Debug)]
pub struct DirPools {
    root: PathBuf,
    pools: Mutex<BTreeMap<String, PoolReport>>,
}

fn valid_pool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

impl DirPools {
    /// Pools placed under `pool_root` unless declared with a path.
    pub fn new(pool_root: impl Into<PathBuf>) -> Self {
        DirPools { root: pool_root.into(), pools: Mutex::new(BTreeMap::new()) }
    }

    /// The pool root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The current reports, by name.
    pub fn reports(&self) -> Vec<PoolReport> {
        self.pools.lock().map(|p| p.values().cloned().collect()).unwrap_or_default()
    }

    /// The pools' status for the next heartbeat, with capacity and free space from statvfs.
    pub fn statuses(&self) -> Vec<PoolStatus> {
        self.reports()
            .into_iter()
            .map(|r| {
                let (capacity_bytes, free_bytes) = match &r.result {
                    Ok(()) => rustix::fs::statvfs(&r.path)
                        .map(|s| (s.f_blocks.saturating_mul(s.f_frsize), s.f_bavail.saturating_mul(s.f_frsize)))
                        .unwrap_or((0, 0)),
                    Err(_) => (0, 0),
                };
                PoolStatus {
                    pool: Some(Pool {
                        name: r.name.clone(),
                        path: r.path.display().to_string(),
                        capacity_bytes,
                        free_bytes,
                        ..Pool::default()
                    }),
                    reconciliation_status: if r.result.is_ok() { "ready" } else { "failed" }.to_string(),
                    reconciliation_error: r.result.err().unwrap_or_default(),
                }
            })
            .collect()
    }

    fn reconcile_one(&self, p: &DeclaredPool) -> PoolReport {
        let path = if p.path.is_empty() { self.root.join(&p.name) } else { PathBuf::from(&p.path) };
        let result = if !valid_pool_name(&p.name) {
            Err(format!("invalid pool name {:?}", p.name))
        } else if !path.is_absolute() {
            Err(format!("pool path {:?} is not absolute", p.path))
        } else {
            std::fs::create_dir_all(&path)
                .and_then(|()| {
                    let meta = std::fs::metadata(&path)?;
                    if !meta.is_dir() {
                        return Err(std::io::Error::other("not a directory"));
                    }
                    if meta.permissions().mode() & 0o700 != 0o700 {
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o750))?;
                    }
                    Ok(())
                })
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        if let Err(e) = &result {
            tracing::warn!(pool = %p.name, error = %e, "pool reconciliation failed");
        }
        PoolReport { name: p.name.clone(), path, result }
    }
}

impl DeclaredPoolsSink for DirPools {
    fn declared_pools(&self, declared: Vec<DeclaredPool>) {
        let mut next = BTreeMap::new();
        for p in &declared {
            // Pools already in place are checked again (cheap); changed paths are redone.
            next.insert(p.name.clone(), self.reconcile_one(p));
        }
        if let Ok(mut pools) = self.pools.lock() {
            for name in pools.keys() {
                if !next.contains_key(name) {
                    tracing::info!(pool = %name, "pool no longer declared");
                }
            }
            for (name, r) in &next {
                if pools.get(name) != Some(r) && r.result.is_ok() {
                    tracing::info!(pool = %name, path = %r.path.display(), "pool ready");
                }
            }
            *pools = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile() {
        let dir = tempfile::tempdir().unwrap();
        let pools = DirPools::new(dir.path().join("pools"));
        let elsewhere = dir.path().join("elsewhere/fast");
        pools.declared_pools(vec![
            DeclaredPool { name: "default".into(), path: String::new() },
            DeclaredPool { name: "fast".into(), path: elsewhere.display().to_string() },
            DeclaredPool { name: "../x".into(), path: String::new() },
            DeclaredPool { name: "rel".into(), path: "relative/path".into() },
        ]);
        assert!(dir.path().join("pools/default").is_dir());
        assert!(elsewhere.is_dir());
        let st = pools.statuses();
        let by = |n: &str| st.iter().find(|s| s.pool.as_ref().unwrap().name == n).unwrap().clone();
        assert_eq!(by("default").reconciliation_status, "ready");
        assert!(by("default").pool.unwrap().capacity_bytes > 0);
        assert_eq!(by("fast").pool.unwrap().path, elsewhere.display().to_string());
        assert_eq!(by("../x").reconciliation_status, "failed");
        assert!(by("rel").reconciliation_error.contains("not absolute"));
        // The full set each time: undeclared pools go away.
        pools.declared_pools(vec![DeclaredPool { name: "default".into(), path: String::new() }]);
        assert_eq!(pools.statuses().len(), 1);
        // A file where the directory should be fails.
        std::fs::write(dir.path().join("pools/file"), "x").unwrap();
        pools.declared_pools(vec![DeclaredPool { name: "file".into(), path: String::new() }]);
        assert_eq!(pools.statuses()[0].reconciliation_status, "failed");
    }
}

//! A minimal pool reconciler for declared pools: create the directories, report their
//! filesystem's capacity. The VM runtime may replace it with its own [`DeclaredPoolsSink`];
//! either way a declared path goes through [`confine_pool_path`] first, so the control plane
//! (or anything impersonating it) can never make the agent create or chmod a directory
//! outside its configured pool root.

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

/// Why a declared pool was refused before anything was created.
#[derive(Debug, thiserror::Error)]
pub enum PoolPathError {
    /// The pool name is not 1..63 of `[a-z0-9_-]`.
    #[error("invalid pool name {0:?}")]
    InvalidName(String),
    /// The declared path is relative.
    #[error("pool path {0:?} is not absolute")]
    NotAbsolute(String),
    /// The declared path has a `..` component.
    #[error("pool path {0:?} contains '..'")]
    ParentComponent(String),
    /// The declared path is not strictly inside the pool root.
    #[error("pool path {path:?} is outside the pool root {}", root.display())]
    OutsideRoot {
        /// The declared path.
        path: String,
        /// The agent's pool root.
        root: PathBuf,
    },
    /// The path resolves, through a symlink, to somewhere outside the pool root.
    #[error("pool path {} leads through a symlink to {}, outside the pool root {}", path.display(), resolved.display(), root.display())]
    SymlinkEscape {
        /// The path as declared (or placed under the root).
        path: PathBuf,
        /// Where it resolves to.
        resolved: PathBuf,
        /// The agent's pool root.
        root: PathBuf,
    },
    /// The pool root or a part of the path could not be inspected.
    #[error("{}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Where a declared pool goes, confined to `root` (the agent's `storage.pool_root`): an
/// empty path means `<root>/<name>`; a declared path must be absolute, free of `..`, strictly
/// inside `root` as written, and must not resolve through a symlink to outside it. Creates
/// `root` if it is missing (never anything below it); the caller creates the pool directory.
/// A symlink swapped in after this check could still redirect the mkdir: keep the pool root
/// writable by the agent's user only.
pub fn confine_pool_path(root: &Path, name: &str, declared: &str) -> Result<PathBuf, PoolPathError> {
    use std::path::Component;
    if !valid_pool_name(name) {
        return Err(PoolPathError::InvalidName(name.to_string()));
    }
    let path = if declared.is_empty() {
        root.join(name)
    } else {
        let p = Path::new(declared);
        if !p.is_absolute() {
            return Err(PoolPathError::NotAbsolute(declared.to_string()));
        }
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(PoolPathError::ParentComponent(declared.to_string()));
        }
        match p.strip_prefix(root) {
            Ok(rel) if rel.components().next().is_some() => root.join(rel),
            _ => return Err(PoolPathError::OutsideRoot { path: declared.to_string(), root: root.to_path_buf() }),
        }
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PoolPathError::Io { path, source }
    };
    std::fs::create_dir_all(root).map_err(io(root))?;
    let real_root = std::fs::canonicalize(root).map_err(io(root))?;
    // The deepest part that exists decides where the rest will be created.
    let mut existing = path.as_path();
    loop {
        match std::fs::symlink_metadata(existing) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match existing.parent() {
                Some(parent) => existing = parent,
                None => break,
            },
            Err(e) => return Err(io(existing)(e)),
        }
    }
    let resolved = std::fs::canonicalize(existing).map_err(io(existing))?;
    if !resolved.starts_with(&real_root) {
        return Err(PoolPathError::SymlinkEscape { path, resolved, root: root.to_path_buf() });
    }
    Ok(path)
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
        let result = match confine_pool_path(&self.root, &p.name, &p.path) {
            Err(e) => {
                let shown = if p.path.is_empty() { self.root.join(&p.name) } else { PathBuf::from(&p.path) };
                Err((shown, e.to_string()))
            }
            Ok(path) => std::fs::create_dir_all(&path)
                .and_then(|()| {
                    let meta = std::fs::metadata(&path)?;
                    if !meta.is_dir() {
                        return Err(std::io::Error::other("not a directory"));
                    }
                    if meta.permissions().mode() & 0o700 != 0o700 {
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o750))?;
                    }
                    Ok(path.clone())
                })
                .map_err(|e| (path.clone(), format!("{}: {e}", path.display()))),
        };
        let (path, result) = match result {
            Ok(path) => (path, Ok(())),
            Err((path, e)) => (path, Err(e)),
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
        let inside = dir.path().join("pools/fast/ssd");
        pools.declared_pools(vec![
            DeclaredPool { name: "default".into(), path: String::new() },
            DeclaredPool { name: "fast".into(), path: inside.display().to_string() },
            DeclaredPool { name: "../x".into(), path: String::new() },
            DeclaredPool { name: "rel".into(), path: "relative/path".into() },
        ]);
        assert!(dir.path().join("pools/default").is_dir());
        assert!(inside.is_dir());
        let st = pools.statuses();
        let by = |n: &str| st.iter().find(|s| s.pool.as_ref().unwrap().name == n).unwrap().clone();
        assert_eq!(by("default").reconciliation_status, "ready");
        assert!(by("default").pool.unwrap().capacity_bytes > 0);
        assert_eq!(by("fast").pool.unwrap().path, inside.display().to_string());
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

    /// Paths outside the root, with `..`, or through a symlink that leaves the root are
    /// refused and reported; nothing is created or chmod'ed outside the root.
    #[test]
    fn declared_paths_are_confined_to_the_root() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pools");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o555)).unwrap();
        let pools = DirPools::new(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let cases = [
            ("abs", outside.join("victim").display().to_string(), "outside the pool root"),
            ("etc", "/etc/otherix-pool-test".to_string(), "outside the pool root"),
            ("dots", format!("{}/../outside/victim", root.display()), "contains '..'"),
            ("root", root.display().to_string(), "outside the pool root"),
            ("prefix", format!("{}-evil/x", root.display()), "outside the pool root"),
            ("sym", root.join("link/victim").display().to_string(), "through a symlink"),
            ("symleaf", root.join("link").display().to_string(), "through a symlink"),
        ];
        pools.declared_pools(
            cases.iter().map(|(n, p, _)| DeclaredPool { name: n.to_string(), path: p.clone() }).collect(),
        );
        let st = pools.statuses();
        for (name, path, why) in &cases {
            let s = st.iter().find(|s| s.pool.as_ref().unwrap().name == *name).unwrap();
            assert_eq!(s.reconciliation_status, "failed", "{name}");
            assert!(s.reconciliation_error.contains(why), "{name}: {}", s.reconciliation_error);
            assert_eq!(s.pool.as_ref().unwrap().path, *path, "{name}");
        }
        assert!(!outside.join("victim").exists());
        assert!(!Path::new("/etc/otherix-pool-test").exists());
        assert!(!dir.path().join("pools-evil").exists());
        // The directory behind the symlink kept its mode.
        assert_eq!(std::fs::metadata(&outside).unwrap().permissions().mode() & 0o777, 0o555);

        // Inside the root, symlinks that stay inside are fine.
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("alias")).unwrap();
        assert_eq!(
            confine_pool_path(&root, "a", &root.join("alias/a").display().to_string()).unwrap(),
            root.join("alias/a")
        );
        assert_eq!(confine_pool_path(&root, "b", "").unwrap(), root.join("b"));
        assert!(matches!(confine_pool_path(&root, "Bad", ""), Err(PoolPathError::InvalidName(_))));
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

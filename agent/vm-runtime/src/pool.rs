//! Storage pools: directories declared by the control plane, created on
//! demand, reporting capacity and free space through statfs.

use std::path::{Component, Path, PathBuf};

use otherix_proto::otherix::agent::v1::Pool;

use crate::cache::ImageCache;
use crate::validate::is_dns_label;
use crate::{AgentError, state};

/// Checks a declared pool: a DNS-label name and an absolute, normalised path.
pub fn validate(name: &str, path: &Path) -> Result<(), AgentError> {
    if !is_dns_label(name) {
        return Err(AgentError::Validation(format!("pool name {name:?} is not a lowercase RFC 1123 label")));
    }
    let normal =
        path.is_absolute() && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !normal {
        return Err(AgentError::Validation(format!(
            "pool path {} must be absolute without . or .. components",
            path.display()
        )));
    }
    Ok(())
}

/// The image cache dir of a pool.
pub fn images_dir(pool: &Path) -> PathBuf {
    pool.join("images")
}

/// The VM disk dir of a pool.
pub fn disks_dir(pool: &Path) -> PathBuf {
    pool.join("disks")
}

/// Creates the pool's directories if missing.
pub fn ensure(pool: &Path) -> Result<(), AgentError> {
    state::private_dir(&images_dir(pool).join(".meta"))?;
    state::private_dir(&images_dir(pool).join(".partial"))?;
    state::private_dir(&disks_dir(pool))
}

/// (capacity, free-to-unprivileged) bytes of the filesystem holding `path`.
pub fn capacity(path: &Path) -> Result<(u64, u64), AgentError> {
    let st = rustix::fs::statvfs(path).map_err(|e| AgentError::io(format!("statfs {}", path.display()), e.into()))?;
    Ok((st.f_blocks.saturating_mul(st.f_frsize), st.f_bavail.saturating_mul(st.f_frsize)))
}

/// Scans a pool: creates it if needed, then reads capacity, the cache and disks.
pub fn scan(name: &str, path: &Path, cache: &ImageCache) -> Result<Pool, AgentError> {
    ensure(path)?;
    let (capacity_bytes, free_bytes) = capacity(path)?;
    let vm_disk_bytes = std::fs::read_dir(disks_dir(path))
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.blocks() * 512
                })
                .sum()
        })
        .unwrap_or(0);
    Ok(Pool {
        name: name.to_string(),
        path: path.to_string_lossy().to_string(),
        capacity_bytes,
        free_bytes,
        images: cache.list(&images_dir(path)),
        downloads: cache.downloads(&images_dir(path)),
        vm_disk_bytes,
        scanned_at: Some(state::now()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_validation() {
        assert!(validate("default", Path::new("/var/lib/otherix/pools/default")).is_ok());
        assert!(validate("Default", Path::new("/x")).is_err());
        assert!(validate("p", Path::new("relative/x")).is_err());
        assert!(validate("p", Path::new("/var/../etc")).is_err());
    }
}

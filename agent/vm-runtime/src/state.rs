//! On-disk records with atomic writes: temp file, fsync, rename, fsync of the
//! directory, so a crash leaves either the old or the new record, never half.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use prost::Message;

use crate::AgentError;

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().ok_or_else(|| AgentError::Internal(format!("{} has no parent", path.display())))?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let res = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map_err(|e| AgentError::io(format!("write {}", path.display()), e))
}

/// Writes a protobuf record atomically.
pub fn save<M: Message>(path: &Path, msg: &M) -> Result<(), AgentError> {
    write_atomic(path, &msg.encode_to_vec())
}

/// Reads a protobuf record; `None` when the file does not exist.
pub fn load<M: Message + Default>(path: &Path) -> Result<Option<M>, AgentError> {
    match fs::read(path) {
        Ok(b) => M::decode(b.as_slice())
            .map(Some)
            .map_err(|e| AgentError::Internal(format!("decode {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io(format!("read {}", path.display()), e)),
    }
}

/// Creates a directory (and parents) with mode 0700.
pub fn private_dir(path: &Path) -> Result<(), AgentError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| AgentError::io(format!("create {}", path.display()), e))
}

use std::os::unix::fs::DirBuilderExt;

/// Removes stale temp files left by a crash between write and rename.
pub fn sweep_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with('.') && n.contains(".tmp-") {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// A protobuf timestamp for now.
pub fn now() -> prost_types::Timestamp {
    timestamp(SystemTime::now())
}

/// A protobuf timestamp for a system time.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// The state dir layout.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The agent's state dir.
    pub root: PathBuf,
}

impl Layout {
    /// Directory of per-VM dirs.
    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }
    /// A VM's dir: record, sockets, seed, serial log, pidfile.
    pub fn vm_dir(&self, id: &uuid::Uuid) -> PathBuf {
        self.vms().join(id.to_string())
    }
    /// Directory of task records.
    pub fn tasks(&self) -> PathBuf {
        self.root.join("tasks")
    }
    /// One task's record.
    pub fn task(&self, task_id: &str) -> PathBuf {
        self.tasks().join(format!("{task_id}.pb"))
    }
}

/// Files inside one VM's dir.
pub mod vm_files {
    /// The VM record (protobuf `otherix.agent.v1.Vm`).
    pub const RECORD: &str = "vm.pb";
    /// The agent's QMP socket.
    pub const QMP: &str = "qmp.sock";
    /// A second QMP socket for operators and tests (the agent holds the first).
    pub const QMP_OPS: &str = "qmp-ops.sock";
    /// The serial console socket.
    pub const SERIAL: &str = "serial.sock";
    /// The serial log QEMU writes.
    pub const CONSOLE_LOG: &str = "console.log";
    /// The previous generation of the serial log after rotation.
    pub const CONSOLE_LOG_OLD: &str = "console.log.1";
    /// QEMU's pidfile.
    pub const PIDFILE: &str = "qemu.pid";
    /// QEMU's stderr.
    pub const STDERR: &str = "qemu.stderr";
    /// The NoCloud seed ISO.
    pub const SEED: &str = "seed.iso";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("otx-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        private_dir(&dir).unwrap();
        let p = dir.join("rec.pb");
        let t = prost_types::Timestamp { seconds: 5, nanos: 1 };
        save(&p, &t).unwrap();
        save(&p, &prost_types::Timestamp { seconds: 6, nanos: 0 }).unwrap();
        let back: prost_types::Timestamp = load(&p).unwrap().unwrap();
        assert_eq!(back.seconds, 6);
        let names: Vec<_> = fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(load::<prost_types::Timestamp>(&dir.join("none")).unwrap().is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}

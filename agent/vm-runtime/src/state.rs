//! On-disk records. Writes are atomic (temp file, fsync, rename, fsync of the
//! directory, by `otherix-files`), so a crash leaves either the old or the new
//! record, never half. Records of running VMs and tasks are written by one
//! dedicated thread ([`Persister`]): callers enqueue under their own lock (so
//! the writes keep the order of the changes) and never fsync on an async
//! worker thread or while holding a lock.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::SystemTime;

use otherix_files::FileError;
use prost::Message;
use tokio::sync::oneshot;
use tracing::error;

use crate::AgentError;

/// Mode of every record file.
const RECORD_MODE: u32 = 0o600;

/// Writes `bytes` to `path` atomically with mode 0600. Blocking.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    otherix_files::write_file_atomic(path, bytes, RECORD_MODE).map_err(|e| AgentError::file("write a record", e))
}

/// Writes a protobuf record atomically. Blocking.
pub fn save<M: Message>(path: &Path, msg: &M) -> Result<(), AgentError> {
    write_atomic(path, &msg.encode_to_vec())
}

/// Reads a protobuf record; `None` when the file does not exist. Blocking.
pub fn load<M: Message + Default>(path: &Path) -> Result<Option<M>, AgentError> {
    match fs::read(path) {
        Ok(b) => M::decode(b.as_slice())
            .map(Some)
            .map_err(|e| AgentError::internal_from(format!("decode {}", path.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io(format!("read {}", path.display()), e)),
    }
}

/// Creates a directory (and parents) with mode 0700. Blocking.
pub fn private_dir(path: &Path) -> Result<(), AgentError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| AgentError::io(format!("create {}", path.display()), e))
}

/// Runs blocking file work on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| AgentError::internal_from("blocking file task", e))?
}

/// Removes stale temp files left by a crash between write and rename. Blocking.
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

type Ack = oneshot::Sender<Result<(), Arc<FileError>>>;

struct Job {
    path: PathBuf,
    bytes: Vec<u8>,
    ack: Ack,
}

/// The record writer thread. Cheap to clone; the thread ends with the last clone.
#[derive(Debug, Clone)]
pub struct Persister {
    tx: mpsc::Sender<Job>,
}

/// A write handed to the [`Persister`]; await it for durability, or drop it.
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<Result<(), Arc<FileError>>>);

impl Pending {
    /// Waits until the record is on disk.
    pub async fn wait(self) -> Result<(), AgentError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AgentError::Internal { what: "write a record".into(), source: Some(e) }),
            Err(_) => Err(AgentError::internal("the record writer stopped")),
        }
    }
}

impl Persister {
    /// Starts the writer thread.
    pub fn start() -> Result<Persister, AgentError> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("otherix-records".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Everything queued meanwhile: a path written twice is written once,
                    // with its newest bytes.
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    let mut newest: HashMap<PathBuf, usize> = HashMap::new();
                    for (i, j) in batch.iter().enumerate() {
                        newest.insert(j.path.clone(), i);
                    }
                    let mut results: HashMap<PathBuf, Result<(), Arc<FileError>>> = HashMap::new();
                    for (i, j) in batch.iter().enumerate() {
                        if newest.get(&j.path) == Some(&i) {
                            let r = otherix_files::write_file_atomic(&j.path, &j.bytes, RECORD_MODE).map_err(Arc::new);
                            if let Err(e) = &r {
                                error!(path = %j.path.display(), error = %e, cause = %e.source, "cannot write a record");
                            }
                            results.insert(j.path.clone(), r);
                        }
                    }
                    for j in batch {
                        let r = results.get(&j.path).cloned().unwrap_or(Ok(()));
                        let _ = j.ack.send(r);
                    }
                }
            })
            .map_err(|e| AgentError::io("start the record writer thread", e))?;
        Ok(Persister { tx })
    }

    /// Queues a protobuf record for writing; the order of calls is the order of writes.
    pub fn save<M: Message>(&self, path: &Path, msg: &M) -> Pending {
        let (ack, rx) = oneshot::channel();
        // A send error means the thread is gone; the dropped ack reports it.
        let _ = self.tx.send(Job { path: path.to_path_buf(), bytes: msg.encode_to_vec(), ack });
        Pending(rx)
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

    #[tokio::test]
    async fn persister_keeps_the_order_of_changes() {
        let dir = std::env::temp_dir().join(format!("otx-persist-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        private_dir(&dir).unwrap();
        let p = Persister::start().unwrap();
        let path = dir.join("rec.pb");
        let mut last = None;
        for s in 0..50 {
            last = Some(p.save(&path, &prost_types::Timestamp { seconds: s, nanos: 0 }));
        }
        last.unwrap().wait().await.unwrap();
        let back: prost_types::Timestamp = load(&path).unwrap().unwrap();
        assert_eq!(back.seconds, 49);
        let err = p.save(&dir.join("missing/rec.pb"), &back).wait().await.unwrap_err();
        assert_eq!(err.code(), "internal");
        assert!(std::error::Error::source(&err).is_some());
        let names: Vec<_> = fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}

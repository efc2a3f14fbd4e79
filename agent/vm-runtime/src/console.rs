//! The serial console multiplexer: the agent is QEMU's only serial client and
//! fans the output out to one interactive session and any number of log
//! readers, keeping recent output in a bounded ring buffer so a late reader
//! still sees the boot.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::broadcast;
use tracing::{debug, warn};

use crate::AgentError;

/// How many chunks a follower may lag before it loses output.
const FOLLOW_BACKLOG: usize = 1024;
/// How often (in bytes received) the serial log's size is checked.
const LOG_CHECK_EVERY: u64 = 64 * 1024;

/// A bounded byte ring that remembers how many bytes ever passed through.
#[derive(Debug)]
pub struct Ring {
    buf: VecDeque<u8>,
    cap: usize,
    end: u64,
}

impl Ring {
    /// An empty ring keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Ring {
        Ring { buf: VecDeque::with_capacity(cap.min(1 << 20)), cap, end: 0 }
    }

    /// Appends bytes, dropping the oldest beyond the capacity.
    pub fn push(&mut self, data: &[u8]) {
        self.end += data.len() as u64;
        let data = if data.len() > self.cap { &data[data.len() - self.cap..] } else { data };
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }

    /// The last `n` retained bytes (all retained when `None`).
    pub fn tail(&self, n: Option<u64>) -> Vec<u8> {
        let len = self.buf.len();
        let take = n.map_or(len, |n| (n.min(len as u64)) as usize);
        self.buf.range(len - take..).copied().collect()
    }

    /// Total bytes ever pushed: the stream offset just past the newest byte.
    pub fn end(&self) -> u64 {
        self.end
    }
}

/// A piece of serial output at a stream offset.
#[derive(Debug, Clone)]
struct Chunk {
    offset: u64,
    data: Bytes,
}

#[derive(Debug)]
struct State {
    ring: Ring,
    /// Present while a QEMU serial socket is attached.
    tx: Option<broadcast::Sender<Chunk>>,
    /// Counts attaches, so a late detach of an old socket leaves a new one alone.
    generation: u64,
}

/// One VM's console multiplexer; outlives QEMU restarts of the VM.
#[derive(Debug)]
pub struct Console {
    vm: String,
    state: Mutex<State>,
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    interactive: AtomicBool,
}

impl Console {
    /// A console for VM `vm` keeping `ring_bytes` of history.
    pub fn new(vm: String, ring_bytes: usize) -> Arc<Console> {
        Arc::new(Console {
            vm,
            state: Mutex::new(State { ring: Ring::new(ring_bytes), tx: None, generation: 0 }),
            writer: tokio::sync::Mutex::new(None),
            interactive: AtomicBool::new(false),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts earlier output (e.g. the serial log's tail after an agent restart)
    /// into the history.
    pub fn seed_history(&self, bytes: &[u8]) {
        self.state().ring.push(bytes);
    }

    /// Whether a QEMU serial socket is attached.
    pub fn is_attached(&self) -> bool {
        self.state().tx.is_some()
    }

    /// Takes over QEMU's serial socket: output goes to the ring and followers,
    /// the interactive session's input goes to QEMU. The serial log at
    /// `log_path` is rotated when it grows past `log_max` bytes.
    pub async fn attach(self: &Arc<Self>, stream: UnixStream, log_path: PathBuf, log_max: u64) {
        let (mut read, write) = stream.into_split();
        let (tx, _) = broadcast::channel(FOLLOW_BACKLOG);
        let generation = {
            let mut w = self.writer.lock().await;
            *w = Some(write);
            let mut st = self.state();
            st.generation += 1;
            st.tx = Some(tx);
            st.generation
        };
        let me = self.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut since_check = 0u64;
            loop {
                let n = match read.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        debug!(vm = %me.vm, error = %e, "serial socket read failed");
                        break;
                    }
                };
                {
                    let mut st = me.state();
                    let offset = st.ring.end();
                    st.ring.push(&buf[..n]);
                    if let Some(tx) = &st.tx {
                        // No follower is fine.
                        let _ = tx.send(Chunk { offset, data: Bytes::copy_from_slice(&buf[..n]) });
                    }
                }
                since_check += n as u64;
                if since_check >= LOG_CHECK_EVERY {
                    since_check = 0;
                    // A file copy: on the blocking pool, not on this worker.
                    let p = log_path.clone();
                    let _ = tokio::task::spawn_blocking(move || rotate_log_if_large(&p, log_max)).await;
                }
            }
            me.detach(generation).await;
        });
    }

    async fn detach(&self, generation: u64) {
        let mut w = self.writer.lock().await;
        let mut st = self.state();
        if st.generation == generation {
            st.tx = None;
            *w = None;
        }
    }

    /// A log reader: the last `tail` retained bytes (all when `None`), then,
    /// with `follow`, new output until QEMU's serial socket closes.
    pub fn reader(&self, tail: Option<u64>, follow: bool) -> LogReader {
        let st = self.state();
        let history = st.ring.tail(tail);
        let rx = if follow { st.tx.as_ref().map(broadcast::Sender::subscribe) } else { None };
        LogReader { history: Some(Bytes::from(history)), rx, next: st.ring.end() }
    }

    /// Opens the interactive session; a second one fails `console_in_use`.
    pub fn open_session(self: &Arc<Self>) -> Result<Session, AgentError> {
        let rx = {
            let st = self.state();
            let Some(tx) = &st.tx else {
                return Err(AgentError::VmNotRunning(self.vm.clone()));
            };
            tx.subscribe()
        };
        if self.interactive.swap(true, Ordering::AcqRel) {
            return Err(AgentError::ConsoleInUse(self.vm.clone()));
        }
        Ok(Session { console: self.clone(), rx })
    }
}

/// Rotates the serial log: QEMU appends (logappend=on), so copying the file
/// aside and truncating it keeps QEMU writing at the new end. Bytes written
/// between the copy and the truncation are lost from the file (not from the
/// ring buffer). Blocking.
fn rotate_log_if_large(path: &Path, max: u64) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.len() <= max {
        return;
    }
    let old = path.with_extension("log.1");
    let res = std::fs::copy(path, &old)
        .and_then(|_| std::fs::OpenOptions::new().write(true).open(path))
        .and_then(|f| f.set_len(0));
    if let Err(e) = res {
        warn!(path = %path.display(), error = %e, "serial log rotation failed");
    }
}

/// Reads the retained output, then follows.
#[derive(Debug)]
pub struct LogReader {
    history: Option<Bytes>,
    rx: Option<broadcast::Receiver<Chunk>>,
    next: u64,
}

impl LogReader {
    /// The next piece of output and how many bytes were lost before it;
    /// `None` at the end.
    pub async fn next(&mut self) -> Option<(Bytes, u64)> {
        if let Some(h) = self.history.take()
            && !h.is_empty()
        {
            return Some((h, 0));
        }
        let rx = self.rx.as_mut()?;
        loop {
            match rx.recv().await {
                Ok(chunk) => {
                    let end = chunk.offset + chunk.data.len() as u64;
                    if end <= self.next {
                        continue;
                    }
                    let skip = self.next.saturating_sub(chunk.offset) as usize;
                    let dropped = chunk.offset.saturating_sub(self.next);
                    self.next = end;
                    return Some((chunk.data.slice(skip..), dropped));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => {
                    self.rx = None;
                    return None;
                }
            }
        }
    }
}

/// The one interactive console session of a VM; released on drop.
#[derive(Debug)]
pub struct Session {
    console: Arc<Console>,
    rx: broadcast::Receiver<Chunk>,
}

impl Session {
    /// Sends bytes to the guest's serial port.
    pub async fn write(&self, data: &[u8]) -> Result<(), AgentError> {
        let mut w = self.console.writer.lock().await;
        let Some(w) = w.as_mut() else {
            return Err(AgentError::VmNotRunning(self.console.vm.clone()));
        };
        w.write_all(data).await.map_err(|e| AgentError::io("write to serial console", e))
    }

    /// The next output from the guest; `None` when QEMU's serial socket closed.
    pub async fn recv(&mut self) -> Option<Bytes> {
        loop {
            match self.rx.recv().await {
                Ok(c) => return Some(c.data),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    debug!(lost = n, "console session lagged");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.console.interactive.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes() {
        let mut r = Ring::new(8);
        r.push(b"hello");
        assert_eq!(r.tail(None), b"hello");
        r.push(b" world");
        assert_eq!(r.tail(None), b"lo world");
        assert_eq!(r.tail(Some(3)), b"rld");
        assert_eq!(r.tail(Some(0)), b"");
        assert_eq!(r.tail(Some(100)), b"lo world");
        assert_eq!(r.end(), 11);
        r.push(b"0123456789abc");
        assert_eq!(r.tail(None), b"56789abc");
        assert_eq!(r.end(), 24);
    }

    #[test]
    fn log_rotation_keeps_one_old_generation() {
        let dir = std::env::temp_dir().join(format!("otx-rot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        std::fs::write(&log, vec![b'x'; 100]).unwrap();
        rotate_log_if_large(&log, 200);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 100);
        std::fs::write(&log, vec![b'y'; 300]).unwrap();
        rotate_log_if_large(&log, 200);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(std::fs::read(dir.join("console.log.1")).unwrap(), vec![b'y'; 300]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn one_session_many_readers() {
        let dir = std::env::temp_dir().join(format!("otx-con-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let console = Console::new("vm".into(), 1024);
        console.seed_history(b"old ");
        let client = UnixStream::connect(&sock).await.unwrap();
        let (mut qemu, _) = listener.accept().await.unwrap();
        console.attach(client, dir.join("c.log"), 1 << 20).await;

        let mut follower = console.reader(None, true);
        let s1 = console.open_session().unwrap();
        assert_eq!(console.open_session().unwrap_err().code(), "console_in_use");
        qemu.write_all(b"boot").await.unwrap();
        assert_eq!(follower.next().await.unwrap().0, Bytes::from_static(b"old "));
        assert_eq!(follower.next().await.unwrap().0, Bytes::from_static(b"boot"));
        s1.write(b"typed").await.unwrap();
        let mut got = [0u8; 5];
        qemu.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"typed");
        drop(s1);
        let mut s2 = console.open_session().unwrap();
        qemu.write_all(b"more").await.unwrap();
        assert_eq!(s2.recv().await.unwrap(), Bytes::from_static(b"more"));
        let mut late = console.reader(Some(6), false);
        assert_eq!(late.next().await.unwrap().0, Bytes::from_static(b"otmore"));
        assert!(late.next().await.is_none());
        drop(qemu);
        assert_eq!(follower.next().await.unwrap().0, Bytes::from_static(b"more"));
        assert!(follower.next().await.is_none());
        assert!(s2.recv().await.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

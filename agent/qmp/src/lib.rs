//! A small async client for QMP, the QEMU Machine Protocol, over a unix socket.
//!
//! One [`Qmp`] owns one connection: it reads QEMU's greeting, negotiates
//! capabilities, then runs a reader task that routes replies to the command
//! that asked (by `id`) and broadcasts asynchronous events to every
//! subscriber. The connection closing (QEMU exited, or someone else took the
//! monitor) is observable through [`Qmp::closed`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, broadcast, oneshot, watch};
use tracing::{Instrument, debug, info_span};

/// Longest line accepted from QEMU; a reply to `query-*` is a few KiB.
const MAX_LINE: usize = 8 * 1024 * 1024;
/// How many unread events a slow subscriber may lag behind.
const EVENT_BACKLOG: usize = 256;

/// What can go wrong talking QMP.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke.
    #[error("qmp i/o: {what}")]
    Io {
        /// What was being done, e.g. `connect /run/vm/qmp.sock`.
        what: String,
        /// The I/O error (shared: one error may reach several waiting commands).
        #[source]
        source: Arc<std::io::Error>,
    },
    /// QEMU sent something that is not QMP.
    #[error("qmp protocol: {0}")]
    Protocol(String),
    /// QEMU sent JSON that does not parse, or a reply of the wrong shape.
    #[error("qmp protocol: {what}")]
    Json {
        /// Where the JSON came from, e.g. `query-status`.
        what: &'static str,
        /// The parse error.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// QEMU refused the command.
    #[error("qmp command {command} failed: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's message.
        desc: String,
    },
    /// The connection closed before the reply came.
    #[error("qmp connection closed")]
    Closed,
    /// No reply within the deadline.
    #[error("qmp command {0} timed out")]
    Timeout(String),
}

impl QmpError {
    fn io(what: impl Into<String>, e: std::io::Error) -> QmpError {
        QmpError::Io { what: what.into(), source: Arc::new(e) }
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name, e.g. `SHUTDOWN`.
    pub name: String,
    /// The event's `data` object (`Null` when absent).
    pub data: Value,
    /// QEMU's timestamp in microseconds since the epoch.
    pub timestamp_us: i64,
}

/// The answer of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// The run state, e.g. `running`, `paused`, `prelaunch`, `internal-error`.
    pub status: String,
    /// Whether the vCPUs run.
    pub running: bool,
}

type Pending = HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>;

struct Inner {
    writer: Mutex<OwnedWriteHalf>,
    pending: std::sync::Mutex<Pending>,
    next_id: AtomicU64,
    events: broadcast::Sender<Event>,
    closed: watch::Receiver<bool>,
    version: String,
    timeout: Duration,
}

/// A connected, negotiated QMP session. Cheap to clone.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("version", &self.inner.version).finish()
    }
}

impl Qmp {
    /// Connects to the QMP socket at `path`, retrying while the socket does not
    /// exist yet or refuses (QEMU still starting) until `connect_timeout`, then
    /// negotiates capabilities. `command_timeout` bounds every later command.
    pub async fn connect(path: &Path, connect_timeout: Duration, command_timeout: Duration) -> Result<Qmp, QmpError> {
        let span = info_span!("qmp.connect", path = %path.display());
        async move {
            let stream = connect_retrying(path, connect_timeout).await?;
            let (read, write) = stream.into_split();
            let mut reader = BufReader::new(read);
            let greeting = tokio::time::timeout(connect_timeout, read_json_line(&mut reader))
                .await
                .map_err(|_| QmpError::Timeout("greeting".into()))??
                .ok_or(QmpError::Closed)?;
            let version = parse_greeting(&greeting)?;
            let (events, _) = broadcast::channel(EVENT_BACKLOG);
            let (closed_tx, closed_rx) = watch::channel(false);
            let inner = Arc::new(Inner {
                writer: Mutex::new(write),
                pending: std::sync::Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                events,
                closed: closed_rx,
                version,
                timeout: command_timeout,
            });
            tokio::spawn(reader_task(reader, Arc::downgrade(&inner), inner.events.clone(), closed_tx));
            let qmp = Qmp { inner };
            qmp.execute("qmp_capabilities", None).await?;
            Ok(qmp)
        }
        .instrument(span)
        .await
    }

    /// QEMU's version from the greeting, e.g. `7.2.22`.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// Subscribes to events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    /// Resolves once the connection has closed (QEMU exited or dropped us).
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.clone();
        // An error means the reader task is gone, which also means closed.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let span = info_span!("qmp.execute", command);
        async move {
            if self.is_closed() {
                return Err(QmpError::Closed);
            }
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let mut msg = json!({ "execute": command, "id": id });
            if let Some(args) = arguments {
                msg["arguments"] = args;
            }
            let (tx, rx) = oneshot::channel();
            lock(&self.inner.pending).insert(id, tx);
            let mut line = msg.to_string();
            line.push('\n');
            let written = {
                let mut w = self.inner.writer.lock().await;
                w.write_all(line.as_bytes()).await
            };
            if let Err(e) = written {
                lock(&self.inner.pending).remove(&id);
                return Err(QmpError::io(format!("send {command}"), e));
            }
            let reply = match tokio::time::timeout(self.inner.timeout, rx).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(_)) => Err(QmpError::Closed),
                Err(_) => {
                    lock(&self.inner.pending).remove(&id);
                    Err(QmpError::Timeout(command.to_string()))
                }
            };
            reply.map_err(|e| match e {
                QmpError::Command { class, desc, .. } => {
                    QmpError::Command { command: command.to_string(), class, desc }
                }
                other => other,
            })
        }
        .instrument(span)
        .await
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        let v = self.execute("query-status", None).await?;
        serde_json::from_value(v).map_err(|e| QmpError::Json { what: "query-status reply", source: Arc::new(e) })
    }
}

fn lock(m: &std::sync::Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    // A panic while holding this lock cannot leave the map inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn connect_retrying(path: &Path, timeout: Duration) -> Result<UnixStream, QmpError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(QmpError::io(format!("connect {}", path.display()), e)),
        }
    }
}

async fn read_json_line(reader: &mut BufReader<OwnedReadHalf>) -> Result<Option<Value>, QmpError> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut *reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| QmpError::io("read", e))?;
        if n == 0 {
            return Ok(None);
        }
        if buf.last() != Some(&b'\n') && n >= MAX_LINE {
            return Err(QmpError::Protocol("line too long".into()));
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(&buf)
            .map(Some)
            .map_err(|e| QmpError::Json { what: "a line from qemu", source: Arc::new(e) });
    }
}

/// Reads QEMU's version out of the greeting.
fn parse_greeting(v: &Value) -> Result<String, QmpError> {
    let q = v
        .get("QMP")
        .and_then(|q| q.get("version"))
        .and_then(|v| v.get("qemu"))
        .ok_or_else(|| QmpError::Protocol(format!("not a QMP greeting: {v}")))?;
    let n = |k: &str| q.get(k).and_then(Value::as_u64).unwrap_or(0);
    Ok(format!("{}.{}.{}", n("major"), n("minor"), n("micro")))
}

/// What one line from QEMU is.
#[derive(Debug)]
enum Message {
    Reply(u64, Result<Value, QmpError>),
    Event(Event),
    Unrouted,
}

fn classify(v: Value) -> Message {
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        let ts = v.get("timestamp");
        let secs = ts.and_then(|t| t.get("seconds")).and_then(Value::as_i64).unwrap_or(0);
        let micros = ts.and_then(|t| t.get("microseconds")).and_then(Value::as_i64).unwrap_or(0);
        return Message::Event(Event {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us: secs.saturating_mul(1_000_000).saturating_add(micros),
        });
    }
    let Some(id) = v.get("id").and_then(Value::as_u64) else {
        return Message::Unrouted;
    };
    if let Some(ret) = v.get("return") {
        return Message::Reply(id, Ok(ret.clone()));
    }
    if let Some(err) = v.get("error") {
        let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Message::Reply(
            id,
            Err(QmpError::Command { command: String::new(), class: s("class"), desc: s("desc") }),
        );
    }
    Message::Unrouted
}

async fn reader_task(
    mut reader: BufReader<OwnedReadHalf>,
    inner: std::sync::Weak<Inner>,
    events: broadcast::Sender<Event>,
    closed: watch::Sender<bool>,
) {
    loop {
        let msg = match read_json_line(&mut reader).await {
            Ok(Some(v)) => v,
            Ok(None) => break,
            Err(e) => {
                // QEMU resets the socket when it exits: routine, not a warning.
                debug!(error = %e, "qmp connection dropped");
                break;
            }
        };
        match classify(msg) {
            Message::Event(ev) => {
                debug!(event = %ev.name, data = %ev.data, "qmp event");
                // No subscriber is fine: nobody is waiting for events.
                let _ = events.send(ev);
            }
            Message::Reply(id, reply) => {
                let Some(inner) = inner.upgrade() else { break };
                if let Some(tx) = lock(&inner.pending).remove(&id) {
                    let _ = tx.send(reply);
                }
            }
            Message::Unrouted => debug!("qmp message without id ignored"),
        }
    }
    let _ = closed.send(true);
    if let Some(inner) = inner.upgrade() {
        // Dropping the senders wakes every waiting command with Closed.
        lock(&inner.pending).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_version() {
        let g = json!({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}});
        assert_eq!(parse_greeting(&g).unwrap(), "7.2.22");
        assert!(parse_greeting(&json!({"return": {}})).is_err());
    }

    #[test]
    fn io_errors_keep_their_cause_out_of_display() {
        use std::error::Error as _;
        let e = QmpError::io("connect /x", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(e.to_string(), "qmp i/o: connect /x");
        assert_eq!(
            e.source().map(|s| s.to_string()),
            Some(std::io::Error::from(std::io::ErrorKind::NotFound).to_string())
        );
    }

    #[test]
    fn classifies_replies_errors_and_events() {
        assert!(matches!(
            classify(json!({"return": {"status": "running"}, "id": 4})),
            Message::Reply(4, Ok(v)) if v == json!({"status": "running"})
        ));
        match classify(json!({"id": 3, "error": {"class": "CommandNotFound", "desc": "nope"}})) {
            Message::Reply(3, Err(QmpError::Command { class, desc, .. })) => {
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "nope");
            }
            other => panic!("unexpected {other:?}"),
        }
        match classify(
            json!({"timestamp": {"seconds": 2, "microseconds": 5}, "event": "RESET", "data": {"guest": true}}),
        ) {
            Message::Event(ev) => {
                assert_eq!(ev.name, "RESET");
                assert_eq!(ev.data["guest"], json!(true));
                assert_eq!(ev.timestamp_us, 2_000_005);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(classify(json!({"return": {}})), Message::Unrouted));
    }
}

//! HeartbeatService: agents report over a bidi stream on the agent listener;
//! each report is answered with the node's declared desired state. The node
//! is the one named in the client certificate, never a message field.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::otherix::agent::v1::heartbeat_service_server::HeartbeatService;
use otherix_proto::otherix::agent::v1::{DeclaredPool, HeartbeatRequest, HeartbeatResponse};
use otherix_proto::otherix::store::v1::NodeRecord;
use otherix_proto::v1::{Node, NodeCapacity, NodePool, NodePressure, PressureCondition};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::{Beat, NodeHub, PeerCert, node_key, status};
use crate::identity::now_ts;
use crate::store_error::{Rmw, store_error};

/// Serves HeartbeatService.
#[derive(Debug, Clone)]
pub struct HeartbeatServiceImpl {
    hub: Arc<NodeHub>,
}

impl HeartbeatServiceImpl {
    /// A service over the hub.
    pub fn new(hub: Arc<NodeHub>) -> Self {
        HeartbeatServiceImpl { hub }
    }
}

fn revoked(node: &str) -> ApiError {
    ApiError::new(ErrorCode::Unauthenticated, format!("the certificate of node {node:?} is not (or no longer) valid"))
        .with_detail("reason", "cert_revoked")
}

/// The refusal for a node without a record: deleted (or never enrolled). The agent logs
/// that it must bootstrap again and stops retrying hot (docs/nodes.md, "Deleted nodes").
fn node_deleted(node: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Unauthenticated,
        format!("node {node:?} was deleted; bootstrap it again with a fresh join token"),
    )
    .with_detail("reason", "node_deleted")
}

/// Updates a pressure condition from one report: set after `required`
/// consecutive reports under the threshold, cleared by one above it.
fn pressure(prev: Option<&PressureCondition>, under: bool, required: u32, what: &str, node: &str) -> PressureCondition {
    let prev = prev.cloned().unwrap_or_default();
    if !under {
        if prev.active {
            tracing::info!(node, condition = what, "pressure cleared");
        }
        return PressureCondition::default();
    }
    let count = prev.consecutive_count.saturating_add(1);
    let active = count >= i32::try_from(required).unwrap_or(i32::MAX);
    if active && !prev.active {
        tracing::warn!(node, condition = what, consecutive = count, "pressure set: node excluded from placement");
    }
    PressureCondition {
        active,
        since: if active { prev.since.or(Some(now_ts())) } else { None },
        consecutive_count: count,
    }
}

fn percent_free(free: u64, total: u64) -> Option<f64> {
    (total > 0).then(|| free as f64 * 100.0 / total as f64)
}

/// The largest heartbeat report accepted (the agent's report is a few KiB).
pub const MAX_REPORT_BYTES: usize = 64 * 1024;
/// The most pools and cached images a report may list.
const MAX_POOLS: usize = 64;
const MAX_IMAGES: usize = 512;
/// Reports allowed in a burst, and the refill interval (agents report every
/// interval and on change).
const BURST: u32 = 5;
const REFILL: std::time::Duration = std::time::Duration::from_secs(1);
/// `last_heartbeat_at` is written at most this often when nothing else changes.
const RECORD_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_field(field, message)
}

fn text(field: &str, v: &str, max: usize) -> Result<(), ApiError> {
    if v.len() > max || v.chars().any(char::is_control) {
        return Err(bad(field, format!("{field} must be at most {max} printable characters")));
    }
    Ok(())
}

/// Checks a report field by field, as a join is checked.
fn validate(hb: &HeartbeatRequest, architecture: &str) -> Result<(), ApiError> {
    text("agent_version", &hb.agent_version, 64)?;
    if !hb.architecture.is_empty() && hb.architecture != architecture {
        return Err(bad("architecture", format!("the node joined as {architecture}; a report cannot change it")));
    }
    if let Some(c) = &hb.capabilities {
        if !matches!(c.accelerator.as_str(), "" | "kvm" | "tcg") {
            return Err(bad("capabilities.accelerator", "accelerator must be kvm or tcg"));
        }
        text("capabilities.qemu_version", &c.qemu_version, 128)?;
        text("capabilities.cpu_model", &c.cpu_model, 256)?;
        text("capabilities.kernel_version", &c.kernel_version, 256)?;
    }
    if hb.pools.len() > MAX_POOLS {
        return Err(bad("pools", format!("at most {MAX_POOLS} pools")));
    }
    for p in &hb.pools {
        let Some(pool) = &p.pool else { continue };
        if !crate::names::is_label(&pool.name) {
            return Err(bad("pools.pool.name", "pool names are lowercase RFC 1123 labels"));
        }
        text("pools.pool.path", &pool.path, 4096)?;
        text("pools.reconciliation_status", &p.reconciliation_status, 32)?;
        text("pools.reconciliation_error", &p.reconciliation_error, 1024)?;
        if pool.images.len() > MAX_IMAGES || pool.downloads.len() > MAX_IMAGES {
            return Err(bad("pools.pool.images", format!("at most {MAX_IMAGES} images per pool")));
        }
        for i in &pool.images {
            text("pools.pool.images.name", &i.name, 255)?;
            text("pools.pool.images.url", &i.url, 2048)?;
            text("pools.pool.images.sha256", &i.sha256, 64)?;
        }
    }
    Ok(())
}

/// The node as stored, when `fingerprint` is its current certificate and it
/// is not gone.
fn current(node: &str, fingerprint: &str, rec: &NodeRecord) -> Result<Node, ApiError> {
    if rec.cert_fingerprint.is_empty() || rec.cert_fingerprint != fingerprint {
        return Err(revoked(node));
    }
    let n = rec.node.clone().unwrap_or_default();
    if n.status == status::GONE {
        return Err(ApiError::new(ErrorCode::NodeGone, format!("node {node:?} is gone; readmit it first"))
            .with_detail("reason", "node_gone"));
    }
    Ok(n)
}

/// Whether `a` moved from `b` by more than `percent` of `total`.
fn moved(a: u64, b: u64, total: u64, percent: u64) -> bool {
    a.abs_diff(b).saturating_mul(100) > total.saturating_mul(percent)
}

/// Whether the new view differs from the stored one in anything an operator
/// or the scheduler would see (small drifts of free memory and disk are not).
fn differs(old: &Node, new: &Node) -> bool {
    let (oc, nc) = (old.capacity.unwrap_or_default(), new.capacity.unwrap_or_default());
    let capacity = oc.cpu_cores != nc.cpu_cores
        || oc.cpu_available != nc.cpu_available
        || oc.memory_bytes != nc.memory_bytes
        || oc.system_disk_total_bytes != nc.system_disk_total_bytes
        || moved(oc.memory_available_bytes, nc.memory_available_bytes, nc.memory_bytes, 5)
        || moved(oc.system_disk_free_bytes, nc.system_disk_free_bytes, nc.system_disk_total_bytes, 1);
    let pools = old.pools.len() != new.pools.len()
        || old.pools.iter().zip(&new.pools).any(|(a, b)| {
            a.name != b.name
                || a.path != b.path
                || a.capacity_bytes != b.capacity_bytes
                || a.reconciliation_status != b.reconciliation_status
                || a.reconciliation_error != b.reconciliation_error
                || moved(a.free_bytes, b.free_bytes, b.capacity_bytes, 1)
        });
    old.status != new.status
        || old.agent_version != new.agent_version
        || old.architecture != new.architecture
        || old.accelerator != new.accelerator
        || old.qemu_version != new.qemu_version
        || old.pressure != new.pressure
        || capacity
        || pools
}

/// A token bucket per stream: `BURST` reports, one more per `REFILL`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    fn new() -> Bucket {
        Bucket { tokens: f64::from(BURST), at: tokio::time::Instant::now() }
    }

    fn take(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() / REFILL.as_secs_f64();
        self.tokens = (self.tokens + refill).min(f64::from(BURST));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl NodeHub {
    /// Records one report of `node` (whose certificate has `fingerprint`)
    /// and returns the answer. The node record is written only when the
    /// report changes what an operator or the scheduler sees, or when
    /// `last_heartbeat_at` is a minute old.
    pub async fn record_heartbeat(
        &self,
        node: &str,
        fingerprint: &str,
        stream: u64,
        hb: HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ApiError> {
        // Decide from memory whether anything worth a write changed.
        let cached = self.cached_node(node).await?.ok_or_else(|| node_deleted(node))?;
        let old = current(node, fingerprint, &cached.value)?;
        validate(&hb, &old.architecture)?;
        let now = tokio::time::Instant::now();
        let record_due = {
            let beats = self.beats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            beats.get(node).is_none_or(|b| b.stream != stream || now.duration_since(b.recorded) >= RECORD_EVERY)
        };
        let changed = differs(&old, &self.observed(node, &old, &hb)) || cached.value.unreachable_since.is_some();
        if !changed && !record_due {
            self.note_beat(node, stream, now, false);
            return self.answer().await;
        }
        // The one bounded compare-and-swap helper, against the stored record.
        self.store
            .update::<NodeRecord, Rmw, _>(&node_key(node), |cur| {
                let mut rec = cur.cloned().ok_or_else(|| node_deleted(node))?;
                let old = current(node, fingerprint, &rec)?;
                if old.status != status::READY {
                    tracing::info!(node, from = %old.status, "node ready");
                }
                rec.node = Some(self.observed(node, &old, &hb));
                rec.unreachable_since = None;
                Ok(Some(rec))
            })
            .await?;
        self.note_beat(node, stream, now, true);
        self.answer().await
    }

    /// Answers a report that is not recorded (over the rate limit); it is
    /// still checked field by field.
    async fn answer_unrecorded(&self, node: &str, hb: &HeartbeatRequest) -> Result<HeartbeatResponse, ApiError> {
        let rec = self.cached_node(node).await?.ok_or_else(|| node_deleted(node))?;
        validate(hb, &rec.value.node.unwrap_or_default().architecture)?;
        self.answer().await
    }

    /// Notes a report in this replica's memory.
    pub(crate) fn note_beat(&self, node: &str, stream: u64, at: tokio::time::Instant, recorded: bool) {
        let mut beats = self.beats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let e = beats.entry(node.to_owned()).or_insert(Beat { stream, recorded: at });
        if e.stream != stream || recorded {
            e.recorded = at;
        }
        e.stream = stream;
    }

    /// The node as this report shows it.
    fn observed(&self, node: &str, old: &Node, hb: &HeartbeatRequest) -> Node {
        let mut n = old.clone();
        n.status = status::READY.to_owned();
        n.last_heartbeat_at = Some(now_ts());
        n.agent_version = hb.agent_version.clone();
        let caps = hb.capabilities.clone().unwrap_or_default();
        let res = hb.resources.unwrap_or_default();
        n.accelerator = caps.accelerator.clone();
        n.qemu_version = caps.qemu_version.clone();
        n.capacity = Some(NodeCapacity {
            cpu_cores: caps.cpu_cores,
            cpu_available: res.cpu_available,
            memory_bytes: caps.memory_bytes,
            memory_available_bytes: res.memory_available_bytes,
            system_disk_total_bytes: res.system_disk_total_bytes,
            system_disk_free_bytes: res.system_disk_free_bytes,
        });
        let threshold = f64::from(self.settings.pressure_threshold_percent);
        let required = self.settings.pressure_consecutive_required;
        let prev = old.pressure.unwrap_or_default();
        let mem_under = percent_free(res.memory_available_bytes, res.memory_total_bytes).is_some_and(|p| p < threshold);
        let disk_under =
            percent_free(res.system_disk_free_bytes, res.system_disk_total_bytes).is_some_and(|p| p < threshold);
        n.pressure = Some(NodePressure {
            memory: Some(pressure(prev.memory.as_ref(), mem_under, required, "memory", node)),
            system_disk: Some(pressure(prev.system_disk.as_ref(), disk_under, required, "system_disk", node)),
        });
        n.pools = hb
            .pools
            .iter()
            .filter_map(|p| {
                let pool = p.pool.as_ref()?;
                Some(NodePool {
                    name: pool.name.clone(),
                    r#type: "local_dir".into(),
                    path: pool.path.clone(),
                    capacity_bytes: pool.capacity_bytes,
                    free_bytes: pool.free_bytes,
                    reconciliation_status: p.reconciliation_status.clone(),
                    reconciliation_error: p.reconciliation_error.clone(),
                })
            })
            .collect();
        n
    }

    /// The desired state for a node: the cluster default pool, read from the
    /// cluster settings (the one source; the config key only seeds it).
    async fn answer(&self) -> Result<HeartbeatResponse, ApiError> {
        let pool = self.default_pool().await?;
        let declared_pools =
            if pool.is_empty() { Vec::new() } else { vec![DeclaredPool { name: pool, path: String::new() }] };
        Ok(HeartbeatResponse {
            received_at: Some(now_ts()),
            declared_pools,
            heartbeat_interval_seconds: self.settings.heartbeat_interval_seconds,
        })
    }

    /// Marks this replica as serving `node`: its liveness key under the
    /// replica's lease (one write per stream).
    async fn claim_liveness(&self, node: &str) -> Result<(), ApiError> {
        let lease = self.lease.load(std::sync::atomic::Ordering::Acquire);
        if lease == 0 {
            return Err(ApiError::new(ErrorCode::RequestTimeout, "the control plane is starting; retry"));
        }
        // A reconnect to the replica that already holds the key costs no
        // write, so a node cannot churn etcd by reopening its stream.
        let key = otherix_store::keys::node_alive(node);
        self.alive.caught_up().await.map_err(store_error)?;
        if self.alive.get(&key).map_err(store_error)?.is_some_and(|v| v.value == self.replica_id) {
            return Ok(());
        }
        self.store.put_leased(&key, self.replica_id.encode_to_vec(), lease).await.map_err(store_error)?;
        Ok(())
    }

    /// The node went silent on this replica: drop its liveness key (when it
    /// is still this replica's) and mark it unreachable.
    pub(crate) async fn silent(&self, node: &str, stream: u64) {
        {
            let mut beats = self.beats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match beats.get(node) {
                Some(b) if b.stream == stream => {
                    beats.remove(node);
                }
                // A newer stream serves it now.
                _ => return,
            }
        }
        let key = otherix_store::keys::node_alive(node);
        match self.store.release(&key, &self.replica_id.encode_to_vec()).await {
            Ok(true) => {
                tracing::warn!(node, "node unreachable: no heartbeat within the stale threshold");
                self.mark_unreachable(node).await;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(node, error = %e, "cannot drop the liveness key"),
        }
    }
}

type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<HeartbeatResponse, Status>> + Send>>;

#[tonic::async_trait]
impl HeartbeatService for HeartbeatServiceImpl {
    type HeartbeatStream = HeartbeatStream;

    #[tracing::instrument(skip_all, fields(node = tracing::field::Empty))]
    async fn heartbeat(
        &self,
        req: Request<Streaming<HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let peer = req.extensions().get::<PeerCert>().cloned();
        let Some((node, fingerprint)) = peer.and_then(|p| Some((p.node_name?, p.fingerprint))) else {
            return Err(ApiError::new(ErrorCode::Unauthenticated, "heartbeats need an agent client certificate").into());
        };
        tracing::Span::current().record("node", node.as_str());
        // Refuse at once when the node is unknown, revoked or gone.
        let rec = self.hub.cached_node(&node).await?.ok_or_else(|| node_deleted(&node))?;
        if rec.value.cert_fingerprint != fingerprint {
            return Err(revoked(&node).into());
        }
        static STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let stream = STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Registered before the liveness key is written, so a previous
        // stream's silence check cannot drop the key this stream relies on.
        self.hub.note_beat(&node, stream, tokio::time::Instant::now(), false);
        self.hub.claim_liveness(&node).await?;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let hub = self.hub.clone();
        let mut deleted = hub.deleted.subscribe();
        let stale = std::time::Duration::from_secs(u64::from(hub.settings.stale_threshold_seconds));
        let span = tracing::info_span!("heartbeat_stream", node = %node, stream);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut bucket = Bucket::new();
                let mut last = tokio::time::Instant::now();
                loop {
                    let silence = tokio::time::sleep_until(last + stale);
                    tokio::select! {
                        msg = inbound.message() => match msg {
                            Ok(Some(hb)) => {
                                last = tokio::time::Instant::now();
                                let answer = if bucket.take() {
                                    hub.record_heartbeat(&node, &fingerprint, stream, hb).await
                                } else {
                                    // Too many reports: answered (one answer per report) but not
                                    // recorded; not an error, an agent reporting on change may burst.
                                    hub.answer_unrecorded(&node, &hb).await
                                };
                                let stop = answer.is_err();
                                if tx.send(answer.map_err(Status::from)).await.is_err() || stop {
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!(error = %e, "heartbeat stream ended");
                                // Tell the agent why (an oversized report, for one).
                                let _ = tx.send(Err(e)).await;
                                break;
                            }
                        },
                        () = silence => {
                            hub.silent(&node, stream).await;
                            return;
                        }
                        gone = deleted.recv() => {
                            if matches!(gone, Ok(ref n) if *n == node) {
                                tracing::info!("node deleted: closing its heartbeat stream");
                                let _ = tx.send(Err(node_deleted(&node).into())).await;
                                break;
                            }
                        }
                    }
                }
                drop(tx);
                // The agent may reconnect (here or to another replica): the node
                // stays ready until it has been silent for the stale threshold.
                tokio::time::sleep_until(last + stale).await;
                hub.silent(&node, stream).await;
            },
            span,
        ));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

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
use otherix_proto::v1::{NodeCapacity, NodePool, NodePressure, PressureCondition};
use otherix_store::Expect;
use tonic::{Request, Response, Status, Streaming};

use super::{NodeHub, PeerCert, node_key, status};
use crate::identity::now_ts;
use crate::store_error::store_error;

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

impl NodeHub {
    /// Records one report of `node` (whose certificate has `fingerprint`)
    /// and returns the answer.
    pub async fn record_heartbeat(
        &self,
        node: &str,
        fingerprint: &str,
        hb: HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ApiError> {
        for _ in 0..8 {
            let Some(cur) = self.node(node).await? else { return Err(revoked(node)) };
            let mut rec: NodeRecord = cur.value.clone();
            if rec.cert_fingerprint.is_empty() || rec.cert_fingerprint != fingerprint {
                return Err(revoked(node));
            }
            let mut n = rec.node.clone().unwrap_or_default();
            if n.status == status::GONE {
                return Err(ApiError::new(ErrorCode::NodeGone, format!("node {node:?} is gone; readmit it first"))
                    .with_detail("reason", "node_gone"));
            }
            if n.status != status::READY {
                tracing::info!(node, from = %n.status, "node ready");
            }
            n.status = status::READY.to_owned();
            n.last_heartbeat_at = Some(now_ts());
            n.agent_version = hb.agent_version.clone();
            if !hb.architecture.is_empty() {
                n.architecture = hb.architecture.clone();
            }
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
            let prev = n.pressure.unwrap_or_default();
            let mem_under =
                percent_free(res.memory_available_bytes, res.memory_total_bytes).is_some_and(|p| p < threshold);
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
            rec.node = Some(n);
            rec.unreachable_since = None;
            match self.store.put(&node_key(node), &rec, Expect::Revision(cur.mod_revision), &[]).await {
                Ok(_) => return Ok(self.answer()),
                Err(otherix_store::StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(store_error(e)),
            }
        }
        Err(ApiError::new(ErrorCode::Conflict, "the node record kept changing; retry"))
    }

    /// The desired state for a node: today, the cluster default pool.
    fn answer(&self) -> HeartbeatResponse {
        let declared_pools = if self.default_pool.is_empty() {
            Vec::new()
        } else {
            vec![DeclaredPool { name: self.default_pool.clone(), path: String::new() }]
        };
        HeartbeatResponse {
            received_at: Some(now_ts()),
            declared_pools,
            heartbeat_interval_seconds: self.settings.heartbeat_interval_seconds,
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
        let rec = self.hub.node(&node).await?.ok_or_else(|| revoked(&node))?;
        if rec.value.cert_fingerprint != fingerprint {
            return Err(revoked(&node).into());
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let hub = self.hub.clone();
        let mut deleted = hub.deleted.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(hb)) => {
                            let answer = hub.record_heartbeat(&node, &fingerprint, hb).await;
                            let stop = answer.is_err();
                            if tx.send(answer.map_err(Status::from)).await.is_err() || stop {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(node = %node, error = %e, "heartbeat stream ended");
                            break;
                        }
                    },
                    gone = deleted.recv() => {
                        if matches!(gone, Ok(ref n) if *n == node) {
                            tracing::info!(node = %node, "node deleted: closing its heartbeat stream");
                            let _ = tx.send(Err(revoked(&node).into())).await;
                            break;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

//! Node liveness. The replica serving a node's heartbeat stream holds the
//! node's `node_alive/<name>` key under its own lease and drops it when the
//! node has been silent for the stale threshold; a replica that dies takes
//! its keys with its lease. Every replica's loop marks a ready node
//! unreachable once its key has been absent for one heartbeat interval, and
//! gone after the grace period; compare-and-swap keeps replicas from fighting.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use otherix_proto::otherix::store::v1::NodeRecord;
use otherix_store::{StoreError, keys};
use prost::Message;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{NodeHub, node_key, status};
use crate::identity::now_ts;

/// The replica lease's time to live: a dead replica's nodes lose their
/// liveness keys this long after its last renewal.
pub const REPLICA_LEASE_TTL: Duration = Duration::from_secs(10);

fn age(t: Option<&prost_types::Timestamp>) -> Option<Duration> {
    let t = SystemTime::try_from(*t?).ok()?;
    SystemTime::now().duration_since(t).ok()
}

impl NodeHub {
    /// Moves a node to `next` (unreachable or gone) when it is still in `from`.
    async fn transition(&self, name: &str, from: &str, next: &str) -> Result<bool, StoreError> {
        let mut moved = false;
        self.store
            .update::<NodeRecord, StoreError, _>(&node_key(name), |cur| {
                let Some(cur) = cur else { return Ok(None) };
                let mut rec = cur.clone();
                let Some(n) = rec.node.as_mut() else { return Ok(None) };
                if n.status != from {
                    return Ok(None);
                }
                n.status = next.to_owned();
                if next == status::UNREACHABLE {
                    rec.unreachable_since = Some(now_ts());
                }
                moved = true;
                Ok(Some(rec))
            })
            .await?;
        Ok(moved)
    }

    /// Marks a ready node unreachable.
    pub(crate) async fn mark_unreachable(&self, name: &str) {
        match self.transition(name, status::READY, status::UNREACHABLE).await {
            Ok(true) => tracing::warn!(node = %name, "node unreachable"),
            Ok(false) => {}
            Err(e) => tracing::warn!(node = %name, error = %e, "cannot mark the node unreachable"),
        }
    }

    /// One pass over every node, from memory; `absent` remembers since when
    /// each ready node has had no liveness key.
    pub async fn check_liveness(&self, absent: &mut HashMap<String, Instant>) {
        let grace = Duration::from_secs(u64::from(self.settings.gone_grace_seconds));
        let wait = self.heartbeat_interval();
        let Ok(nodes) = self.nodes().await else { return };
        let Ok(alive) = self.alive.list(keys::NODE_ALIVE) else { return };
        let alive: std::collections::HashSet<&str> = alive.iter().map(|(k, _)| keys::leaf(k)).collect();
        let now = Instant::now();
        let mut seen = Vec::new();
        for cur in nodes {
            let Some(n) = cur.value.node.as_ref() else { continue };
            let name = n.name.clone();
            match n.status.as_str() {
                status::READY if !alive.contains(name.as_str()) => {
                    let since = *absent.entry(name.clone()).or_insert(now);
                    seen.push(name.clone());
                    if now.duration_since(since) >= wait {
                        tracing::warn!(node = %name, "node unreachable: no replica serves its heartbeat");
                        if let Err(e) = self.transition(&name, status::READY, status::UNREACHABLE).await {
                            tracing::warn!(node = %name, error = %e, "cannot mark the node unreachable");
                        }
                    }
                }
                status::UNREACHABLE if age(cur.value.unreachable_since.as_ref()).is_some_and(|a| a > grace) => {
                    tracing::warn!(node = %name, "node gone: unreachable past the grace period; readmit it to bring it back");
                    if let Err(e) = self.transition(&name, status::UNREACHABLE, status::GONE).await {
                        tracing::warn!(node = %name, error = %e, "cannot mark the node gone");
                    }
                }
                _ => {}
            }
        }
        absent.retain(|k, _| seen.contains(k));
    }

    /// Grants this replica's lease, announces the replica, and re-writes the
    /// liveness keys of the nodes it serves (after a lost lease).
    async fn take_lease(&self) -> Result<i64, StoreError> {
        let lease = self.store.grant_lease(REPLICA_LEASE_TTL).await?;
        let host = tokio::fs::read_to_string("/proc/sys/kernel/hostname").await.unwrap_or_default();
        self.store.put_leased(&keys::replica(&self.replica_id), host.trim().to_owned().encode_to_vec(), lease).await?;
        self.lease.store(lease, Ordering::Release);
        let served: Vec<String> =
            self.beats.lock().unwrap_or_else(std::sync::PoisonError::into_inner).keys().cloned().collect();
        for node in served {
            self.store.put_leased(&keys::node_alive(&node), self.replica_id.encode_to_vec(), lease).await?;
        }
        Ok(lease)
    }
}

/// Keeps the replica's lease alive; a lost lease is replaced. Ends with
/// the token (revoking the lease, so this replica's nodes are handed over
/// at once instead of after the TTL).
pub async fn run_lease(hub: Arc<NodeHub>, cancel: CancellationToken) -> otherix_supervisor::LoopResult {
    let lease = hub.take_lease().await?;
    tracing::info!(replica = %hub.replica_id, lease = format!("{lease:x}"), "replica lease granted");
    let kept = hub.store.keep_lease_alive(lease, REPLICA_LEASE_TTL, cancel.clone()).await;
    if cancel.is_cancelled() {
        hub.lease.store(0, Ordering::Release);
        if let Err(e) = hub.store.revoke_lease(lease).await {
            tracing::warn!(error = %e, "cannot revoke the replica lease");
        }
        return Ok(());
    }
    kept?;
    Err(Box::new(StoreError::LeaseLost { lease }))
}

/// Runs the liveness check until the token is cancelled.
pub async fn run(hub: Arc<NodeHub>, cancel: CancellationToken) -> otherix_supervisor::LoopResult {
    let tick = (hub.heartbeat_interval() / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut absent = HashMap::new();
    loop {
        tokio::select! {
            _ = interval.tick() => hub.check_liveness(&mut absent).await,
            () = cancel.cancelled() => return Ok(()),
        }
    }
}

//! Marks nodes unreachable when their reports stop, and gone after the grace
//! period. Every replica runs it; compare-and-swap keeps them from fighting.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use otherix_store::Expect;

use super::{NodeHub, node_key, status};
use crate::identity::now_ts;

fn age(t: Option<&prost_types::Timestamp>) -> Option<Duration> {
    let t = SystemTime::try_from(*t?).ok()?;
    SystemTime::now().duration_since(t).ok()
}

impl NodeHub {
    /// One pass over every node.
    pub async fn check_liveness(&self) {
        let stale = Duration::from_secs(u64::from(self.settings.stale_threshold_seconds));
        let grace = Duration::from_secs(u64::from(self.settings.gone_grace_seconds));
        let Ok(nodes) = self.nodes().await else { return };
        for cur in nodes {
            let mut rec = cur.value.clone();
            let Some(n) = rec.node.as_mut() else { continue };
            let name = n.name.clone();
            let next = match n.status.as_str() {
                status::READY if age(n.last_heartbeat_at.as_ref()).is_none_or(|a| a > stale) => status::UNREACHABLE,
                status::UNREACHABLE if age(rec.unreachable_since.as_ref()).is_some_and(|a| a > grace) => status::GONE,
                _ => continue,
            };
            if next == status::UNREACHABLE {
                tracing::warn!(node = %name, ?stale, "node unreachable: no heartbeat within the stale threshold");
                rec.unreachable_since = Some(now_ts());
            } else {
                tracing::warn!(node = %name, "node gone: unreachable past the grace period; readmit it to bring it back");
            }
            if let Some(n) = rec.node.as_mut() {
                n.status = next.to_owned();
            }
            // A conflict means a heartbeat (or another replica) got there first.
            let _ = self.store.put(&node_key(&name), &rec, Expect::Revision(cur.mod_revision), &[]).await;
        }
    }
}

/// Runs the liveness check until the task is aborted.
pub async fn run(hub: Arc<NodeHub>) {
    let stale = u64::from(hub.settings.stale_threshold_seconds);
    let tick = Duration::from_millis((stale * 1000 / 4).clamp(250, 5000));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        hub.check_liveness().await;
    }
}

//! Nodes: the cluster CA, join tokens, enrolment, heartbeats and node lifecycle.

pub mod enrolment;
pub mod heartbeat;
pub mod liveness;
pub mod service;

use std::time::Duration;

use otherix_errors::{ApiError, ErrorCode};
use otherix_pki::ClusterCa;
use otherix_proto::otherix::store::v1::{ClusterCaRecord, NodeRecord};
use otherix_proto::v1::Node;
use otherix_store::{Expect, Store, StoreError, Versioned};
use tokio::sync::broadcast;

use crate::config::NodesConfig;
use crate::store_error::store_error;

/// The store key of the cluster CA.
pub const CA_KEY: &str = "pki/cluster_ca";
/// The prefix of node records.
pub const NODES: &str = "nodes/";

/// Node states.
pub mod status {
    /// Joined, no heartbeat yet.
    pub const PENDING: &str = "pending";
    /// Reporting.
    pub const READY: &str = "ready";
    /// No report within the stale threshold.
    pub const UNREACHABLE: &str = "unreachable";
    /// Unreachable past the grace period; only readmit brings it back.
    pub const GONE: &str = "gone";
}

/// The identity of a TLS client that presented a certificate the cluster CA
/// issued, put into each request's extensions by the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The node the certificate names, when it is an agent certificate.
    pub node_name: Option<String>,
    /// sha256 of the certificate DER, lowercase hex.
    pub fingerprint: String,
}

/// Shared state of the node services.
#[derive(Debug)]
pub struct NodeHub {
    pub(crate) store: Store,
    pub(crate) ca: ClusterCa,
    pub(crate) settings: NodesConfig,
    pub(crate) default_pool: String,
    /// Names of deleted nodes, so their open heartbeat streams end at once.
    pub(crate) deleted: broadcast::Sender<String>,
}

impl NodeHub {
    /// The hub over a store and the cluster CA.
    pub fn new(store: Store, ca: ClusterCa, settings: NodesConfig, default_pool: String) -> NodeHub {
        NodeHub { store, ca, settings, default_pool, deleted: broadcast::channel(64).0 }
    }

    /// The cluster CA.
    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    /// A node record by name.
    pub async fn node(&self, name: &str) -> Result<Option<Versioned<NodeRecord>>, ApiError> {
        if otherix_pki::validate_node_name(name).is_err() {
            return Ok(None);
        }
        self.store.get::<NodeRecord>(&node_key(name)).await.map_err(store_error)
    }

    /// Every node record, by name.
    pub async fn nodes(&self) -> Result<Vec<Versioned<NodeRecord>>, ApiError> {
        Ok(self.store.list::<NodeRecord>(NODES).await.map_err(store_error)?.into_iter().map(|(_, v)| v).collect())
    }

    /// The heartbeat interval agents are told.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.settings.heartbeat_interval_seconds))
    }
}

/// The store key of a node.
pub fn node_key(name: &str) -> String {
    format!("{NODES}{name}")
}

/// not_found for a node name.
pub fn node_not_found(name: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("node {name:?} not found")).with_detail("node", name)
}

/// The node view a role may see: developers and viewers get the reduced shape.
pub fn node_view(rec: &NodeRecord, full: bool) -> Node {
    let n = rec.node.clone().unwrap_or_default();
    if full {
        return n;
    }
    Node {
        id: n.id,
        name: n.name,
        architecture: n.architecture,
        status: n.status,
        cordoned: n.cordoned,
        created_at: n.created_at,
        ..Default::default()
    }
}

/// Loads the cluster CA from the store, creating it on the first boot of the
/// cluster (replicas racing: the first write wins, the others read it).
pub async fn ensure_ca(store: &Store) -> Result<ClusterCa, StoreError> {
    loop {
        if let Some(rec) = store.get::<ClusterCaRecord>(CA_KEY).await? {
            return ClusterCa::from_pem(&rec.value.cert_pem, &rec.value.key_pem).map_err(|e| {
                tracing::error!(error = %e, "the stored cluster CA is unusable");
                StoreError::Contended { key: CA_KEY.into(), attempts: 0 }
            });
        }
        let ca = ClusterCa::generate().map_err(|e| {
            tracing::error!(error = %e, "cannot generate the cluster CA");
            StoreError::Contended { key: CA_KEY.into(), attempts: 0 }
        })?;
        let (cert_pem, key_pem) = ca.to_pem();
        let rec = ClusterCaRecord { cert_pem, key_pem, created_at: Some(crate::identity::now_ts()) };
        match store.put(CA_KEY, &rec, Expect::Absent, &[]).await {
            Ok(_) => {
                tracing::info!(fingerprint = %otherix_pki::format_fingerprint(&ca.fingerprint_bytes()), "cluster CA created");
                return Ok(ca);
            }
            Err(StoreError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
}

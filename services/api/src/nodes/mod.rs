//! Nodes: the cluster CA, join tokens, enrolment, heartbeats and node lifecycle.

pub mod enrolment;
pub mod heartbeat;
pub mod liveness;
pub mod service;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use otherix_errors::ApiError;
use otherix_pki::ClusterCa;
use otherix_proto::otherix::store::v1::{ClusterCaRecord, ClusterSettings, NodeRecord};
use otherix_proto::v1::Node;
use otherix_store::{Cache, Expect, Store, StoreError, Versioned, keys};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::NodesConfig;
use crate::store_error::store_error;

/// The store key of the cluster CA.
pub const CA_KEY: &str = keys::CLUSTER_CA;
/// The prefix of node records.
pub const NODES: &str = keys::NODES;

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

/// What this replica knows of a node whose heartbeat stream it serves.
#[derive(Debug, Clone)]
pub(crate) struct Beat {
    /// Which stream of this replica serves it (a reconnect makes a new one).
    pub(crate) stream: u64,
    /// When the record's `last_heartbeat_at` was last written.
    pub(crate) recorded: tokio::time::Instant,
}

/// Shared state of the node services: the store, watch-fed caches of nodes,
/// liveness keys and cluster settings, and this replica's heartbeat streams.
#[derive(Debug)]
pub struct NodeHub {
    pub(crate) store: Store,
    pub(crate) ca: ClusterCa,
    pub(crate) settings: NodesConfig,
    pub(crate) nodes: Cache<NodeRecord>,
    pub(crate) alive: Cache<String>,
    pub(crate) cluster: Cache<ClusterSettings>,
    /// This replica's id, the value of the liveness keys it writes.
    pub(crate) replica_id: String,
    /// This replica's lease (liveness keys live under it); 0 until granted.
    pub(crate) lease: std::sync::atomic::AtomicI64,
    /// Nodes whose heartbeat streams this replica serves.
    pub(crate) beats: Mutex<HashMap<String, Beat>>,
    /// Names of deleted nodes, so their open heartbeat streams end at once.
    pub(crate) deleted: broadcast::Sender<String>,
}

impl NodeHub {
    /// The hub over a store and the cluster CA; its caches run until `cancel`.
    pub fn new(store: Store, ca: ClusterCa, settings: NodesConfig, cancel: CancellationToken) -> NodeHub {
        let stale = crate::identity::STALE_AFTER;
        NodeHub {
            nodes: store.cache(keys::NODES, None, stale, cancel.clone()),
            alive: store.cache(keys::NODE_ALIVE, None, stale, cancel.clone()),
            cluster: store.cache(keys::CLUSTER_SETTINGS, None, stale, cancel),
            store,
            ca,
            settings,
            replica_id: uuid::Uuid::now_v7().simple().to_string(),
            lease: std::sync::atomic::AtomicI64::new(0),
            beats: Mutex::new(HashMap::new()),
            deleted: broadcast::channel(64).0,
        }
    }

    /// Waits until the caches have listed once.
    pub async fn ready(&self) -> Result<(), StoreError> {
        self.nodes.ready().await?;
        self.alive.ready().await?;
        self.cluster.ready().await
    }

    /// The cluster CA.
    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    /// A node record by name, read from the store (for writes that
    /// compare-and-swap on it).
    pub async fn node(&self, name: &str) -> Result<Option<Versioned<NodeRecord>>, ApiError> {
        if otherix_pki::validate_node_name(name).is_err() {
            return Ok(None);
        }
        self.store.get::<NodeRecord>(&node_key(name)).await.map_err(store_error)
    }

    /// A node record by name from memory (after this replica's own writes).
    pub async fn cached_node(&self, name: &str) -> Result<Option<Versioned<NodeRecord>>, ApiError> {
        if otherix_pki::validate_node_name(name).is_err() {
            return Ok(None);
        }
        // A miss is checked against the store: enrolled a moment ago through another replica.
        self.nodes.lookup(&node_key(name)).await.map_err(store_error)
    }

    /// Every node record, by name, from memory.
    pub async fn nodes(&self) -> Result<Vec<Versioned<NodeRecord>>, ApiError> {
        self.nodes.caught_up().await.map_err(store_error)?;
        Ok(self.nodes.list(NODES).map_err(store_error)?.into_iter().map(|(_, v)| v).collect())
    }

    /// The cluster default pool, from memory: the one source agents are told.
    pub async fn default_pool(&self) -> Result<String, ApiError> {
        self.cluster.caught_up().await.map_err(store_error)?;
        Ok(self
            .cluster
            .get(keys::CLUSTER_SETTINGS)
            .map_err(store_error)?
            .map(|s| s.value.default_pool_name)
            .unwrap_or_default())
    }

    /// The heartbeat interval agents are told.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.settings.heartbeat_interval_seconds))
    }
}

/// The store key of a node.
pub fn node_key(name: &str) -> String {
    keys::node(name)
}

/// not_found for a node name.
pub fn node_not_found(name: &str) -> ApiError {
    ApiError::not_found("node", name).with_detail("node", name)
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

/// Why the cluster CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The store failed.
    #[error("cannot read or write the cluster CA in the store")]
    Store(#[from] StoreError),
    /// The stored CA does not load (corrupt, or sealed with another key).
    #[error("the stored cluster CA ({CA_KEY}) is unusable")]
    Corrupt(#[source] otherix_pki::PkiError),
    /// A new CA could not be generated.
    #[error("cannot generate the cluster CA")]
    Generate(#[source] otherix_pki::PkiError),
}

/// Loads the cluster CA from the store, creating it on the first boot of the
/// cluster (replicas racing: the first write wins, the others read it).
pub async fn ensure_ca(store: &Store) -> Result<ClusterCa, CaError> {
    loop {
        if let Some(rec) = store.get::<ClusterCaRecord>(CA_KEY).await? {
            let key_pem = crate::secrets_at_rest::ca_key(store, &rec.value.key_pem)?;
            return ClusterCa::from_pem(&rec.value.cert_pem, &key_pem).map_err(CaError::Corrupt);
        }
        let ca = ClusterCa::generate().map_err(CaError::Generate)?;
        let (cert_pem, key_pem) = ca.to_pem();
        let key_pem = crate::secrets_at_rest::seal_ca_key(store, &key_pem)?;
        let rec = ClusterCaRecord { cert_pem, key_pem, created_at: Some(crate::identity::now_ts()) };
        match store.put(CA_KEY, &rec, Expect::Absent, &[]).await {
            Ok(_) => {
                tracing::info!(fingerprint = %otherix_pki::format_fingerprint(&ca.fingerprint_bytes()), "cluster CA created");
                return Ok(ca);
            }
            Err(StoreError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

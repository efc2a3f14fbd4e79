//! The agent side of node enrolment (issue 4).
//!
//! - [`bootstrap`]: fetches the cluster CA from the control plane's agent listener over TLS
//!   *without* verifying the server, compares the sha256 of its DER with the pinned
//!   fingerprint, then joins over a connection that accepts only a server certificate from
//!   that CA with the control-plane identity (never a node's, whatever host name it holds),
//!   with a join token and a fresh key and CSR; checks the returned certificate (chains to the pinned CA,
//!   names this node, carries our key) and writes `ca.crt`, `agent.key` (0600) and
//!   `agent.crt` atomically into the cert dir (0700), the certificate last.
//! - [`load_material`]: reads and checks that material for `serve`.
//! - [`HostFacts`]: what the heartbeat reports about the host, with capacity caps.
//! - [`HeartbeatClient`]: the mTLS heartbeat stream (same server check), with reconnects and
//!   backoff, and a slow retry once the control plane refuses this node's certificate.
//! - [`confine_pool_path`]: declared pool paths stay inside the agent's pool root.
//!
//! The log lines of the seed's troubleshooting table are the `Display` forms of
//! [`BootstrapError`] (`bootstrap: CA fingerprint mismatch (expected sha256:… got sha256:…)`,
//! `bootstrap protocol: ...`, `partial bootstrap state ...`); the caller logs
//! `agent: bootstrap complete` and `agent: using existing cert material` on the two
//! [`BootstrapOutcome`]s.
//!
//! # Wiring into `otherix-agent`
//!
//! Config keys (env `OTHERIX_BOOTSTRAP__CP_URL`, `OTHERIX_BOOTSTRAP__TOKEN_PATH`,
//! `OTHERIX_BOOTSTRAP__CA_FINGERPRINT`, `OTHERIX_BOOTSTRAP__NODE_NAME`, ...):
//! `bootstrap.cp_url`, `bootstrap.token_path` / `bootstrap.token_env` (or `--token`),
//! `bootstrap.ca_fingerprint`, `bootstrap.node_name`, `bootstrap.advertised_endpoint`,
//! `tls.cert_dir`, `heartbeat.interval_seconds`, `capacity.*` ([`CapacityConfig`]).
//!
//! ```no_run
//! # async fn demo(state_dir: std::path::PathBuf, pool_root: std::path::PathBuf) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use otherix_agent_enrolment::*;
//!
//! let cert_dir = state_dir.join("certs");
//! // `bootstrap` (and `serve` when it finds no material and a token is configured):
//! let opts = BootstrapOptions::new(
//!     "https://cp.example:8443",
//!     TokenSource::File("/etc/otherix/join-token".into()),
//!     "sha256:9f2c...",
//!     "worker-1",
//!     "10.0.0.5:9443",
//!     &cert_dir,
//! );
//! match bootstrap(&opts).await {
//!     Ok(BootstrapOutcome::Bootstrapped { node_id, .. }) => {
//!         tracing::info!(%node_id, "agent: bootstrap complete")
//!     }
//!     Ok(BootstrapOutcome::AlreadyBootstrapped { .. }) => tracing::info!("agent: using existing cert material"),
//!     Err(e) => {
//!         tracing::error!("{e}");
//!         std::process::exit(1)
//!     }
//! }
//! // `serve`:
//! let material = load_material(&cert_dir)?.expect("bootstrapped above");
//! let pools = Arc::new(DirPools::new(pool_root));
//! let mut facts_cfg = FactsConfig::new(&state_dir);
//! facts_cfg.capacity = CapacityConfig { reserved_cpus: 1, ..Default::default() };
//! let facts = Arc::new(HostFactsProvider::new(facts_cfg, env!("CARGO_PKG_VERSION"), Some(pools.clone())));
//! let heartbeat = HeartbeatClient::new("https://cp.example:8443", &material, facts, pools)?
//!     .with_config(HeartbeatConfig { interval: std::time::Duration::from_secs(30), ..Default::default() })?;
//! let (_stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
//! tokio::spawn(heartbeat.run(async move {
//!     let _ = stop_rx.changed().await;
//! }));
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod bootstrap;
mod error;
mod facts;
mod heartbeat;
mod pools;
mod transport;

pub use bootstrap::{
    BootstrapOptions, BootstrapOutcome, CA_FILE, CERT_DIR_MODE, CERT_FILE, CERT_MODE, KEY_FILE, KEY_MODE, Material,
    MaterialPaths, TokenSource, bootstrap, is_control_plane_peer, load_material,
};
pub use error::BootstrapError;
pub use facts::{CapacityConfig, FactsConfig, HostFacts};
pub use heartbeat::{
    DeclaredPoolsSink, FactsProvider, HeartbeatClient, HeartbeatConfig, HeartbeatError, HostFactsProvider,
};
pub use pools::{DirPools, PoolPathError, PoolReport, confine_pool_path};
pub use transport::{CpUrl, host_architecture, normalize_architecture, parse_cp_url};

//! The agent side of node enrolment (issue 4).
//!
//! - [`bootstrap`]: fetches the cluster CA from the control plane's agent listener over TLS
//!   *without* verifying the server, compares the sha256 of its DER with the pinned
//!   fingerprint, then joins over a connection that trusts only that CA, with a join token
//!   and a fresh key and CSR; checks the returned certificate (chains to the pinned CA,
//!   names this node, carries our key) and writes `ca.crt`, `agent.key` (0600) and
//!   `agent.crt` atomically into the cert dir (0700), the certificate last.
//! - [`load_material`]: reads and checks that material for `serve`.
//! - [`HostFacts`]: what the heartbeat reports about the host, with capacity caps.
//! - [`HeartbeatClient`]: the mTLS heartbeat stream, with reconnects and backoff.
//!
//! The log lines of the seed's troubleshooting table are the `Display` forms of
//! [`BootstrapError`] (`bootstrap: CA fingerprint mismatch (expected sha256:… got sha256:…)`,
//! `bootstrap protocol: ...`, `partial bootstrap state ...`); the caller logs
//! `agent: bootstrap complete` and `agent: using existing cert material` on the two
//! [`BootstrapOutcome`]s.

#![warn(missing_docs)]

mod bootstrap;
mod error;
mod facts;
mod heartbeat;
mod pools;
mod transport;

pub use bootstrap::{
    BootstrapOptions, BootstrapOutcome, CA_FILE, CERT_DIR_MODE, CERT_FILE, CERT_MODE, KEY_FILE, KEY_MODE, Material,
    MaterialPaths, TokenSource, bootstrap, load_material,
};
pub use error::BootstrapError;
pub use facts::{CapacityConfig, FactsConfig, HostFacts};
pub use heartbeat::{
    DeclaredPoolsSink, FactsProvider, HeartbeatClient, HeartbeatConfig, HeartbeatError, HostFactsProvider,
};
pub use pools::{DirPools, PoolReport};
pub use transport::{CpUrl, host_architecture, normalize_architecture, parse_cp_url};

//! Cluster PKI for Otherix node enrolment: the cluster CA, control-plane replica server
//! certificates (with a disk cache), agent key/CSR generation and CSR signing, chain checks,
//! certificate identity, and rustls mTLS configurations (ring). No network, no etcd.

#![warn(missing_docs)]

mod agent;
mod ca;
mod error;
mod fingerprint;
mod names;
mod pem;
mod server;
mod tls;
mod verify;

pub use agent::{AGENT_CERT_VALIDITY, MAX_CSR_PEM_BYTES, SignedAgentCert, generate_agent_key_and_csr};
pub use ca::{CA_COMMON_NAME, CA_VALIDITY, ClusterCa};
pub use error::{CsrError, FingerprintError, IdentityError, NodeNameError, PkiError, VerifyError};
pub use fingerprint::{format_fingerprint, parse_fingerprint, sha256, to_hex};
pub use names::{
    AGENT_CN_PREFIX, AGENT_DNS_SUFFIX, CP_IDENTITY_URI, RESERVED_NODE_NAMES, agent_common_name, agent_dns_name,
    validate_node_name,
};
pub use otherix_files::{ensure_dir, write_file_atomic};
pub use server::{
    CP_CERT_FILE, CP_COMMON_NAME, CP_KEY_FILE, CachedServerCert, IssuedCert, REISSUE_BEFORE_EXPIRY,
    default_server_sans, load_or_issue_server_cert,
};
pub use tls::{
    agent_server_config, client_config_mtls, client_config_to_agent, control_plane_verifier, node_server_verifier,
    peer_identity, ring_provider, server_config_mtls,
};
pub use verify::{
    CertInfo, cert_identity, cert_identity_der, cert_info, is_control_plane_cert_der, key_matches_cert, verify_chain,
};

//! `bootstrap`: fetch the CA (pinned by fingerprint), join with a token and a CSR, and write
//! the agent's cert material; `load_material`: read it back for `serve`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use otherix_errors::ApiError;
use otherix_pki::{
    cert_identity, cert_info, ensure_dir, format_fingerprint, generate_agent_key_and_csr, key_matches_cert,
    parse_fingerprint, sha256, validate_node_name, verify_chain, write_file_atomic,
};
use otherix_proto::otherix::agent::v1::enrolment_service_client::EnrolmentServiceClient;
use otherix_proto::otherix::agent::v1::{GetCaRequest, JoinRequest};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tracing::{Instrument as _, debug, info_span};

use crate::error::{BootstrapError, chain, extend_chain, identity_refusal};
use crate::transport::{
    CpUrl, host_architecture, normalize_architecture, parse_cp_url, pinned_endpoint, unverified_channel,
};

/// File name of the agent certificate in the cert dir.
pub const CERT_FILE: &str = "agent.crt";
/// File name of the agent private key in the cert dir (mode 0600).
pub const KEY_FILE: &str = "agent.key";
/// File name of the pinned cluster CA certificate in the cert dir.
pub const CA_FILE: &str = "ca.crt";

/// Mode of the cert dir.
pub const CERT_DIR_MODE: u32 = 0o700;
/// Mode of `agent.key`.
pub const KEY_MODE: u32 = 0o600;
/// Mode of `agent.crt` and `ca.crt`.
pub const CERT_MODE: u32 = 0o644;

/// Where the join token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The token itself (`--token`).
    Value(String),
    /// A file holding the token (`--token-path`, `bootstrap.token_path`); surrounding
    /// whitespace is ignored.
    File(PathBuf),
    /// The name of an environment variable holding the token (`--token-env`,
    /// `bootstrap.token_env`).
    Env(String),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Value(_) => f.write_str("Value([redacted])"),
            TokenSource::File(p) => f.debug_tuple("File").field(p).finish(),
            TokenSource::Env(n) => f.debug_tuple("Env").field(n).finish(),
        }
    }
}

impl TokenSource {
    /// Reads the token; an empty token is an error.
    pub fn resolve(&self) -> Result<String, BootstrapError> {
        let token = match self {
            TokenSource::Value(v) => v.trim().to_string(),
            TokenSource::File(p) => std::fs::read_to_string(p)
                .map_err(|e| BootstrapError::Config(format!("join token file {}: {e}", p.display())))?
                .trim()
                .to_string(),
            TokenSource::Env(name) => std::env::var(name)
                .map_err(|e| BootstrapError::Config(format!("join token environment variable {name}: {e}")))?
                .trim()
                .to_string(),
        };
        if token.is_empty() {
            let from = match self {
                TokenSource::Value(_) => "the token value".to_string(),
                TokenSource::File(p) => format!("token file {}", p.display()),
                TokenSource::Env(n) => format!("environment variable {n}"),
            };
            return Err(BootstrapError::Config(format!("the join token is empty ({from})")));
        }
        Ok(token)
    }
}

/// The inputs of [`bootstrap`].
#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// The control plane's agent listener, `https://host:8443` (`bootstrap.cp_url`).
    pub cp_url: String,
    /// The join token.
    pub token: TokenSource,
    /// The pinned CA fingerprint, with or without `sha256:` and `:` separators
    /// (`bootstrap.ca_fingerprint`).
    pub ca_fingerprint: String,
    /// This node's name, 1..63 of `[a-z0-9-]` (`bootstrap.node_name`).
    pub node_name: String,
    /// Where the control plane reaches this agent's mTLS server, `host:port`
    /// (`bootstrap.advertised_endpoint`).
    pub advertised_endpoint: String,
    /// `amd64`/`arm64` (also `x86_64`/`aarch64`); `None` = this host's.
    pub architecture: Option<String>,
    /// Where `agent.key`, `agent.crt` and `ca.crt` go (`tls.cert_dir`).
    pub cert_dir: PathBuf,
    /// Join again even when cert material exists (overwrites it).
    pub force: bool,
    /// Limit for TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// Limit for each call (GetCa, Join).
    pub request_timeout: Duration,
}

impl BootstrapOptions {
    /// Options with the host's architecture, no force, and 10 s / 30 s timeouts.
    pub fn new(
        cp_url: impl Into<String>,
        token: TokenSource,
        ca_fingerprint: impl Into<String>,
        node_name: impl Into<String>,
        advertised_endpoint: impl Into<String>,
        cert_dir: impl Into<PathBuf>,
    ) -> Self {
        BootstrapOptions {
            cp_url: cp_url.into(),
            token,
            ca_fingerprint: ca_fingerprint.into(),
            node_name: node_name.into(),
            advertised_endpoint: advertised_endpoint.into(),
            architecture: None,
            cert_dir: cert_dir.into(),
            force: false,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The three files of the agent's cert material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterialPaths {
    /// `<cert_dir>/agent.crt`.
    pub cert: PathBuf,
    /// `<cert_dir>/agent.key`.
    pub key: PathBuf,
    /// `<cert_dir>/ca.crt`.
    pub ca: PathBuf,
}

impl MaterialPaths {
    /// The paths inside `cert_dir`.
    pub fn new(cert_dir: &Path) -> Self {
        MaterialPaths { cert: cert_dir.join(CERT_FILE), key: cert_dir.join(KEY_FILE), ca: cert_dir.join(CA_FILE) }
    }
}

/// The agent's identity: its certificate and key and the cluster CA, checked.
#[derive(Clone)]
pub struct Material {
    /// The agent certificate, PEM.
    pub cert_pem: String,
    /// The agent private key, PEM.
    pub key_pem: String,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
    /// The node the certificate names.
    pub node_name: String,
    /// When the certificate expires.
    pub not_after: SystemTime,
    /// Where the files are.
    pub paths: MaterialPaths,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("node_name", &self.node_name)
            .field("not_after", &self.not_after)
            .field("paths", &self.paths)
            .field("key_pem", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl Material {
    /// The rustls config of the agent's own mTLS server (`:9443`): presents the agent
    /// certificate and requires a client certificate from the cluster CA with the
    /// control-plane identity; any other client (another node included) fails the handshake.
    pub fn server_tls_config(&self) -> Result<rustls::ServerConfig, otherix_pki::PkiError> {
        otherix_pki::agent_server_config(&self.cert_pem, &self.key_pem, &self.ca_pem)
    }

    /// A rustls client config presenting the agent certificate and accepting only the
    /// control plane (cluster CA and control-plane identity; ALPN h2), for callers with their
    /// own connectors.
    pub fn client_tls_config(&self) -> Result<rustls::ClientConfig, otherix_pki::PkiError> {
        otherix_pki::client_config_mtls(&self.cert_pem, &self.key_pem, &self.ca_pem)
    }
}

/// Whether a peer certificate (DER; already verified against the cluster CA by the TLS
/// handshake) belongs to a control-plane replica: it carries the control-plane identity
/// ([`otherix_pki::CP_IDENTITY_URI`]) and names no node. The agent's server config already
/// refuses every other client in the handshake; this is the same check for callers that
/// look at a connection afterwards.
pub fn is_control_plane_peer(der: &[u8]) -> bool {
    otherix_pki::is_control_plane_cert_der(der)
}

/// What [`bootstrap`] did.
#[derive(Debug)]
pub enum BootstrapOutcome {
    /// Joined: the material is on disk. The caller logs `agent: bootstrap complete`.
    Bootstrapped {
        /// The node's id, as the control plane assigned it.
        node_id: String,
        /// The new material (already written).
        material: Material,
        /// The pinned CA fingerprint, `sha256:<hex>`.
        ca_fingerprint: String,
    },
    /// Cert and key already existed and `force` was off: nothing was done. The caller logs
    /// `agent: using existing cert material`.
    AlreadyBootstrapped {
        /// The existing files.
        paths: MaterialPaths,
    },
}

enum Existing {
    None,
    Both,
}

fn exists(p: &Path) -> Result<bool, BootstrapError> {
    p.try_exists().map_err(|source| BootstrapError::Io { path: p.to_path_buf(), source })
}

/// Whether cert and key exist; exactly one is [`BootstrapError::PartialState`].
fn existing(paths: &MaterialPaths) -> Result<Existing, BootstrapError> {
    let partial = |present_kind, present: &PathBuf, missing_kind, missing: &PathBuf| BootstrapError::PartialState {
        present_kind,
        present: present.clone(),
        missing_kind,
        missing: missing.clone(),
        ca: paths.ca.clone(),
    };
    match (exists(&paths.cert)?, exists(&paths.key)?) {
        (false, false) => Ok(Existing::None),
        (true, true) => Ok(Existing::Both),
        (true, false) => Err(partial("cert", &paths.cert, "key", &paths.key)),
        (false, true) => Err(partial("key", &paths.key, "cert", &paths.cert)),
    }
}

fn read(p: &Path) -> Result<String, BootstrapError> {
    std::fs::read_to_string(p).map_err(|source| BootstrapError::Io { path: p.to_path_buf(), source })
}

/// Loads the cert material for `serve`: `Ok(None)` when there is none (bootstrap first),
/// [`BootstrapError::PartialState`] when only one of cert and key exists, otherwise the
/// material after checking that the key matches the certificate, that the certificate
/// chains to `ca.crt` and is valid now, and that it names a node.
pub fn load_material(cert_dir: &Path) -> Result<Option<Material>, BootstrapError> {
    let paths = MaterialPaths::new(cert_dir);
    if let Existing::None = existing(&paths)? {
        return Ok(None);
    }
    let invalid = |reason: String| BootstrapError::InvalidMaterial { dir: cert_dir.to_path_buf(), reason };
    let cert_pem = read(&paths.cert)?;
    let key_pem = read(&paths.key)?;
    if !exists(&paths.ca)? {
        return Err(invalid(format!("{} is missing", paths.ca.display())));
    }
    let ca_pem = read(&paths.ca)?;
    match key_matches_cert(&cert_pem, &key_pem) {
        Ok(true) => {}
        Ok(false) => {
            return Err(invalid(format!("{} does not belong to {}", paths.key.display(), paths.cert.display())));
        }
        Err(e) => return Err(invalid(e.to_string())),
    }
    verify_chain(&cert_pem, &ca_pem)
        .map_err(|e| invalid(format!("{} against {}: {e}", paths.cert.display(), paths.ca.display())))?;
    let node_name =
        cert_identity(&cert_pem).ok_or_else(|| invalid(format!("{} names no node", paths.cert.display())))?;
    let not_after = cert_info(&cert_pem).map_err(|e| invalid(e.to_string()))?.not_after;
    Ok(Some(Material { cert_pem, key_pem, ca_pem, node_name, not_after, paths }))
}

fn encode_cert_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The single certificate of a CA PEM.
fn single_cert(pem: &str) -> Result<CertificateDer<'static>, String> {
    let mut certs = CertificateDer::pem_slice_iter(pem.as_bytes());
    let first = match certs.next() {
        Some(Ok(c)) => c,
        Some(Err(e)) => return Err(format!("the CA PEM does not decode: {e}")),
        None => return Err("the answer holds no CA certificate".into()),
    };
    if certs.next().is_some() {
        return Err("the answer holds more than one CA certificate".into());
    }
    Ok(first)
}

/// `Code: message`, plus the transport cause when the message does not already say it.
pub(crate) fn status_text(status: &tonic::Status) -> String {
    extend_chain(format!("{:?}: {}", status.code(), status.message()), std::error::Error::source(status))
}

/// Whether a status is the transport's (no answer from the service) rather than a refusal.
pub(crate) fn is_transport_status(status: &tonic::Status) -> bool {
    status.details().is_empty()
        && matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        )
}

async fn with_timeout<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, BootstrapError>>,
) -> Result<T, BootstrapError> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err(BootstrapError::Protocol(format!("{what}: no answer within {limit:?}"))))
}

/// Fetches the CA without verifying the server and checks it against the pinned fingerprint.
/// Returns the CA as PEM (re-encoded from the DER that was hashed).
async fn fetch_ca(cp: &CpUrl, pinned: &[u8; 32], opts: &BootstrapOptions) -> Result<String, BootstrapError> {
    let proto = |m: String| BootstrapError::Protocol(format!("fetch /v1/ca: {m}"));
    let resp = with_timeout(opts.connect_timeout + opts.request_timeout, "fetch /v1/ca", async {
        let channel = unverified_channel(cp, opts.connect_timeout)
            .await
            .map_err(|e| proto(format!("connect {cp}: {}", chain(&e))))?;
        EnrolmentServiceClient::new(channel)
            .get_ca(GetCaRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| proto(status_text(&s)))
    })
    .await?;
    let der = single_cert(&resp.ca_cert_pem).map_err(proto)?;
    let got = sha256(der.as_ref());
    if &got != pinned {
        return Err(BootstrapError::FingerprintMismatch {
            expected: format_fingerprint(pinned),
            got: format_fingerprint(&got),
        });
    }
    debug!(fingerprint = %format_fingerprint(&got), "bootstrap: CA fetched and matches the pinned fingerprint");
    Ok(encode_cert_pem(der.as_ref()))
}

/// Enrols this node: see the crate documentation for the steps. Existing material is
/// [`BootstrapOutcome::AlreadyBootstrapped`] (or [`BootstrapError::PartialState`]) unless
/// `force` is set.
pub async fn bootstrap(opts: &BootstrapOptions) -> Result<BootstrapOutcome, BootstrapError> {
    let paths = MaterialPaths::new(&opts.cert_dir);
    if !opts.force
        && let Existing::Both = existing(&paths)?
    {
        return Ok(BootstrapOutcome::AlreadyBootstrapped { paths });
    }
    let cp = parse_cp_url(&opts.cp_url)?;
    let pinned = parse_fingerprint(&opts.ca_fingerprint)
        .map_err(|e| BootstrapError::Config(format!("CA fingerprint {:?}: {e}", opts.ca_fingerprint)))?;
    let node_name = opts.node_name.trim().to_string();
    validate_node_name(&node_name).map_err(|e| BootstrapError::Config(e.to_string()))?;
    let architecture = match &opts.architecture {
        Some(a) => normalize_architecture(a)
            .ok_or_else(|| BootstrapError::Config(format!("architecture {a:?}: expected amd64 or arm64")))?,
        None => host_architecture()?,
    };
    let token = opts.token.resolve()?;
    let span = info_span!("bootstrap", node = %node_name, cp = %cp);
    async {
        let ca_pem = fetch_ca(&cp, &pinned, opts).await?;
        let (key_pem, csr_pem) = generate_agent_key_and_csr(&node_name)?;
        let resp = with_timeout(opts.connect_timeout + opts.request_timeout, "join", async {
            let channel = pinned_endpoint(&cp, &ca_pem, None, opts.connect_timeout)
                .map_err(|e| BootstrapError::Protocol(format!("join: {}", chain(&e))))?
                .connect()
                .await
                .map_err(|e| match identity_refusal(&e) {
                    Some(identity) => BootstrapError::NotControlPlane { cp: cp.to_string(), identity },
                    None => BootstrapError::Protocol(format!("join: connect {cp}: {}", chain(&e))),
                })?;
            let req = JoinRequest {
                token,
                csr_pem,
                node_name: node_name.clone(),
                architecture: architecture.to_string(),
                advertised_endpoint: opts.advertised_endpoint.trim().to_string(),
            };
            match EnrolmentServiceClient::new(channel).join(req).await {
                Ok(r) => Ok(r.into_inner()),
                Err(s) if is_transport_status(&s) => {
                    Err(BootstrapError::Protocol(format!("join: {}", status_text(&s))))
                }
                Err(s) => {
                    let e = ApiError::from_status(&s);
                    Err(BootstrapError::JoinRejected {
                        code: e.code,
                        http_status: e.code.http_status().as_u16(),
                        message: e.message,
                    })
                }
            }
        })
        .await?;

        let bad = BootstrapError::BadCertificate;
        verify_chain(&resp.cert_pem, &ca_pem).map_err(|e| bad(format!("it does not chain to the pinned CA: {e}")))?;
        match cert_identity(&resp.cert_pem) {
            Some(n) if n == node_name => {}
            Some(n) => return Err(bad(format!("it names node {n:?}, not {node_name:?}"))),
            None => return Err(bad("it names no node".into())),
        }
        if !key_matches_cert(&resp.cert_pem, &key_pem)? {
            return Err(bad("it does not carry the key this agent generated".into()));
        }
        if !resp.ca_cert_pem.trim().is_empty() {
            let der = single_cert(&resp.ca_cert_pem).map_err(|e| bad(format!("join answered with a bad CA: {e}")))?;
            if sha256(der.as_ref()) != pinned {
                return Err(bad(format!(
                    "join answered with another CA ({}) than the pinned one ({})",
                    format_fingerprint(&sha256(der.as_ref())),
                    format_fingerprint(&pinned)
                )));
            }
        }
        let not_after = cert_info(&resp.cert_pem)?.not_after;

        // The certificate goes last: once cert and key both exist, the material is complete.
        ensure_dir(&opts.cert_dir, CERT_DIR_MODE)?;
        write_file_atomic(&paths.ca, ca_pem.as_bytes(), CERT_MODE)?;
        write_file_atomic(&paths.key, key_pem.as_bytes(), KEY_MODE)?;
        write_file_atomic(&paths.cert, resp.cert_pem.as_bytes(), CERT_MODE)?;
        debug!(node_id = %resp.node_id, dir = %opts.cert_dir.display(), "bootstrap: cert material written");
        Ok(BootstrapOutcome::Bootstrapped {
            node_id: resp.node_id,
            material: Material { cert_pem: resp.cert_pem, key_pem, ca_pem, node_name, not_after, paths },
            ca_fingerprint: format_fingerprint(&pinned),
        })
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_sources() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "  otx_join_abc\n").unwrap();
        assert_eq!(TokenSource::File(f.clone()).resolve().unwrap(), "otx_join_abc");
        assert_eq!(TokenSource::Value(" otx_join_v ".into()).resolve().unwrap(), "otx_join_v");
        std::fs::write(&f, "\n").unwrap();
        assert!(TokenSource::File(f).resolve().unwrap_err().to_string().contains("empty"));
        let missing = TokenSource::File(dir.path().join("nope")).resolve().unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
        let unset = TokenSource::Env("OTHERIX_TEST_SURELY_UNSET_TOKEN_VAR".into()).resolve().unwrap_err();
        assert!(unset.to_string().contains("OTHERIX_TEST_SURELY_UNSET_TOKEN_VAR"), "{unset}");
        assert_eq!(format!("{:?}", TokenSource::Value("secret".into())), "Value([redacted])");
    }

    #[test]
    fn control_plane_peers() {
        let ca = otherix_pki::ClusterCa::generate().unwrap();
        let cp = ca.issue_server_cert(&["localhost".into()], Duration::from_secs(60)).unwrap();
        let der = |pem: &str| single_cert(pem).unwrap();
        assert!(is_control_plane_peer(der(&cp.cert_pem).as_ref()));
        let (key, csr) = generate_agent_key_and_csr("worker-1").unwrap();
        let agent = ca.sign_agent_csr(&csr, "worker-1", Duration::from_secs(60)).unwrap();
        assert!(!is_control_plane_peer(der(&agent.cert_pem).as_ref()));
        assert!(!is_control_plane_peer(ca.cert_der().as_ref()));
        assert!(!is_control_plane_peer(b"junk"));
        let m = Material {
            cert_pem: agent.cert_pem,
            key_pem: key,
            ca_pem: ca.cert_pem().to_string(),
            node_name: "worker-1".into(),
            not_after: SystemTime::now(),
            paths: MaterialPaths::new(Path::new("/nonexistent")),
        };
        assert!(m.server_tls_config().is_ok());
        assert!(m.client_tls_config().is_ok());
        assert!(!format!("{m:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn pem_round_trip() {
        let ca = otherix_pki::ClusterCa::generate().unwrap();
        let der = single_cert(ca.cert_pem()).unwrap();
        assert_eq!(encode_cert_pem(der.as_ref()).trim(), ca.cert_pem().trim());
        assert!(single_cert("").is_err());
        assert!(single_cert(&format!("{}{}", ca.cert_pem(), ca.cert_pem())).is_err());
    }

    #[test]
    fn fingerprint_forms_are_accepted() {
        // Bootstrap accepts what parse_fingerprint accepts: with or without prefix and colons.
        let d = sha256(b"ca");
        let hex = otherix_pki::to_hex(&d);
        let colons = d.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
        for f in [format!("sha256:{hex}"), hex.clone(), colons.clone(), format!("sha256:{colons}")] {
            assert_eq!(parse_fingerprint(&f).unwrap(), d, "{f}");
        }
    }

    #[test]
    fn partial_state_message() {
        let dir = tempfile::tempdir().unwrap();
        let paths = MaterialPaths::new(dir.path());
        assert!(matches!(existing(&paths), Ok(Existing::None)));
        std::fs::write(&paths.cert, "x").unwrap();
        let msg = existing(&paths).err().unwrap().to_string();
        assert!(msg.starts_with("partial bootstrap state: cert "), "{msg}");
        assert!(msg.contains(&format!("exists but key {} missing", paths.key.display())), "{msg}");
        assert!(msg.contains("mint a fresh join token"), "{msg}");
        std::fs::remove_file(&paths.cert).unwrap();
        std::fs::write(&paths.key, "x").unwrap();
        let msg = existing(&paths).err().unwrap().to_string();
        assert!(msg.contains(&format!("key {} exists but cert {} missing", paths.key.display(), paths.cert.display())));
    }

    #[test]
    fn rejection_display() {
        let e = BootstrapError::JoinRejected {
            code: otherix_errors::ErrorCode::TokenExpired,
            http_status: 401,
            message: String::new(),
        };
        assert_eq!(e.to_string(), "bootstrap protocol: CSR submission rejected by CP: HTTP 401 token_expired");
        assert_eq!(e.rejection_code(), Some(otherix_errors::ErrorCode::TokenExpired));
    }
}

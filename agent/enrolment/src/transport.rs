//! The control-plane URL, the host architecture, and the TLS channels to the agent listener.

use std::sync::Arc;
use std::time::Duration;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::BootstrapError;

/// The control plane's agent listener, parsed from `bootstrap.cp_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpUrl {
    /// `https://<host>:<port>` (IPv6 hosts in brackets), what channels connect to.
    pub uri: String,
    /// The host as the server certificate must name it (no brackets): used for SNI and
    /// verification.
    pub host: String,
    /// The port (443 when the URL names none).
    pub port: u16,
}

impl std::fmt::Display for CpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri)
    }
}

/// Parses the control plane URL: `https://host[:port]` with no path (a trailing `/` is
/// fine), query, fragment or credentials.
pub fn parse_cp_url(s: &str) -> Result<CpUrl, BootstrapError> {
    let bad = |why: &str| BootstrapError::Config(format!("control plane URL {s:?}: {why}"));
    let t = s.trim();
    if t.is_empty() {
        return Err(bad("empty"));
    }
    if !t.contains("://") {
        return Err(bad("expected https://<host>:<port>"));
    }
    let u = url::Url::parse(t).map_err(|e| bad(&e.to_string()))?;
    if u.scheme() != "https" {
        return Err(bad("the agent listener speaks TLS only; use https://"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(bad("credentials in the URL are not accepted"));
    }
    if u.path() != "/" && !u.path().is_empty() {
        return Err(bad("no path expected"));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(bad("no query or fragment expected"));
    }
    let (host, uri_host) = match u.host() {
        Some(url::Host::Domain(d)) => (d.to_string(), d.to_string()),
        Some(url::Host::Ipv4(ip)) => (ip.to_string(), ip.to_string()),
        Some(url::Host::Ipv6(ip)) => (ip.to_string(), format!("[{ip}]")),
        None => return Err(bad("no host")),
    };
    let port = u.port_or_known_default().unwrap_or(443);
    Ok(CpUrl { uri: format!("https://{uri_host}:{port}"), host, port })
}

/// Normalises an architecture name to the API's `amd64`/`arm64`.
pub fn normalize_architecture(s: &str) -> Option<&'static str> {
    match s.trim().to_ascii_lowercase().as_str() {
        "amd64" | "x86_64" | "x86-64" | "x64" => Some("amd64"),
        "arm64" | "aarch64" => Some("arm64"),
        _ => None,
    }
}

/// The architecture of this host as the API names it (`x86_64` -> `amd64`,
/// `aarch64` -> `arm64`).
pub fn host_architecture() -> Result<&'static str, BootstrapError> {
    normalize_architecture(std::env::consts::ARCH)
        .ok_or_else(|| BootstrapError::Config(format!("unsupported host architecture {:?}", std::env::consts::ARCH)))
}

/// Accepts any server certificate. Used for exactly one call, `GetCa`, whose answer is then
/// checked against the pinned fingerprint; handshake signatures are still verified, so the
/// peer proves it holds the key of the certificate it shows.
#[derive(Debug)]
pub(crate) struct AcceptAnyServerCert {
    provider: Arc<CryptoProvider>,
}

impl AcceptAnyServerCert {
    pub(crate) fn new() -> Self {
        AcceptAnyServerCert { provider: otherix_pki::ring_provider() }
    }
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn endpoint(cp: &CpUrl, connect_timeout: Duration) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(cp.uri.clone())?.connect_timeout(connect_timeout).tcp_nodelay(true))
}

/// A TLS channel that does not verify the server: for `GetCa` only.
pub(crate) async fn unverified_channel(
    cp: &CpUrl,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new().domain_name(cp.host.clone()).timeout(connect_timeout);
    endpoint(cp, connect_timeout)?.tls_config_with_verifier(tls, Arc::new(AcceptAnyServerCert::new()))?.connect().await
}

/// Why a pinned endpoint could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EndpointError {
    /// The CA PEM does not load.
    #[error("the cluster CA")]
    Ca(#[source] otherix_pki::PkiError),
    /// tonic refused the URL or TLS settings.
    #[error("the channel")]
    Channel(#[source] tonic::transport::Error),
}

/// An endpoint that accepts as server only the control plane: a certificate from `ca_pem`
/// with the control-plane identity (host name not checked, see
/// [`otherix_pki::control_plane_verifier`]); when `identity` is given, it presents that
/// client certificate.
pub(crate) fn pinned_endpoint(
    cp: &CpUrl,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    connect_timeout: Duration,
) -> Result<Endpoint, EndpointError> {
    let verifier = otherix_pki::control_plane_verifier(ca_pem).map_err(EndpointError::Ca)?;
    let mut tls = ClientTlsConfig::new().domain_name(cp.host.clone()).timeout(connect_timeout);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    endpoint(cp, connect_timeout)
        .and_then(|e| e.tls_config_with_verifier(tls, verifier))
        .map_err(EndpointError::Channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cp_url_forms() {
        let u = parse_cp_url("https://cp.example:8443").unwrap();
        assert_eq!(u, CpUrl { uri: "https://cp.example:8443".into(), host: "cp.example".into(), port: 8443 });
        let u = parse_cp_url(" https://127.0.0.1:8443/ \n").unwrap();
        assert_eq!((u.uri.as_str(), u.host.as_str(), u.port), ("https://127.0.0.1:8443", "127.0.0.1", 8443));
        let u = parse_cp_url("https://[::1]:9000").unwrap();
        assert_eq!((u.uri.as_str(), u.host.as_str()), ("https://[::1]:9000", "::1"));
        let u = parse_cp_url("HTTPS://CP.Example").unwrap();
        assert_eq!((u.uri.as_str(), u.port), ("https://cp.example:443", 443));
        assert_eq!(u.to_string(), "https://cp.example:443");
    }

    #[test]
    fn cp_url_refusals() {
        for bad in [
            "",
            "cp.example:8443",
            "http://cp.example:8443",
            "https://cp.example:8443/v1",
            "https://cp.example:8443?x=1",
            "https://cp.example:8443#f",
            "https://user:pw@cp.example:8443",
            "https://:8443",
            "https://cp.example:99999",
        ] {
            let err = parse_cp_url(bad).unwrap_err();
            assert!(matches!(err, BootstrapError::Config(_)), "{bad}: {err}");
            assert!(err.to_string().contains("control plane URL"), "{err}");
        }
    }

    #[test]
    fn architectures() {
        assert_eq!(normalize_architecture("x86_64"), Some("amd64"));
        assert_eq!(normalize_architecture("AMD64"), Some("amd64"));
        assert_eq!(normalize_architecture("aarch64"), Some("arm64"));
        assert_eq!(normalize_architecture("arm64"), Some("arm64"));
        assert_eq!(normalize_architecture("riscv64"), None);
        assert_eq!(normalize_architecture(""), None);
        let host = host_architecture().unwrap();
        assert!(host == "amd64" || host == "arm64");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(host, "amd64");
    }
}

//! rustls server and client configurations for the agent plane's mutual TLS (ring provider).
//!
//! Who may talk to whom is decided by certificate identity, never by host name:
//! - an agent accepts as the control plane (as server on `:8443`, as client on its `:9443`)
//!   only a certificate that chains to the cluster CA and carries the control-plane identity
//!   ([`crate::CP_IDENTITY_URI`]), which only replicas issue to themselves;
//! - the control plane's agent listener accepts as client only node certificates;
//! - the control plane dials an agent and accepts its certificate only when it names the
//!   node it meant to reach. Node certificates carry clientAuth only, so no ordinary TLS
//!   client takes one for a server either.

use std::fmt;
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, ClientConfig, DistinguishedName, OtherError, RootCertStore, ServerConfig};

use crate::error::{IdentityError, PkiError};
use crate::pem::{certs_from_pem, key_from_pem, parse_x509};
use crate::verify::{cert_identity_der, is_control_plane};

/// The ring crypto provider every config here is built with.
pub fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_identity(
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
    let chain = certs_from_pem(cert_pem).map_err(PkiError::Pem)?;
    let key = key_from_pem(key_pem).map_err(PkiError::Key)?;
    Ok((chain, key))
}

fn root_store(ca_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    for der in certs_from_pem(ca_pem).map_err(PkiError::Pem)? {
        roots.add(der)?;
    }
    Ok(Arc::new(roots))
}

/// Which identity a peer must have.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// A control-plane replica.
    ControlPlane,
    /// Any node.
    Node,
    /// This node.
    NodeNamed(String),
}

/// What a certificate is, for refusal messages.
fn describe(der: &[u8]) -> String {
    let Ok(cert) = parse_x509(der) else { return "an unparseable certificate".into() };
    if is_control_plane(&cert) {
        return "a control-plane certificate".into();
    }
    if let Some(node) = cert_identity_der(der) {
        return format!("the certificate of node {node:?}");
    }
    format!("a certificate for {:?} without a node or control-plane identity", cert.subject().to_string())
}

/// Checks the peer's identity (not its chain: the caller does that too).
fn check_identity(der: &[u8], want: &Want) -> Result<(), rustls::Error> {
    let refuse = |e: IdentityError| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))));
    match want {
        Want::ControlPlane => {
            let ok = parse_x509(der).is_ok_and(|c| is_control_plane(&c));
            if !ok {
                return Err(refuse(IdentityError::NotControlPlane { found: describe(der) }));
            }
        }
        Want::Node => {
            if cert_identity_der(der).is_none() {
                return Err(refuse(IdentityError::NotNode { found: describe(der) }));
            }
        }
        Want::NodeNamed(expected) => match cert_identity_der(der) {
            Some(n) if n == *expected => {}
            Some(n) => return Err(refuse(IdentityError::WrongNode { expected: expected.clone(), found: n })),
            None => return Err(refuse(IdentityError::NotNode { found: describe(der) })),
        },
    }
    Ok(())
}

/// Verifies a server as the control plane: chain to the cluster CA with the serverAuth purpose
/// and the control-plane identity. The host name the client dialled is not checked: the
/// identity is what matters, and a node certificate can name no host a client would dial.
struct ControlPlaneServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for ControlPlaneServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlaneServerVerifier").finish_non_exhaustive()
    }
}

impl ServerCertVerifier for ControlPlaneServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Identity first, so that a node certificate is refused for what it is.
        check_identity(end_entity.as_ref(), &Want::ControlPlane)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
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

/// Verifies an agent's server certificate when the control plane dials it: chain to the
/// cluster CA with the clientAuth purpose (node certificates carry no other) and the name of
/// the node that was meant, whatever address was dialled.
struct NodeServerVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    node: String,
}

impl fmt::Debug for NodeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeServerVerifier").field("node", &self.node).finish_non_exhaustive()
    }
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check_identity(end_entity.as_ref(), &Want::NodeNamed(self.node.clone()))?;
        self.chain.verify_client_cert(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// A client-certificate verifier (chain to the cluster CA, clientAuth) that also requires an
/// identity.
struct IdentityClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    want: Want,
}

impl fmt::Debug for IdentityClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityClientVerifier").field("want", &self.want).finish_non_exhaustive()
    }
}

impl ClientCertVerifier for IdentityClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_identity(end_entity.as_ref(), &self.want)?;
        self.inner.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn client_verifier(ca_pem: &str, required: bool, want: Want) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
    let builder = WebPkiClientVerifier::builder_with_provider(root_store(ca_pem)?, ring_provider());
    let inner = if required { builder.build()? } else { builder.allow_unauthenticated().build()? };
    Ok(Arc::new(IdentityClientVerifier { inner, want }))
}

fn server_config(
    cert_pem: &str,
    key_pem: &str,
    verifier: Arc<dyn ClientCertVerifier>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, PkiError> {
    let (chain, key) = load_identity(cert_pem, key_pem)?;
    let mut cfg = ServerConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// The control plane's agent listener: presents `cert_pem`/`key_pem` and accepts as client
/// only node certificates from `ca_pem` (required when `client_auth_required`, else optional
/// but verified when sent). ALPN: `h2`, then `http/1.1` for plain REST clients.
pub fn server_config_mtls(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    client_auth_required: bool,
) -> Result<ServerConfig, PkiError> {
    server_config(cert_pem, key_pem, client_verifier(ca_pem, client_auth_required, Want::Node)?, &[b"h2", b"http/1.1"])
}

/// An agent's own mTLS listener: presents the agent's certificate and requires a client
/// certificate from `ca_pem` with the control-plane identity; ALPN `h2`.
pub fn agent_server_config(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<ServerConfig, PkiError> {
    server_config(cert_pem, key_pem, client_verifier(ca_pem, true, Want::ControlPlane)?, &[b"h2"])
}

/// The verifier agents use for the control plane (join and heartbeat, also through tonic's
/// `tls_config_with_verifier`): chain to `ca_pem`, serverAuth, the control-plane identity;
/// the host name is not checked.
pub fn control_plane_verifier(ca_pem: &str) -> Result<Arc<dyn ServerCertVerifier>, PkiError> {
    Ok(Arc::new(ControlPlaneServerVerifier { roots: root_store(ca_pem)?, provider: ring_provider() }))
}

/// The verifier the control plane uses when it dials the agent of `node_name`: chain to
/// `ca_pem` and a node certificate naming exactly that node; the address is not checked.
pub fn node_server_verifier(ca_pem: &str, node_name: &str) -> Result<Arc<dyn ServerCertVerifier>, PkiError> {
    let chain = WebPkiClientVerifier::builder_with_provider(root_store(ca_pem)?, ring_provider()).build()?;
    Ok(Arc::new(NodeServerVerifier { chain, node: node_name.to_string() }))
}

fn client_config(
    cert_pem: &str,
    key_pem: &str,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<ClientConfig, PkiError> {
    let (chain, key) = load_identity(cert_pem, key_pem)?;
    let mut cfg = ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// An agent's client config to the control plane: presents `cert_pem`/`key_pem` and accepts
/// only a server with the control-plane identity from `ca_pem` ([`control_plane_verifier`]);
/// ALPN `h2`.
pub fn client_config_mtls(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<ClientConfig, PkiError> {
    client_config(cert_pem, key_pem, control_plane_verifier(ca_pem)?)
}

/// The control plane's client config to the agent of `node_name`: presents the replica
/// certificate and accepts only that node's certificate ([`node_server_verifier`]); ALPN `h2`.
pub fn client_config_to_agent(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    node_name: &str,
) -> Result<ClientConfig, PkiError> {
    client_config(cert_pem, key_pem, node_server_verifier(ca_pem, node_name)?)
}

/// The node name in a verified peer's leaf certificate (from rustls `peer_certificates()`).
pub fn peer_identity(peer_certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    cert_identity_der(peer_certs?.first()?.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterCa, IssuedCert, generate_agent_key_and_csr};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const HOUR: Duration = Duration::from_secs(3600);

    fn cp_cert(ca: &ClusterCa) -> IssuedCert {
        ca.issue_server_cert(&["localhost".into(), "127.0.0.1".into()], HOUR).unwrap()
    }

    fn agent(ca: &ClusterCa, name: &str) -> (String, String) {
        let (key, csr) = generate_agent_key_and_csr(name).unwrap();
        (ca.sign_agent_csr(&csr, name, HOUR).unwrap().cert_pem, key)
    }

    /// A node certificate as the code before the control-plane identity issued them: server
    /// and client auth, the node's SAN plus `localhost` and a wildcard from the advertised
    /// endpoint.
    fn old_style_node_cert(ca: &ClusterCa, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let now = crate::ca::now_utc();
        let spec = crate::ca::LeafSpec {
            common_name: crate::agent_common_name(name),
            sans: [&crate::agent_dns_name(name), "localhost", "*.agents.otherix.local", "127.0.0.1"]
                .iter()
                .map(|s| crate::names::San::parse(s).unwrap())
                .collect(),
            server_auth: true,
            not_before: now - time::Duration::minutes(5),
            not_after: now + time::Duration::hours(1),
        };
        (ca.issue_leaf(&key, &spec).unwrap().cert_pem, key.serialize_pem())
    }

    fn no_cert_client(ca: &ClusterCa) -> ClientConfig {
        let mut client = ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(control_plane_verifier(ca.cert_pem()).unwrap())
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        client
    }

    /// The two sides of one handshake plus a ping/pong: the server's view (peer node
    /// identity, or its error) and the client's (`Ok` once the pong came back, or its error).
    struct Outcome {
        server: Result<Option<String>, String>,
        client: Result<(), String>,
    }

    async fn handshake(server: ServerConfig, client: ClientConfig) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let (_, conn) = tls.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
            let id = peer_identity(conn.peer_certificates());
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.ok();
            Ok::<_, String>(id)
        });
        let connector = TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(addr).await.unwrap();
        // A name no certificate here carries: identity, not host name, decides.
        let name = rustls::pki_types::ServerName::try_from("cp.unrelated.example").unwrap();
        let client = async {
            // With TLS 1.3 the client may finish its side before the server rejects its
            // certificate, so success is judged by getting the reply.
            let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            if &buf == b"pong" { Ok(()) } else { Err("no pong".to_string()) }
        }
        .await;
        let server =
            tokio::time::timeout(Duration::from_secs(10), server_task).await.expect("server task hung").unwrap();
        Outcome { server, client }
    }

    #[tokio::test]
    async fn control_plane_listener_accepts_nodes_only() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        let cp = cp_cert(&ca);
        let server = || server_config_mtls(&cp.cert_pem, &cp.key_pem, ca.cert_pem(), true).unwrap();

        // (a) Agent cert from the cluster CA: accepted, the server sees the node name.
        let (cert, key) = agent(&ca, "worker-1");
        let client = client_config_mtls(&cert, &key, ca.cert_pem()).unwrap();
        let o = handshake(server(), client).await;
        assert_eq!(o.server, Ok(Some("worker-1".to_string())));
        assert_eq!(o.client, Ok(()));

        // (b) Agent cert from another CA (same CA name): refused by the server.
        let (cert, key) = agent(&other, "worker-1");
        let client = client_config_mtls(&cert, &key, ca.cert_pem()).unwrap();
        let o = handshake(server(), client).await;
        let err = o.server.unwrap_err();
        assert!(err.contains("invalid peer certificate"), "{err}");
        assert!(o.client.is_err());

        // (c) No client cert: refused by the server.
        let o = handshake(server(), no_cert_client(&ca)).await;
        let err = o.server.unwrap_err();
        assert!(err.contains("no certificates"), "{err}");
        assert!(o.client.is_err());

        // (d) A replica certificate as client: not a node, refused.
        let client = client_config_to_agent(&cp.cert_pem, &cp.key_pem, ca.cert_pem(), "x").unwrap();
        let mut client = client;
        client.dangerous().set_certificate_verifier(control_plane_verifier(ca.cert_pem()).unwrap());
        let o = handshake(server(), client).await;
        let err = o.server.unwrap_err();
        assert!(err.contains("not a node: a control-plane certificate"), "{err}");
        assert!(o.client.is_err());

        // Optional client auth (join endpoints): no cert is fine, identity is None.
        let optional = server_config_mtls(&cp.cert_pem, &cp.key_pem, ca.cert_pem(), false).unwrap();
        let o = handshake(optional, no_cert_client(&ca)).await;
        assert_eq!(o.server, Ok(None));
        assert_eq!(o.client, Ok(()));

        // Optional client auth still refuses a cert from another CA.
        let optional = server_config_mtls(&cp.cert_pem, &cp.key_pem, ca.cert_pem(), false).unwrap();
        let (cert, key) = agent(&other, "worker-2");
        let client = client_config_mtls(&cert, &key, ca.cert_pem()).unwrap();
        let o = handshake(optional, client).await;
        assert!(o.server.is_err(), "{:?}", o.server);
        assert!(o.client.is_err());

        // A client that trusts another CA refuses the server.
        let (cert, key) = agent(&other, "worker-3");
        let client = client_config_mtls(&cert, &key, other.cert_pem()).unwrap();
        let o = handshake(server(), client).await;
        assert!(o.server.is_err(), "{:?}", o.server);
        let err = o.client.unwrap_err();
        assert!(err.contains("invalid peer certificate"), "{err}");
    }

    /// A fake control plane serving a node certificate (new or old style, `localhost` and a
    /// wildcard in it) is refused by an agent's client for its identity; the real replica
    /// certificate is accepted under a host name it does not carry.
    #[tokio::test]
    async fn agents_refuse_node_certificates_as_control_plane() {
        let ca = ClusterCa::generate().unwrap();
        let (victim_cert, victim_key) = agent(&ca, "victim");
        let victim = || client_config_mtls(&victim_cert, &victim_key, ca.cert_pem()).unwrap();

        for (what, (cert, key)) in [("new", agent(&ca, "impostor")), ("old", old_style_node_cert(&ca, "impostor"))] {
            let fake = server_config_mtls(&cert, &key, ca.cert_pem(), false).unwrap();
            let o = handshake(fake, victim()).await;
            let err = o.client.unwrap_err();
            assert!(err.contains("invalid peer certificate"), "{what}: {err}");
            assert!(err.contains("not the control plane: the certificate of node \"impostor\""), "{what}: {err}");
            // The handshake was attempted and failed on the client, so nothing was sent.
            assert!(o.server.is_err(), "{what}: {:?}", o.server);
        }

        // A replica certificate from before the identity existed: refused until reissued.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let now = crate::ca::now_utc();
        let spec = crate::ca::LeafSpec {
            common_name: crate::CP_COMMON_NAME.into(),
            sans: vec![crate::names::San::parse("localhost").unwrap()],
            server_auth: true,
            not_before: now - time::Duration::minutes(5),
            not_after: now + time::Duration::hours(1),
        };
        let legacy = ca.issue_leaf(&key, &spec).unwrap().cert_pem;
        let fake = server_config_mtls(&legacy, &key.serialize_pem(), ca.cert_pem(), true).unwrap();
        let err = handshake(fake, victim()).await.client.unwrap_err();
        assert!(
            err.contains(
                "not the control plane: a certificate for \"CN=otherix-cp-replica\" without a node or control-plane identity"
            ),
            "{err}"
        );

        let cp = cp_cert(&ca);
        let real = server_config_mtls(&cp.cert_pem, &cp.key_pem, ca.cert_pem(), true).unwrap();
        let o = handshake(real, victim()).await;
        assert_eq!(o.client, Ok(()));
        assert_eq!(o.server, Ok(Some("victim".into())));
    }

    /// An agent's own listener accepts the control plane only; the control plane's client
    /// accepts only the node it meant.
    #[tokio::test]
    async fn agent_listener_accepts_the_control_plane_only() {
        let ca = ClusterCa::generate().unwrap();
        let rogue = ClusterCa::generate().unwrap();
        let (node_cert, node_key) = agent(&ca, "worker-1");
        let listener = || agent_server_config(&node_cert, &node_key, ca.cert_pem()).unwrap();
        let cp = cp_cert(&ca);

        let o = handshake(
            listener(),
            client_config_to_agent(&cp.cert_pem, &cp.key_pem, ca.cert_pem(), "worker-1").unwrap(),
        )
        .await;
        assert_eq!(o.client, Ok(()));
        assert_eq!(o.server, Ok(None));

        // The control plane dialling worker-2's address but reaching worker-1: refused.
        let o = handshake(
            listener(),
            client_config_to_agent(&cp.cert_pem, &cp.key_pem, ca.cert_pem(), "worker-2").unwrap(),
        )
        .await;
        let err = o.client.unwrap_err();
        assert!(err.contains("names node \"worker-1\", not \"worker-2\""), "{err}");

        // Another node (new or old style) as client: refused for its identity.
        for (cert, key) in [agent(&ca, "worker-2"), old_style_node_cert(&ca, "worker-2")] {
            let mut client = client_config_mtls(&cert, &key, ca.cert_pem()).unwrap();
            client.dangerous().set_certificate_verifier(node_server_verifier(ca.cert_pem(), "worker-1").unwrap());
            let o = handshake(listener(), client).await;
            let err = o.server.unwrap_err();
            assert!(err.contains("not the control plane: the certificate of node \"worker-2\""), "{err}");
            assert!(o.client.is_err());
        }

        // A replica certificate from another CA: refused by the chain check.
        let fake = rogue.issue_server_cert(&["localhost".into()], HOUR).unwrap();
        let client = client_config_to_agent(&fake.cert_pem, &fake.key_pem, ca.cert_pem(), "worker-1").unwrap();
        let o = handshake(listener(), client).await;
        let err = o.server.unwrap_err();
        assert!(err.contains("invalid peer certificate") && !err.contains("not the control plane"), "{err}");
    }

    #[test]
    fn config_builders_refuse_bad_input() {
        let ca = ClusterCa::generate().unwrap();
        let cp = cp_cert(&ca);
        assert!(server_config_mtls("junk", &cp.key_pem, ca.cert_pem(), true).is_err());
        assert!(server_config_mtls(&cp.cert_pem, "junk", ca.cert_pem(), true).is_err());
        assert!(server_config_mtls(&cp.cert_pem, &cp.key_pem, "junk", true).is_err());
        let other = cp_cert(&ca);
        assert!(server_config_mtls(&cp.cert_pem, &other.key_pem, ca.cert_pem(), true).is_err());
        assert!(client_config_mtls(&cp.cert_pem, &cp.key_pem, "").is_err());
        assert!(agent_server_config(&cp.cert_pem, &cp.key_pem, "junk").is_err());
        assert!(control_plane_verifier("").is_err());
        assert!(node_server_verifier("junk", "n").is_err());
        assert_eq!(peer_identity(None), None);
        assert_eq!(peer_identity(Some(&[])), None);
    }
}

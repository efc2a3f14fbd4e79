//! rustls server and client configurations for the agent plane's mutual TLS (ring provider).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::error::PkiError;
use crate::pem::{certs_from_pem, key_from_pem};
use crate::verify::cert_identity_der;

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

/// A server config presenting `cert_pem`/`key_pem` and verifying client certs against
/// `ca_pem`; client certs are required when `client_auth_required`, else optional (but
/// verified when sent). ALPN: `h2`, then `http/1.1` for plain REST clients.
pub fn server_config_mtls(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    client_auth_required: bool,
) -> Result<ServerConfig, PkiError> {
    let provider = ring_provider();
    let (chain, key) = load_identity(cert_pem, key_pem)?;
    let builder = WebPkiClientVerifier::builder_with_provider(root_store(ca_pem)?, provider.clone());
    let verifier = if client_auth_required { builder.build()? } else { builder.allow_unauthenticated().build()? };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A client config presenting `cert_pem`/`key_pem` and trusting only `ca_pem`; ALPN `h2`.
pub fn client_config_mtls(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<ClientConfig, PkiError> {
    let (chain, key) = load_identity(cert_pem, key_pem)?;
    let mut cfg = ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(ca_pem)?)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
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
        (ca.sign_agent_csr(&csr, name, &[], HOUR).unwrap().cert_pem, key)
    }

    /// Runs one handshake; returns the server's view (identity or error) and whether the
    /// client got the server's reply.
    async fn handshake(server: ServerConfig, client: ClientConfig) -> (Result<Option<String>, String>, bool) {
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
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let client_ok = async {
            // With TLS 1.3 the client may finish its side before the server rejects its
            // certificate, so success is judged by getting the reply.
            let mut tls = connector.connect(name, tcp).await.ok()?;
            tls.write_all(b"ping").await.ok()?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.ok()?;
            (&buf == b"pong").then_some(())
        }
        .await
        .is_some();
        let server_view =
            tokio::time::timeout(Duration::from_secs(10), server_task).await.expect("server task hung").unwrap();
        (server_view, client_ok)
    }

    #[tokio::test]
    async fn mtls_handshakes() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        let cp = cp_cert(&ca);
        let server = || server_config_mtls(&cp.cert_pem, &cp.key_pem, ca.cert_pem(), true).unwrap();

        // (a) Agent cert from the cluster CA: accepted, the server sees the node name.
        let (cert, key) = agent(&ca, "worker-1");
        let client = client_config_mtls(&cert, &key, ca.cert_pem()).unwrap();
        let (view, ok) = handshake(server(), client).await;
        assert_eq!(view, Ok(Some("worker-1".to_string())));
        assert!(ok);

        // (b) Agent cert from another CA (same CA name): refused by the server.
        let (cert, key) = agent(&other, "worker-1");
        let client = client_config_mtls(&cert, &key, ca.cert_pem()).unwrap();
        let (view, ok) = handshake(server(), client).await;
        let err = view.unwrap_err();
        assert!(err.contains("invalid peer certificate"), "{err}");
        assert!(!ok);

        // (c) No client cert: refused by the server.
        let client = ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(root_store(ca.cert_pem()).unwrap())
            .with_no_client_auth();
        let mut client = client;
        client.alpn_protocols = vec![b"h2".to_vec()];
        let (view, ok) = handshake(server(), client.clone()).await;
        let err = view.unwrap_err();
        assert!(err.contains("no certificates"), "{err}");
        assert!(!ok);

        // Optional client auth (join endpoints): no cert is fine, identity is None.
        let optional = server_config_mtls(&cp.cert_pem, &cp.key_pem, ca.cert_pem(), false).unwrap();
        let (view, ok) = handshake(optional, client).await;
        assert_eq!(view, Ok(None));
        assert!(ok);

        // Optional client auth still refuses a cert from another CA.
        let optional = server_config_mtls(&cp.cert_pem, &cp.key_pem, ca.cert_pem(), false).unwrap();
        let (cert, key) = agent(&other, "worker-2");
        let client = client_config_mtls(&cert, &key, ca.cert_pem()).unwrap();
        let (view, ok) = handshake(optional, client).await;
        assert!(view.is_err(), "{view:?}");
        assert!(!ok);

        // A client that trusts another CA refuses the server.
        let (cert, key) = agent(&other, "worker-3");
        let client = client_config_mtls(&cert, &key, other.cert_pem()).unwrap();
        let (view, ok) = handshake(server(), client).await;
        assert!(view.is_err(), "{view:?}");
        assert!(!ok);
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
        assert_eq!(peer_identity(None), None);
        assert_eq!(peer_identity(Some(&[])), None);
    }
}

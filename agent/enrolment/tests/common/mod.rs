//! A minimal control-plane agent listener for protocol tests: GetCa, Join and Heartbeat over
//! TLS (client certs optional at the handshake, required by Heartbeat), on its own runtime
//! so that stopping it closes every connection like a killed process would.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use otherix_errors::{ApiError, ErrorCode};
use otherix_pki::ClusterCa;
use otherix_proto::otherix::agent::v1::enrolment_service_server::{EnrolmentService, EnrolmentServiceServer};
use otherix_proto::otherix::agent::v1::heartbeat_service_server::{HeartbeatService, HeartbeatServiceServer};
use otherix_proto::otherix::agent::v1::{
    DeclaredPool, GetCaRequest, GetCaResponse, HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// What the test server does and what it saw.
#[derive(Default)]
pub struct State {
    /// Join answers with this error when set.
    pub join_refusal: Mutex<Option<ApiError>>,
    /// Join signs the certificate for this name instead of the requested one when set.
    pub join_cert_name: Mutex<Option<String>>,
    /// Successful joins.
    pub joins: AtomicUsize,
    /// Join requests seen: (node_name, architecture, advertised_endpoint, token).
    pub join_requests: Mutex<Vec<(String, String, String, String)>>,
    /// Heartbeat reports: (identity from the client cert, report).
    pub reports: Mutex<Vec<(String, HeartbeatRequest)>>,
    /// Heartbeat streams opened.
    pub streams: AtomicUsize,
    /// Pools declared in every answer.
    pub declared: Mutex<Vec<DeclaredPool>>,
    /// `heartbeat_interval_seconds` in every answer.
    pub interval_secs: AtomicU32,
    /// Identities refused with `unauthenticated` (a revoked cert).
    pub revoked: Mutex<Vec<String>>,
    /// Identities refused as deleted nodes (`unauthenticated`, reason `node_deleted`).
    pub deleted: Mutex<Vec<String>>,
    /// Heartbeat streams refused (revoked or deleted).
    pub refusals: AtomicUsize,
    /// TLS handshakes that failed on this server's side.
    pub handshake_failures: AtomicUsize,
}

impl State {
    pub fn reports(&self) -> Vec<(String, HeartbeatRequest)> {
        self.reports.lock().unwrap().clone()
    }
}

struct Svc {
    ca: Arc<ClusterCa>,
    state: Arc<State>,
}

#[tonic::async_trait]
impl EnrolmentService for Svc {
    async fn get_ca(&self, _: Request<GetCaRequest>) -> Result<Response<GetCaResponse>, Status> {
        Ok(Response::new(GetCaResponse {
            ca_cert_pem: self.ca.cert_pem().to_string(),
            fingerprint_sha256: format!("sha256:{}", self.ca.fingerprint_sha256()),
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let req = req.into_inner();
        self.state.join_requests.lock().unwrap().push((
            req.node_name.clone(),
            req.architecture.clone(),
            req.advertised_endpoint.clone(),
            req.token.clone(),
        ));
        if let Some(e) = self.state.join_refusal.lock().unwrap().clone() {
            return Err(e.to_status());
        }
        let name = self.state.join_cert_name.lock().unwrap().clone().unwrap_or(req.node_name);
        let signed = self
            .ca
            .sign_agent_csr(&req.csr_pem, &name, Duration::from_secs(3600))
            .map_err(|e| ApiError::new(ErrorCode::ValidationFailed, e.to_string()).to_status())?;
        self.state.joins.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(JoinResponse {
            node_id: format!("node-id-{name}"),
            cert_pem: signed.cert_pem,
            ca_cert_pem: self.ca.cert_pem().to_string(),
        }))
    }
}

#[tonic::async_trait]
impl HeartbeatService for Svc {
    type HeartbeatStream = ReceiverStream<Result<HeartbeatResponse, Status>>;

    async fn heartbeat(
        &self,
        req: Request<Streaming<HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let certs = req.peer_certs();
        let identity = otherix_pki::peer_identity(certs.as_deref().map(|c| c.as_slice()))
            .ok_or_else(|| ApiError::new(ErrorCode::Unauthenticated, "a client certificate is required").to_status())?;
        if self.state.revoked.lock().unwrap().contains(&identity) {
            self.state.refusals.fetch_add(1, Ordering::SeqCst);
            return Err(ApiError::new(ErrorCode::Unauthenticated, "certificate revoked").to_status());
        }
        if self.state.deleted.lock().unwrap().contains(&identity) {
            self.state.refusals.fetch_add(1, Ordering::SeqCst);
            return Err(ApiError::new(ErrorCode::Unauthenticated, format!("node {identity:?} was deleted"))
                .with_detail("reason", "node_deleted")
                .to_status());
        }
        self.state.streams.fetch_add(1, Ordering::SeqCst);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                state.reports.lock().unwrap().push((identity.clone(), r));
                let resp = HeartbeatResponse {
                    received_at: None,
                    declared_pools: state.declared.lock().unwrap().clone(),
                    heartbeat_interval_seconds: state.interval_secs.load(Ordering::SeqCst),
                };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A running test server.
pub struct TestCp {
    pub ca: Arc<ClusterCa>,
    pub state: Arc<State>,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestCp {
    /// A new CA and a server on an ephemeral port.
    pub fn start() -> TestCp {
        Self::start_with(
            Arc::new(ClusterCa::generate().unwrap()),
            Arc::new(State::default()),
            None,
            &["localhost", "127.0.0.1"],
        )
    }

    /// A server for `ca` sharing `state`, on `addr` (or an ephemeral port), with a server
    /// certificate for `sans`.
    pub fn start_with(ca: Arc<ClusterCa>, state: Arc<State>, addr: Option<SocketAddr>, sans: &[&str]) -> TestCp {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let cert = ca.issue_server_cert(&sans, Duration::from_secs(3600)).unwrap();
        Self::start_serving(ca, state, addr, &cert.cert_pem, &cert.key_pem)
    }

    /// A server for `ca` presenting `cert_pem`/`key_pem` (e.g. a node certificate, for an
    /// impostor) on an ephemeral port.
    pub fn start_impostor(ca: Arc<ClusterCa>, cert_pem: &str, key_pem: &str) -> TestCp {
        Self::start_serving(ca, Arc::new(State::default()), None, cert_pem, key_pem)
    }

    fn start_serving(
        ca: Arc<ClusterCa>,
        state: Arc<State>,
        addr: Option<SocketAddr>,
        cert_pem: &str,
        key_pem: &str,
    ) -> TestCp {
        let tls = otherix_pki::server_config_mtls(cert_pem, key_pem, ca.cert_pem(), false).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let std_listener = {
            let addr = addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
            let mut tries = 0;
            loop {
                match std::net::TcpListener::bind(addr) {
                    Ok(l) => break l,
                    Err(e) if tries < 50 => {
                        tries += 1;
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("bind {addr}: {e}"),
                }
            }
        };
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let svc_ca = ca.clone();
        let svc_state = state.clone();
        let tls_state = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let (conn_tx, conn_rx) = mpsc::channel(16);
                tokio::spawn(async move {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else { continue };
                        let acceptor = acceptor.clone();
                        let conn_tx = conn_tx.clone();
                        let tls_state = tls_state.clone();
                        tokio::spawn(async move {
                            match acceptor.accept(tcp).await {
                                Ok(tls) => {
                                    let _ = conn_tx.send(Ok::<_, std::io::Error>(tls)).await;
                                }
                                Err(_) => {
                                    tls_state.handshake_failures.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                        });
                    }
                });
                let svc = Arc::new(Svc { ca: svc_ca, state: svc_state });
                let server = tonic::transport::Server::builder()
                    .add_service(EnrolmentServiceServer::from_arc(svc.clone()))
                    .add_service(HeartbeatServiceServer::from_arc(svc))
                    .serve_with_incoming(ReceiverStream::new(conn_rx));
                tokio::select! {
                    _ = server => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime drops every connection task: like a killed process.
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        TestCp { ca, state, addr, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// The CA fingerprint, `sha256:<hex>`.
    pub fn fingerprint(&self) -> String {
        format!("sha256:{}", self.ca.fingerprint_sha256())
    }

    /// Stops the server and closes its connections.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for TestCp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A node certificate as the control plane issued them before node certificates named the
/// node only: serverAuth and clientAuth, and the joining agent's advertised host as extra SANs
/// (here `localhost`, `127.0.0.1` and a wildcard). Signed with the CA's key directly.
pub fn legacy_node_cert(ca: &ClusterCa, node: &str) -> (String, String) {
    use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let (ca_cert, ca_key) = ca.to_pem();
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, KeyPair::from_pem(&ca_key).unwrap()).unwrap();
    let mut params = CertificateParams::new(vec![
        format!("node-{node}.agents.otherix.local"),
        "localhost".to_string(),
        "*.agents.otherix.local".to_string(),
        "127.0.0.1".to_string(),
    ])
    .unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("node-{node}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Polls `f` until it returns `Some` or `limit` passes.
pub async fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("otherix_agent_enrolment=debug")),
        )
        .with_test_writer()
        .try_init();
}

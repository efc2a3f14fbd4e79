//! Listeners: the control plane's mTLS TCP listener (a client certificate from the cluster
//! CA is required, and only a control-plane replica identity is accepted), and an optional
//! unix socket (mode 0600) for local callers and tests. Both serve the same [`AgentService`].

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use otherix_agent_enrolment::is_control_plane_peer;
use otherix_proto::otherix::agent::v1::vm_runtime_service_server::VmRuntimeServiceServer;
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::service::AgentService;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `path` (replacing a stale socket) with mode 0600. The file work runs on the
/// blocking pool.
pub async fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    let path = path.to_path_buf();
    let std_listener = tokio::task::spawn_blocking(move || -> anyhow::Result<std::os::unix::net::UnixListener> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove stale socket {}", path.display())),
        }
        let listener =
            std::os::unix::net::UnixListener::bind(&path).with_context(|| format!("bind {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", path.display()))?;
        listener.set_nonblocking(true).context("make the unix listener non-blocking")?;
        Ok(listener)
    })
    .await
    .context("bind the unix socket")??;
    UnixListener::from_std(std_listener).context("register the unix listener")
}

/// Serves the agent API on a bound unix socket until `shutdown` resolves.
pub async fn serve_unix(
    service: AgentService,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    info!(addr = ?listener.local_addr().ok(), "serving the agent API on a unix socket");
    tonic::transport::Server::builder()
        .add_service(VmRuntimeServiceServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("unix socket server")
}

/// Binds the mTLS listener.
pub async fn bind_tcp(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("bind server.listen {addr}"))
}

/// Completes the TLS handshake and checks the peer: a verified client certificate with the
/// control-plane identity. The server config already refuses any other client in the
/// handshake (the log line then says why); the check after it is a second line of defence.
/// `None` (connection dropped) otherwise.
async fn accept_peer(acceptor: TlsAcceptor, stream: TcpStream, peer: SocketAddr) -> Option<TlsStream<TcpStream>> {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "mTLS handshake failed");
            return None;
        }
        Err(_) => {
            warn!(%peer, "mTLS handshake timed out");
            return None;
        }
    };
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    match leaf {
        Some(der) if is_control_plane_peer(der.as_ref()) => {
            debug!(%peer, "control plane connected");
            Some(tls)
        }
        Some(der) => {
            let who = otherix_pki::cert_identity_der(der.as_ref()).map(|n| format!("node {n}"));
            warn!(%peer, identity = who.as_deref().unwrap_or("not a control-plane replica"), "refused a client that is not the control plane");
            None
        }
        None => {
            warn!(%peer, "refused a client without a certificate");
            None
        }
    }
}

/// Serves the agent API on the mTLS listener until `shutdown` resolves. `tls` must require
/// client certificates (`Material::server_tls_config()`); each connection is also checked to
/// come from a control-plane replica.
pub async fn serve_mtls(
    service: AgentService,
    listener: TcpListener,
    tls: rustls::ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let local = listener.local_addr().ok();
    info!(addr = ?local, "serving the agent API over mTLS (control plane only)");
    let (tx, rx) = mpsc::channel::<Result<TlsStream<TcpStream>, std::io::Error>>(16);
    let accept_loop = async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(
                async move {
                    if let Some(tls) = accept_peer(acceptor, stream, peer).await {
                        let _ = tx.send(Ok(tls)).await;
                    }
                }
                .instrument(info_span!("mtls_connection", %peer)),
            );
        }
    };
    let accept_task = tokio::spawn(accept_loop);
    let result = tonic::transport::Server::builder()
        .add_service(VmRuntimeServiceServer::new(service))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await
        .context("mTLS server");
    accept_task.abort();
    result
}

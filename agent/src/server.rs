//! Listeners. Today a unix socket (mode 0600) for local callers and tests;
//! the control plane's mTLS TCP listener (enrolment issue) is added as another
//! `serve_*` function over the same [`AgentService`].

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;
use otherix_proto::otherix::agent::v1::vm_runtime_service_server::VmRuntimeServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::info;

use crate::service::AgentService;

/// Binds `path` (replacing a stale socket) with mode 0600.
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove stale socket {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
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

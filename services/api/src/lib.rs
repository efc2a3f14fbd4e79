//! The Otherix control plane: gRPC, grpc-web and REST on one port, state in
//! etcd (its own supervised member by default, or an external cluster).

pub mod access;
pub mod authz;
pub mod cluster;
pub mod config;
pub mod etag;
pub mod etcd_access;
pub mod health;
pub mod idempotency;
pub mod identity;
pub mod names;
pub mod nodes;
pub mod paging;
pub mod rpc;
pub mod secrets_at_rest;
pub mod server;
pub mod store_error;

use std::net::SocketAddr;
use std::time::Duration;

use otherix_etcd_member::{Member, MemberConfig};
use otherix_store::Store;
use tokio::task::JoinHandle;

pub use config::Config;

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The embedded etcd member did not start.
    #[error("cannot start the embedded etcd member")]
    Member(#[from] otherix_etcd_member::MemberError),
    /// The store could not be reached or used during start-up.
    #[error("the store failed during start-up")]
    Store(#[from] otherix_store::StoreError),
    /// The cluster CA could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] nodes::CaError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS material is unusable.
    #[error("server.tls: {0}")]
    Tls(String),
    /// The compiled-in contract is inconsistent (a build defect).
    #[error("the compiled-in API contract is inconsistent")]
    Contract(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The agent listener's certificate could not be made.
    #[error("cannot make the agent listener's certificate")]
    Pki(#[source] otherix_pki::PkiError),
    /// The key sealing secrets in etcd is missing, wrong or unusable.
    #[error("secrets at rest")]
    Secrets(#[from] secrets_at_rest::SecretsError),
    /// The bootstrap admin could not be created.
    #[error("cannot create the bootstrap admin")]
    Bootstrap(#[source] otherix_errors::ApiError),
}

/// What the process environment adds to the config.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The first admin, created when no admin exists.
    pub bootstrap_admin: Option<identity::bootstrap::BootstrapAdmin>,
}

/// A running control plane.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    agent_addr: Option<SocketAddr>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    serve: Option<JoinHandle<()>>,
    agent_serve: Option<JoinHandle<()>>,
    supervisor: otherix_supervisor::Supervisor,
    member: Option<Member>,
}

impl ApiServer {
    /// Starts everything the config asks for and begins serving.
    pub async fn start(config: Config) -> Result<ApiServer, StartError> {
        Self::start_with(config, StartOptions::default()).await
    }

    /// [`ApiServer::start`] with a bootstrap admin.
    pub async fn start_with(config: Config, options: StartOptions) -> Result<ApiServer, StartError> {
        config.validate()?;
        let member = if config.etcd.endpoints.is_empty() { Some(start_member(&config).await?) } else { None };
        let store = Store::connect_with(&etcd_access::connect_config(&config, member.as_ref())?).await?;
        let tls = match &config.server.tls {
            Some(t) => Some(server::tls_config(&t.cert_file, &t.key_file)?),
            None => None,
        };
        let addr = config.listen_addr()?;
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;

        // The listener opens at once: until the store answers and identity
        // and the CA are in place it serves /healthz, a 503 /readyz, and 503
        // request_timeout for every call (an external etcd may be down).
        let current = std::sync::Arc::new(std::sync::RwLock::new(server::starting_router(store.clone())));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
        let mut stopped = stop_rx.clone();
        let app = server::switch(current.clone());
        let serve = tokio::spawn(async move {
            server::serve(listener, app, tls, async move { drop(stopped.wait_for(|s| *s).await) }, grace).await;
        });
        let supervisor = otherix_supervisor::Supervisor::new();
        let prepared = async {
            // From here on the store seals and opens secrets at rest.
            let store = Box::pin(secrets_at_rest::open(&config, store.clone())).await?;
            let identity =
                std::sync::Arc::new(identity::Identity::new(store.clone(), &config.auth, supervisor.token()));
            prepare_identity(&identity, &options).await?;
            let ca = nodes::ensure_ca(&store).await?;
            let hub =
                std::sync::Arc::new(nodes::NodeHub::new(store.clone(), ca, config.nodes.clone(), supervisor.token()));
            hub.ready().await?;
            {
                let hub = hub.clone();
                supervisor.spawn("replica-lease", move |cancel| nodes::liveness::run_lease(hub.clone(), cancel));
            }
            let full = server::build_router(&config, store.clone(), identity.clone(), hub.clone()).await?;
            let agent = match config.agent_server.enabled {
                true => {
                    let (listener, tls, app) = server::agent_listener(&config, addr, identity, hub.clone()).await?;
                    let bound = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
                    Some((listener, tls, app, bound))
                }
                false => None,
            };
            Ok::<_, StartError>((hub, full, agent))
        }
        .await;
        let (hub, full, agent) = match prepared {
            Ok(v) => v,
            Err(e) => {
                supervisor.shutdown(Duration::from_secs(1)).await;
                let _ = stop_tx.send(true);
                let _ = serve.await;
                return Err(e);
            }
        };
        *current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = full;

        {
            let store = store.clone();
            let name = config.storage_pools.default_pool_name.clone();
            // Seeds the cluster default pool on the first boot only; an
            // external etcd may not answer yet, so failures restart it.
            supervisor.spawn("seed-default-pool", move |_| {
                let (store, name) = (store.clone(), name.clone());
                async move { Ok(cluster::seed_default_pool(&store, &name).await?) }
            });
        }
        {
            let hub = hub.clone();
            supervisor.spawn("node-liveness", move |cancel| nodes::liveness::run(hub.clone(), cancel));
        }
        let mut agent_addr = None;
        let mut agent_serve = None;
        if let Some((agent_listener, agent_tls, agent_app, bound)) = agent {
            agent_addr = Some(bound);
            let mut stopped = stop_rx.clone();
            agent_serve = Some(tokio::spawn(async move {
                server::serve(
                    agent_listener,
                    agent_app,
                    Some(agent_tls),
                    async move { drop(stopped.wait_for(|s| *s).await) },
                    grace,
                )
                .await;
            }));
        }
        tracing::info!(%addr, ?agent_addr, tls = config.server.tls.is_some(), embedded_etcd = member.is_some(), "otherix-api serving");
        // The bound addresses, for scripts and tests that listen on port 0.
        let listening = serde_json::json!({
            "addr": addr.to_string(),
            "agent_addr": agent_addr.map(|a| a.to_string()),
        });
        let path = config.state_dir.join("run").join("listen.json");
        let written = tokio::task::spawn_blocking(move || {
            otherix_files::ensure_dir(path.parent().unwrap_or(&path), 0o700)?;
            otherix_files::write_file_atomic(&path, listening.to_string().as_bytes(), 0o644)
        })
        .await;
        if let Ok(Err(e)) = written {
            tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "cannot record the bound addresses");
        }
        Ok(ApiServer { addr, agent_addr, stop: Some(stop_tx), serve: Some(serve), agent_serve, supervisor, member })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound agent listener address, when it is enabled.
    pub fn agent_addr(&self) -> Option<SocketAddr> {
        self.agent_addr
    }

    /// The embedded member's pid, when one runs.
    pub fn etcd_pid(&self) -> Option<u32> {
        self.member.as_ref().and_then(Member::pid)
    }

    /// Stops serving (letting calls in flight finish), then stops the member.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        for serve in [self.serve.take(), self.agent_serve.take()].into_iter().flatten() {
            let _ = serve.await;
        }
        // Background loops end with their tokens (the replica lease is
        // revoked, so other replicas take this one's nodes at once).
        self.supervisor.shutdown(Duration::from_secs(5)).await;
        if let Some(m) = self.member.take() {
            m.stop().await;
        }
        tracing::info!("otherix-api stopped");
    }
}

/// Creates the signing key and the bootstrap admin on first start. With an
/// external etcd that does not answer yet, waits for it (as /readyz shows).
async fn prepare_identity(identity: &identity::Identity, options: &StartOptions) -> Result<(), StartError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match identity.keys.ensure().await {
            Ok(()) => break,
            Err(e @ otherix_store::StoreError::Unavailable(_)) => {
                tracing::warn!(error = %e, "store not answering yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
    // The caches list once before anything is served from them.
    while let Err(e) = identity.ready().await {
        tracing::warn!(error = %e, "identity caches not in step yet; retrying");
        tokio::time::sleep(delay).await;
    }
    if let Some(admin) = &options.bootstrap_admin {
        identity.bootstrap_admin(admin).await.map_err(StartError::Bootstrap)?;
    }
    Ok(())
}

async fn start_member(config: &Config) -> Result<Member, StartError> {
    let e = &config.etcd;
    let mut mc = MemberConfig::unix(&e.name, &config.etcd_data_dir(), &config.etcd_socket_dir());
    mc.binary = e.binary.clone();
    mc.quota_backend_bytes = e.quota_backend_bytes;
    mc.auto_compaction_retention = e.auto_compaction_retention.clone();
    mc.heartbeat_interval_ms = e.heartbeat_interval_ms;
    mc.election_timeout_ms = e.election_timeout_ms;
    mc.start_timeout = Duration::from_secs(e.start_timeout_seconds);
    mc.log_file = Some(config.state_dir.join("run").join("etcd.log"));
    Ok(Member::start(mc).await?)
}

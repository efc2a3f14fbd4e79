//! One listener for everything: gRPC (h2c, or TLS with ALPN), grpc-web over
//! HTTP/1.1 and HTTP/2, the REST gateway, and the health endpoints.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use otherix_gateway::{Gateway, GatewayConfig, error_response, not_found, routes_from_pool};
use otherix_proto::v1::cluster_service_server::ClusterServiceServer;
use otherix_store::Store;
use prost_reflect::DescriptorPool;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tower::{Layer, ServiceExt};

use crate::access::AccessTable;
use crate::authz::AuthzState;
use crate::cluster::ClusterSettingsService;
use crate::config::Config;
use crate::idempotency::IdempotencyState;
use crate::identity::Identity;
use crate::identity::api_tokens::ApiTokenServiceImpl;
use crate::identity::service_auth::AuthServiceImpl;
use crate::identity::service_users::UserServiceImpl;
use crate::nodes::enrolment::EnrolmentServiceImpl;
use crate::nodes::heartbeat::HeartbeatServiceImpl;
use crate::nodes::service::NodeServiceImpl;
use crate::nodes::{NodeHub, PeerCert};
use crate::{StartError, authz, health, idempotency, rpc};
use otherix_proto::otherix::agent::v1::enrolment_service_server::EnrolmentServiceServer;
use otherix_proto::otherix::agent::v1::heartbeat_service_server::HeartbeatServiceServer;
use otherix_proto::v1::api_token_service_server::ApiTokenServiceServer;
use otherix_proto::v1::auth_service_server::AuthServiceServer;
use otherix_proto::v1::node_service_server::NodeServiceServer;
use otherix_proto::v1::user_service_server::UserServiceServer;

/// Builds the whole application router.
pub async fn build_router(
    config: &Config,
    store: Store,
    identity: Arc<Identity>,
    hub: Arc<NodeHub>,
) -> Result<axum::Router, StartError> {
    let pool =
        DescriptorPool::decode(otherix_proto::FILE_DESCRIPTOR_SET).map_err(|e| StartError::Contract(e.into()))?;
    let access = Arc::new(AccessTable::from_pool(&pool).map_err(|e| StartError::Contract(e.into()))?);
    let max = config.server.max_request_bytes;

    // What this listener serves; reflection advertises exactly these, and
    // any other gRPC service answers unimplemented here.
    let served: Served = Arc::from(vec![
        <ClusterServiceServer<ClusterSettingsService> as NamedService>::NAME,
        <AuthServiceServer<AuthServiceImpl> as NamedService>::NAME,
        <UserServiceServer<UserServiceImpl> as NamedService>::NAME,
        <ApiTokenServiceServer<ApiTokenServiceImpl> as NamedService>::NAME,
        <NodeServiceServer<NodeServiceImpl> as NamedService>::NAME,
        <EnrolmentServiceServer<EnrolmentServiceImpl> as NamedService>::NAME,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]);
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_serving::<ClusterServiceServer<ClusterSettingsService>>().await;
    reporter.set_serving::<AuthServiceServer<AuthServiceImpl>>().await;
    reporter.set_serving::<UserServiceServer<UserServiceImpl>>().await;
    reporter.set_serving::<ApiTokenServiceServer<ApiTokenServiceImpl>>().await;
    reporter.set_serving::<NodeServiceServer<NodeServiceImpl>>().await;
    reporter.set_serving::<EnrolmentServiceServer<EnrolmentServiceImpl>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(otherix_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_names(&served)
        .build_v1()
        .map_err(|e| StartError::Contract(e.into()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(otherix_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_names(&served)
        .build_v1alpha()
        .map_err(|e| StartError::Contract(e.into()))?;

    let web = tonic_web::GrpcWebLayer::new();
    let cluster = ClusterServiceServer::new(ClusterSettingsService::new(store.clone(), hub.cluster.clone()))
        .max_decoding_message_size(max);
    let auth = AuthServiceServer::new(AuthServiceImpl::new(identity.clone())).max_decoding_message_size(max);
    let users = UserServiceServer::new(UserServiceImpl::new(identity.clone())).max_decoding_message_size(max);
    let tokens = ApiTokenServiceServer::new(
        ApiTokenServiceImpl::new(identity.clone()).with_max_per_user(config.auth.max_api_tokens_per_user),
    )
    .max_decoding_message_size(max);
    let node_svc = NodeServiceServer::new(NodeServiceImpl::new(hub.clone())).max_decoding_message_size(max);
    let enrol = EnrolmentServiceServer::new(EnrolmentServiceImpl::new(hub)).max_decoding_message_size(max);
    let authz = AuthzState { access: access.clone(), identity };
    let rest_authz: Arc<dyn otherix_gateway::Authorizer> = Arc::new(authz.clone());
    let idem = IdempotencyState::new(store.clone(), &pool, &access, max);
    let grpc = tonic::service::Routes::new(web.layer(cluster))
        .add_service(web.layer(auth))
        .add_service(web.layer(users))
        .add_service(web.layer(tokens))
        .add_service(web.layer(node_svc))
        .add_service(web.layer(enrol))
        .add_service(web.layer(health_service))
        .add_service(web.layer(reflection_v1))
        .add_service(web.layer(reflection_v1alpha))
        .into_axum_router()
        // Layers run outermost last-added: span, then authorization, then idempotency.
        .layer(axum::middleware::from_fn_with_state(idem, idempotency::idempotent))
        .layer(axum::middleware::from_fn_with_state(authz, authz::authorize))
        .layer(axum::middleware::from_fn_with_state(access, rpc::rpc_span));

    let routes = served_routes(&pool, "otherix.", &served)?;
    // The OpenAPI document of exactly these routes, built once per start.
    let openapi = serde_json::to_vec(&otherix_gateway::openapi::document(
        &pool,
        &routes,
        "Otherix API",
        env!("CARGO_PKG_VERSION"),
    ))
    .map_err(|e| StartError::Contract(e.into()))?;
    let openapi = bytes::Bytes::from(openapi);
    let gateway = Gateway::new(
        routes,
        grpc.clone(),
        GatewayConfig {
            max_body_bytes: max,
            request_timeout: Duration::from_secs(config.server.request_timeout_seconds),
        },
    )
    .with_authorizer(rest_authz);

    let health_routes = axum::Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route(
            "/openapi.json",
            get(move || {
                let doc = openapi.clone();
                async move { ([(http::header::CONTENT_TYPE, "application/json")], doc) }
            }),
        )
        .route(
            "/docs",
            get(|| async {
                ([(http::header::CONTENT_TYPE, "text/html; charset=utf-8")], otherix_gateway::openapi::DOCS_HTML)
            }),
        )
        .method_not_allowed_fallback(get_only)
        .with_state(store);
    let cors = otherix_gateway::cors::Cors::new(&config.server.cors.allowed_origins)
        .map_err(|e| StartError::Contract(e.into()))?;
    Ok(health_routes
        .fallback_service(dispatch(grpc, gateway, served))
        .layer(otherix_gateway::cors::CorsLayer::new(cors)))
}

/// The router while otherix-api starts: `/healthz`, a 503 `/readyz`, and
/// 503 `request_timeout` for everything else, gRPC and REST alike.
pub fn starting_router(store: Store) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz_starting))
        .method_not_allowed_fallback(get_only)
        .with_state(store)
        .fallback(|req: Request<Body>| async move {
            let e = otherix_errors::ApiError::new(
                otherix_errors::ErrorCode::RequestTimeout,
                "otherix-api is starting: waiting for the store",
            );
            let ct = req.headers().get(http::header::CONTENT_TYPE).cloned();
            if ct.as_ref().and_then(|v| v.to_str().ok()).is_some_and(|c| c.starts_with("application/grpc")) {
                authz::grpc_error(ct.as_ref(), &e)
            } else {
                error_response(&e)
            }
        })
}

/// A router that forwards to whatever `current` holds: the starting router,
/// then the full one.
pub fn switch(current: Arc<std::sync::RwLock<axum::Router>>) -> axum::Router {
    axum::Router::new().fallback_service(tower::service_fn(move |req: Request<Body>| {
        let router = current.read().map(|r| r.clone()).unwrap_or_else(|e| e.into_inner().clone());
        async move { router.oneshot(req).await }
    }))
}

/// The 405 of the fixed routes (`/healthz`, `/readyz`, `/openapi.json`,
/// `/docs`), in the JSON envelope with `Allow`.
async fn get_only(req: Request<Body>) -> Response<Body> {
    let e = otherix_errors::ApiError::new(
        otherix_errors::ErrorCode::MethodNotAllowed,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
    .with_detail("allow", "GET, HEAD");
    error_response(&e)
}

/// The gRPC services one listener serves, by full name.
type Served = Arc<[&'static str]>;

/// Reflection listing only `served` (tonic lists every registered file's
/// services otherwise).
trait WithServiceNames: Sized {
    fn with_service_names(self, served: &Served) -> Self;
}

impl WithServiceNames for tonic_reflection::server::Builder<'_> {
    fn with_service_names(self, served: &Served) -> Self {
        served.iter().fold(self, |b, name| b.with_service_name(*name))
    }
}

/// The REST routes of the RPCs a listener serves.
fn served_routes(
    pool: &DescriptorPool,
    prefix: &str,
    served: &Served,
) -> Result<Vec<otherix_gateway::Route>, StartError> {
    let mut routes = routes_from_pool(pool, prefix).map_err(|e| StartError::Contract(e.into()))?;
    routes.retain(|r| served.contains(&r.method().parent_service().full_name()));
    Ok(routes)
}

/// The service part of a gRPC path: `otherix.v1.UserService` of
/// `/otherix.v1.UserService/GetMe`.
fn grpc_service(path: &str) -> &str {
    path.trim_start_matches('/').split('/').next().unwrap_or_default()
}

/// Routes what no explicit route took: gRPC and grpc-web by content type to
/// the gRPC router (services this listener does not serve answer
/// unimplemented before any authentication), `/v1/...` to the REST gateway,
/// anything else to a JSON 404.
fn dispatch(
    grpc: axum::Router,
    gateway: Gateway,
    served: Served,
) -> impl tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send> + Clone + Send + 'static
{
    tower::service_fn(move |req: Request<Body>| {
        let (grpc, gateway, served) = (grpc.clone(), gateway.clone(), served.clone());
        async move {
            let ct = req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let is_grpc = ct.starts_with("application/grpc");
            // Only the binary protobuf codec is served; say so instead of a bare 400.
            let json_codec = is_grpc && ct.split(';').next().is_some_and(|e| e.trim().ends_with("+json"));
            let resp: Response<Body> = if json_codec {
                let e = otherix_errors::ApiError::new(
                    otherix_errors::ErrorCode::UnsupportedMediaType,
                    format!("{ct} is not served: use application/grpc-web+proto (or application/grpc)"),
                )
                .with_detail("content_type", ct);
                let mut resp = error_response(&e);
                resp.headers_mut().insert("grpc-status", http::HeaderValue::from_static("3"));
                resp
            } else if is_grpc && !served.contains(&grpc_service(req.uri().path())) {
                let status = tonic::Status::unimplemented(format!(
                    "{} is not served on this listener",
                    grpc_service(req.uri().path())
                ));
                let mut resp = status.into_http::<Body>();
                if ct.starts_with("application/grpc-web") {
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_str(ct)
                            .unwrap_or_else(|_| http::HeaderValue::from_static("application/grpc-web+proto")),
                    );
                }
                resp
            } else if is_grpc {
                grpc.oneshot(req).await.unwrap_or_else(|never| match never {})
            } else if req.uri().path().starts_with("/v1/") {
                gateway.handle(req).await
            } else {
                error_response(&not_found(req.uri().path()))
            };
            Ok::<_, Infallible>(resp)
        }
    })
}

/// The agent listener: TLS with the replica's certificate from the cluster CA
/// (client certificates optional, verified when sent), serving enrolment,
/// heartbeats and `/healthz`.
pub async fn agent_listener(
    config: &Config,
    user_addr: std::net::SocketAddr,
    identity: Arc<Identity>,
    hub: Arc<NodeHub>,
) -> Result<(TcpListener, Arc<rustls::ServerConfig>, axum::Router), StartError> {
    let addr = config.agent_listen_addr()?;
    let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let sans = otherix_pki::default_server_sans(hostname.trim(), &[user_addr, bound], &config.cp_cert.additional_sans);
    let validity = Duration::from_secs(u64::from(config.cp_cert.validity_days) * 24 * 3600);
    let cert = otherix_pki::load_or_issue_server_cert(&config.state_dir.join("pki"), hub.ca(), &sans, validity)
        .map_err(StartError::Pki)?;
    tracing::info!(reused = cert.reused, serial = %cert.cert.serial_hex, ?sans, "agent listener certificate");
    let tls = otherix_pki::server_config_mtls(&cert.cert.cert_pem, &cert.cert.key_pem, hub.ca().cert_pem(), false)
        .map_err(StartError::Pki)?;

    let pool =
        DescriptorPool::decode(otherix_proto::FILE_DESCRIPTOR_SET).map_err(|e| StartError::Contract(e.into()))?;
    let access = Arc::new(AccessTable::from_pool(&pool).map_err(|e| StartError::Contract(e.into()))?);
    let max = 16 * 1024 * 1024;
    let enrol = EnrolmentServiceServer::new(EnrolmentServiceImpl::new(hub.clone())).max_decoding_message_size(max);
    let beats = HeartbeatServiceServer::new(HeartbeatServiceImpl::new(hub))
        .max_decoding_message_size(crate::nodes::heartbeat::MAX_REPORT_BYTES);
    let agent_authz = AuthzState { access: access.clone(), identity };
    let grpc = tonic::service::Routes::new(enrol)
        .add_service(beats)
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(agent_authz.clone(), authz::authorize))
        .layer(axum::middleware::from_fn_with_state(access, rpc::rpc_span));
    let served: Served = Arc::from(vec![
        <EnrolmentServiceServer<EnrolmentServiceImpl> as NamedService>::NAME,
        <HeartbeatServiceServer<HeartbeatServiceImpl> as NamedService>::NAME,
    ]);
    let routes = served_routes(&pool, "otherix.agent.", &served)?;
    let gateway = Gateway::new(
        routes,
        grpc.clone(),
        GatewayConfig {
            max_body_bytes: max,
            request_timeout: Duration::from_secs(config.server.request_timeout_seconds),
        },
    )
    .with_authorizer(Arc::new(agent_authz));
    let app = axum::Router::new()
        .route("/healthz", get(health::healthz))
        .method_not_allowed_fallback(get_only)
        .fallback_service(dispatch(grpc, gateway, served));
    Ok((listener, Arc::new(tls), app))
}

/// Loads a PEM certificate chain and key into a TLS config offering h2 and http/1.1.
pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let tls_err = |what: String| StartError::Tls(what);
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).map_err(|e| tls_err(format!("{}: {e}", cert.display())))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| tls_err(format!("{}: {e}", cert.display())))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).map_err(|e| tls_err(format!("{}: {e}", key.display())))?,
    ))
    .map_err(|e| tls_err(format!("{}: {e}", key.display())))?
    .ok_or_else(|| tls_err(format!("{}: no private key", key.display())))?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts connections until `shutdown` resolves, then waits up to `grace`
/// for connections in flight.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let local = listener.local_addr().ok();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Without TCP_NODELAY the first gRPC call on a connection waits ~40 ms.
        let _ = stream.set_nodelay(true);
        // Every request carries the peer address (for logs and tonic's
        // remote_addr()) and, on TLS, the client certificate's identity.
        let app = app.clone();
        let make_svc = move |cert: Option<PeerCert>| {
            let app = otherix_gateway::drain::DrainLayer.layer(app.clone());
            TowerToHyperService::new(app.map_request(move |req: Request<hyper::body::Incoming>| {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                req.extensions_mut()
                    .insert(tonic::transport::server::TcpConnectInfo { local_addr: local, remote_addr: Some(peer) });
                if let Some(c) = &cert {
                    req.extensions_mut().insert(c.clone());
                }
                req
            }))
        };
        let builder = auto::Builder::new(TokioExecutor::new());
        match &acceptor {
            None => {
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), make_svc(None)).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|der| PeerCert {
                        node_name: otherix_pki::cert_identity_der(der.as_ref()),
                        fingerprint: otherix_pki::to_hex(&otherix_pki::sha256(der.as_ref())),
                    });
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), make_svc(cert)).into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(?grace, "connections still open after the grace period");
    }
}

//! Authentication and authorization of every RPC, in one layer that gRPC,
//! grpc-web and REST (through the gateway) all pass: the RPC's access rule
//! comes from its `otherix.v1.access` option in the contract.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::middleware::Next;
use http::{Request, Response};
use otherix_errors::{ApiError, ErrorCode};

use crate::access::AccessTable;
use crate::identity::Identity;
use crate::nodes::PeerCert;

/// What the layer needs.
#[derive(Debug, Clone)]
pub struct AuthzState {
    /// Access rules by gRPC path.
    pub access: Arc<AccessTable>,
    /// Token verification.
    pub identity: Arc<Identity>,
}

/// Renders an error as a gRPC response, in the framing the client asked for.
pub fn grpc_error(req_content_type: Option<&http::HeaderValue>, e: &ApiError) -> Response<Body> {
    let mut resp = e.to_status().into_http::<Body>();
    if let Some(ct) = req_content_type
        && ct.to_str().is_ok_and(|s| s.starts_with("application/grpc-web"))
    {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, ct.clone());
    }
    resp
}

/// The services served without an access rule: health checks and reflection.
pub const OPEN_SERVICES: &[&str] =
    &["/grpc.health.v1.Health", "/grpc.reflection.v1.ServerReflection", "/grpc.reflection.v1alpha.ServerReflection"];

fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Set once a request's caller has been checked (by the REST gateway, before
/// it validates the body), so the layer does not check it twice. Only the
/// server inserts extensions; a client cannot send one.
#[derive(Debug, Clone, Copy)]
pub struct Authorized;

/// Axum middleware: authenticates the caller, checks the permission, and
/// hands the [`crate::identity::Caller`] to the handler.
pub async fn authorize(State(st): State<AuthzState>, req: Request<Body>, next: Next) -> Response<Body> {
    if req.extensions().get::<Authorized>().is_some() {
        let who = req.extensions().get::<crate::identity::Caller>().map(|c| c.username.clone());
        tracing::Span::current().record("caller", who.as_deref().unwrap_or("anonymous"));
        return next.run(req).await;
    }
    let ct = req.headers().get(http::header::CONTENT_TYPE).cloned();
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    match check(&st, &path, &mut parts).await {
        Ok(()) => next.run(Request::from_parts(parts, body)).await,
        Err(e) => grpc_error(ct.as_ref(), &e),
    }
}

/// Authenticates and authorizes a call to the RPC at `path`; on success the
/// caller (if any) is in `parts.extensions`, with [`Authorized`].
pub async fn check(st: &AuthzState, path: &str, parts: &mut http::request::Parts) -> Result<(), ApiError> {
    let anonymous = || {
        tracing::Span::current().record("caller", "anonymous");
    };
    let Some(rule) = st.access.rule(path) else {
        // Health and reflection carry no rule: they are open, as for any gRPC
        // server. Anything else without a rule is refused, so an RPC added
        // without one is closed rather than open to anonymous callers.
        if OPEN_SERVICES.iter().any(|s| path.strip_prefix(s).is_some_and(|m| m.starts_with('/'))) {
            anonymous();
            parts.extensions.insert(Authorized);
            return Ok(());
        }
        tracing::warn!(%path, "refused: no access rule for this path");
        return Err(ApiError::new(ErrorCode::PermissionDenied, "no access rule allows this call")
            .with_detail("reason", "no_access_rule"));
    };
    if rule.public {
        anonymous();
        parts.extensions.insert(Authorized);
        return Ok(());
    }
    if rule.agent || rule.control_plane {
        // Agent-plane RPCs authenticate by client certificate on the agent
        // listener; a user token never opens them.
        let node = parts.extensions.get::<PeerCert>().and_then(|p| p.node_name.clone());
        if let (true, Some(node)) = (rule.agent, node) {
            tracing::Span::current().record("caller", format!("node:{node}").as_str());
            parts.extensions.insert(Authorized);
            return Ok(());
        }
        return Err(ApiError::new(ErrorCode::Unauthenticated, "this RPC needs an enrolled agent's client certificate")
            .with_detail("reason", "cert_untrusted"));
    }
    let Some(token) = bearer(&parts.headers) else {
        return Err(ApiError::new(
            ErrorCode::Unauthenticated,
            "authentication required: send Authorization: Bearer <token>",
        ));
    };
    let caller = st.identity.authenticate(token).await?;
    tracing::Span::current().record("caller", caller.username.as_str());
    if !rule.permission.is_empty() && caller.role.grant(&rule.permission).is_none() {
        tracing::info!(caller = %caller.username, role = %caller.role, permission = %rule.permission, "permission denied");
        return Err(ApiError::new(
            ErrorCode::PermissionDenied,
            format!("role {} lacks the permission {}", caller.role, rule.permission),
        )
        .with_detail("required_permission", rule.permission.clone())
        .with_detail("role", caller.role.as_str()));
    }
    parts.extensions.insert(caller);
    parts.extensions.insert(Authorized);
    Ok(())
}

/// The REST gateway's check before it reads a call's fields.
impl otherix_gateway::Authorizer for AuthzState {
    fn authorize<'a>(
        &'a self,
        grpc_path: &'a str,
        parts: &'a mut http::request::Parts,
    ) -> futures::future::BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(check(self, grpc_path, parts))
    }
}

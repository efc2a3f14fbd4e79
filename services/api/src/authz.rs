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

fn bearer(req: &Request<Body>) -> Option<&str> {
    let v = req.headers().get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Axum middleware: authenticates the caller, checks the permission, and
/// hands the [`crate::identity::Caller`] to the handler.
pub async fn authorize(State(st): State<AuthzState>, mut req: Request<Body>, next: Next) -> Response<Body> {
    let path = req.uri().path().to_owned();
    // Health and reflection carry no rule: they are open, as for any gRPC server.
    let anonymous = || {
        tracing::Span::current().record("caller", "anonymous");
    };
    let Some(rule) = st.access.rule(&path) else {
        anonymous();
        return next.run(req).await;
    };
    if rule.public {
        anonymous();
        return next.run(req).await;
    }
    let ct = req.headers().get(http::header::CONTENT_TYPE).cloned();
    if rule.agent || rule.control_plane {
        // Agent-plane RPCs authenticate by client certificate on the agent
        // listener; a user token never opens them.
        let node = req.extensions().get::<PeerCert>().and_then(|p| p.node_name.clone());
        if let (true, Some(node)) = (rule.agent, node) {
            tracing::Span::current().record("caller", format!("node:{node}").as_str());
            return next.run(req).await;
        }
        let e = ApiError::new(ErrorCode::Unauthenticated, "this RPC needs an enrolled agent's client certificate")
            .with_detail("reason", "cert_untrusted");
        return grpc_error(ct.as_ref(), &e);
    }
    let Some(token) = bearer(&req) else {
        let e =
            ApiError::new(ErrorCode::Unauthenticated, "authentication required: send Authorization: Bearer <token>");
        return grpc_error(ct.as_ref(), &e);
    };
    let caller = match st.identity.authenticate(token).await {
        Ok(c) => c,
        Err(e) => return grpc_error(ct.as_ref(), &e),
    };
    tracing::Span::current().record("caller", caller.username.as_str());
    if !rule.permission.is_empty() && caller.role.grant(&rule.permission).is_none() {
        tracing::info!(caller = %caller.username, role = %caller.role, permission = %rule.permission, "permission denied");
        let e = ApiError::new(
            ErrorCode::PermissionDenied,
            format!("role {} lacks the permission {}", caller.role, rule.permission),
        )
        .with_detail("required_permission", rule.permission.clone())
        .with_detail("role", caller.role.as_str());
        return grpc_error(ct.as_ref(), &e);
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

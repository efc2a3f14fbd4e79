//! The layer every RPC passes through, whichever transport it came by
//! (gRPC, grpc-web, or REST through the gateway): one span per call with the
//! method, the caller, the required permission and the outcome, joined to
//! the caller's W3C trace context.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::middleware::Next;
use http::Request;
use http::Response;
use tracing::Instrument;

use crate::access::{AccessTable, describe};

/// Which transport a call arrived by.
fn transport(req: &Request<Body>) -> &'static str {
    if req.extensions().get::<otherix_gateway::ViaRest>().is_some() {
        return "rest";
    }
    match req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        Some(ct) if ct.starts_with("application/grpc-web") => "grpc-web",
        _ => "grpc",
    }
}

/// Axum middleware: wraps the call in its span and logs its outcome.
pub async fn rpc_span(State(access): State<Arc<AccessTable>>, req: Request<Body>, next: Next) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("", ""));
    let permission = access.rule(&path).map_or("ungoverned", describe);
    let span = tracing::info_span!(
        "rpc",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        transport = transport(&req),
        caller = tracing::field::Empty,
        permission = %permission,
    );
    otherix_telemetry::set_parent_from_headers(&span, req.headers());
    let started = Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    // Unary failures are trailers-only responses, so the status is in the headers.
    let code = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .unwrap_or(0);
    span.record("rpc.grpc.status_code", code);
    span.record("otel.status_code", if code == 0 { "OK" } else { "ERROR" });
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if code == 0 {
            tracing::debug!(elapsed_ms, grpc_status = code, "rpc finished");
        } else {
            tracing::info!(elapsed_ms, grpc_status = code, "rpc failed");
        }
    });
    resp
}

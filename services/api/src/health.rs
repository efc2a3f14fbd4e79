//! `/healthz` (liveness) and `/readyz` (the store answers, no alarm).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use http::StatusCode;
use otherix_store::Store;
use serde_json::{Value, json};

/// The version reported by `/healthz`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Liveness: the process serves HTTP.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok", "version": VERSION}))
}

/// Readiness: 200 when the store answers without alarms, 503 otherwise.
pub async fn readyz(State(store): State<Store>) -> (StatusCode, Json<Value>) {
    match tokio::time::timeout(Duration::from_secs(2), store.health()).await {
        Ok(Ok(h)) if h.alarms.is_empty() => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Ok(Ok(h)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": "store_alarm", "alarms": h.alarms})),
        ),
        Ok(Err(_)) | Err(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not_ready", "reason": "store_unavailable"})))
        }
    }
}

/// Readiness while starting: never ready; says whether the store answers yet.
pub async fn readyz_starting(State(store): State<Store>) -> (StatusCode, Json<Value>) {
    let answers = matches!(tokio::time::timeout(Duration::from_secs(2), store.health()).await, Ok(Ok(_)));
    let reason = if answers { "starting" } else { "store_unavailable" };
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not_ready", "reason": reason})))
}

//! Idempotent retries of mutating calls: an `Idempotency-Key` header (REST,
//! or gRPC metadata) or a `request_id` field. The same key with the same
//! request replays the stored response for 24 h; the same key with another
//! request answers 409 idempotency_key_mismatch. Keys are per user and per
//! RPC, kept in etcd under a 24 h lease. Failed calls are not stored, so a
//! retry runs again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::middleware::Next;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::BodyExt;
use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::otherix::store::v1::IdempotencyRecord;
use otherix_store::{Batch, Expect, Store, StoreError};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor};
use sha2::{Digest, Sha256};

use crate::authz::grpc_error;
use crate::identity::{Caller, now_ts};
use crate::store_error::store_error;

/// How long a key is remembered.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Longest accepted key.
pub const MAX_KEY_LEN: usize = 255;

/// One governed RPC.
#[derive(Debug, Clone)]
struct Rpc {
    input: MethodDescriptor,
    /// Its response carries a secret: keys are refused rather than stored.
    secret_response: bool,
}

/// The layer's state.
#[derive(Debug, Clone)]
pub struct IdempotencyState {
    store: Store,
    rpcs: Arc<HashMap<String, Rpc>>,
    max_bytes: usize,
}

impl IdempotencyState {
    /// Covers every RPC whose REST binding is not a GET and that needs a caller.
    pub fn new(store: Store, pool: &DescriptorPool, access: &crate::access::AccessTable, max_bytes: usize) -> Self {
        let mut rpcs = HashMap::new();
        if let Ok(routes) = otherix_gateway::routes_from_pool(pool, "otherix.") {
            for r in routes.iter().filter(|r| r.http_method() != http::Method::GET) {
                let path = r.grpc_path().to_owned();
                let Some(rule) = access.rule(&path) else { continue };
                if rule.public {
                    continue;
                }
                rpcs.insert(path, Rpc { input: r.method().clone(), secret_response: rule.secret_response });
            }
        }
        IdempotencyState { store, rpcs: Arc::new(rpcs), max_bytes }
    }
}

fn record_key(user_id: &str, rpc: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(rpc.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    format!("idempotency/{user_id}/{}", otherix_auth::token::hex(&h.finalize()))
}

fn is_binary_grpc(req: &Request<Body>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc") && !ct.starts_with("application/grpc-web-text"))
}

/// The message of a unary gRPC request body (one uncompressed frame).
fn frame_payload(body: &Bytes) -> Option<Bytes> {
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    (body.len() == 5 + len).then(|| body.slice(5..))
}

fn framed(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 5);
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

fn ok_response(content_type: Option<&http::HeaderValue>, data: Bytes) -> Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames =
        vec![Ok::<_, std::convert::Infallible>(http_body::Frame::data(data)), Ok(http_body::Frame::trailers(trailers))];
    let mut resp = Response::new(Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames))));
    let ct = content_type.cloned().unwrap_or_else(|| http::HeaderValue::from_static("application/grpc"));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, ct);
    resp
}

/// Axum middleware (after authorization, which provides the caller).
pub async fn idempotent(State(st): State<IdempotencyState>, req: Request<Body>, next: Next) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let Some(rpc) = st.rpcs.get(&path).cloned() else { return next.run(req).await };
    if !is_binary_grpc(&req) {
        return next.run(req).await;
    }
    let ct = req.headers().get(http::header::CONTENT_TYPE).cloned();
    let header_key = req.headers().get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (parts, body) = req.into_parts();
    let body = match http_body_util::Limited::new(body, st.max_bytes + 5).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let e = ApiError::new(ErrorCode::PayloadTooLarge, format!("the request exceeds {} bytes", st.max_bytes));
            return grpc_error(ct.as_ref(), &e);
        }
    };
    let field_key = frame_payload(&body)
        .and_then(|p| DynamicMessage::decode(rpc.input.input(), p).ok())
        .and_then(|m| m.get_field_by_name("request_id").and_then(|v| v.as_str().map(str::to_owned)))
        .filter(|s| !s.is_empty());
    let req = Request::from_parts(parts, Body::from(body.clone()));
    let Some(key) = header_key.filter(|k| !k.is_empty()).or(field_key) else { return next.run(req).await };
    match run(&st, &rpc, &path, &key, body, req, next).await {
        Ok(resp) => resp,
        Err(e) => grpc_error(ct.as_ref(), &e),
    }
}

async fn run(
    st: &IdempotencyState,
    rpc: &Rpc,
    path: &str,
    key: &str,
    body: Bytes,
    req: Request<Body>,
    next: Next,
) -> Result<Response<Body>, ApiError> {
    if key.len() > MAX_KEY_LEN || key.chars().any(char::is_control) {
        return Err(ApiError::invalid_field(
            "idempotency_key",
            format!("an idempotency key has at most {MAX_KEY_LEN} printable characters"),
        ));
    }
    if rpc.secret_response {
        return Err(ApiError::invalid_field(
            "idempotency_key",
            "this call's response carries a secret shown once, so it cannot be replayed: retry without an idempotency key",
        ));
    }
    let Some(caller) = req.extensions().get::<Caller>().cloned() else { return Ok(next.run(req).await) };
    let ct = req.headers().get(http::header::CONTENT_TYPE).cloned();
    let rkey = record_key(&caller.user_id, path, key);
    let hash = Sha256::digest(&body).to_vec();

    let existing = st.store.get::<IdempotencyRecord>(&rkey).await.map_err(store_error)?;
    if let Some(rec) = existing {
        return replay_or_refuse(&rec.value, &hash, ct.as_ref());
    }
    let lease = st.store.grant_lease(RETENTION).await.map_err(store_error)?;
    let pending = IdempotencyRecord {
        rpc: path.to_owned(),
        request_hash: hash.clone(),
        completed: false,
        response: Vec::new(),
        created_at: Some(now_ts()),
    };
    // The txn's revision is the record's mod_revision.
    let pending_rev = match st
        .store
        .commit(Batch::new().put_leased(&rkey, pending.encode_to_vec(), lease, Some(Expect::Absent)))
        .await
    {
        Ok(rev) => rev,
        Err(StoreError::AlreadyExists { .. }) => {
            // A concurrent call with the same key got there first.
            let rec =
                st.store.get::<IdempotencyRecord>(&rkey).await.map_err(store_error)?.ok_or_else(ApiError::internal)?;
            return replay_or_refuse(&rec.value, &hash, ct.as_ref());
        }
        Err(e) => return Err(store_error(e)),
    };

    let resp = next.run(req).await;
    let (parts, body) = resp.into_parts();
    let header_status = parts.headers.get("grpc-status").cloned();
    let collected = body.collect().await.map_err(|_| ApiError::internal())?;
    let trailers = collected.trailers().cloned();
    let mut data = collected.to_bytes();
    let status = header_status.or_else(|| trailers.as_ref().and_then(|t| t.get("grpc-status").cloned()));
    let ok = status.as_ref().is_some_and(|s| s == "0");
    if ok && data.len() >= 5 && data[0] == 0 {
        let mut d = data.clone();
        d.advance(5);
        let done = IdempotencyRecord { completed: true, response: d.to_vec(), ..pending };
        let batch = Batch::new().put_leased(&rkey, done.encode_to_vec(), lease, Some(Expect::Revision(pending_rev)));
        if let Err(e) = st.store.commit(batch).await {
            tracing::warn!(error = %e, "idempotency record not completed");
        }
    } else if let Err(e) = st.store.commit(Batch::new().delete(&rkey, Some(Expect::Revision(pending_rev)))).await {
        tracing::warn!(error = %e, "idempotency record not released");
    }
    // Hand the response on as it was.
    let mut frames = Vec::new();
    if !data.is_empty() {
        frames.push(Ok::<_, std::convert::Infallible>(http_body::Frame::data(data.split_to(data.len()))));
    }
    if let Some(t) = trailers {
        frames.push(Ok(http_body::Frame::trailers(t)));
    }
    Ok(Response::from_parts(parts, Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)))))
}

fn replay_or_refuse(
    rec: &IdempotencyRecord,
    hash: &[u8],
    ct: Option<&http::HeaderValue>,
) -> Result<Response<Body>, ApiError> {
    if rec.request_hash != hash {
        return Err(ApiError::new(
            ErrorCode::IdempotencyKeyMismatch,
            "this idempotency key was used with a different request",
        ));
    }
    if !rec.completed {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "a request with this idempotency key is still in progress; retry shortly",
        ));
    }
    tracing::debug!(rpc = %rec.rpc, "replaying a stored response");
    Ok(ok_response(ct, framed(&rec.response)))
}

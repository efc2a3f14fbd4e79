//! Idempotent retries of mutating calls: an `Idempotency-Key` header (REST,
//! or gRPC metadata) or a `request_id` field. The same key with the same
//! request replays the stored response for 24 h; the same key with another
//! request answers 409 idempotency_key_mismatch. Keys are per user and per
//! RPC, kept in etcd under a 24 h lease.
//!
//! A record never holds a bare hash of the request: it holds an HMAC under
//! a per-cluster secret ([`keys::IDEMPOTENCY_SECRET`], sealed at rest) of the
//! request with its secret fields left out (any field whose name contains
//! `password` or `secret`, is `token` or ends in `_token`), so a copy of
//! etcd does not let anyone test guesses of a password sent with a key.
//!
//! A call in progress holds its key under a short lease. A failed call
//! releases it; so does a cancelled one (the client's deadline passed or it
//! went away): a drop guard removes the in-progress marker. A retry that
//! finds a call in progress waits a moment for it to finish or vanish before
//! answering 409.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::middleware::Next;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::BodyExt;
use otherix_auth::token::Keyed;
use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::otherix::store::v1::IdempotencyRecord;
use otherix_store::{Batch, Expect, Store, StoreError, keys};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, MethodDescriptor, Value};
use sha2::{Digest, Sha256};

use crate::authz::grpc_error;
use crate::identity::{Caller, now_ts};
use crate::store_error::store_error;

/// How long a key is remembered.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Longest accepted key.
pub const MAX_KEY_LEN: usize = 255;
/// How long an in-progress marker outlives a replica that died holding it.
pub const IN_PROGRESS_LEASE: Duration = Duration::from_secs(600);
/// How long a retry waits for a call in progress with its key to end.
const WAIT_FOR_IN_PROGRESS: Duration = Duration::from_secs(3);

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
    secret: Arc<tokio::sync::OnceCell<Secret>>,
}

/// The HMAC key of request digests.
#[derive(Clone)]
struct Secret([u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
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
        IdempotencyState { store, rpcs: Arc::new(rpcs), max_bytes, secret: Arc::default() }
    }

    /// The cluster's secret, made by the first replica that needs it.
    async fn secret(&self) -> Result<&Secret, ApiError> {
        self.secret.get_or_try_init(|| load_secret(&self.store)).await
    }
}

fn secret_error(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, key = keys::IDEMPOTENCY_SECRET, "idempotency secret unavailable");
    ApiError::internal()
}

/// Reads (or creates, sealed) the idempotency secret; a value sealed with
/// an earlier key is sealed again with the current one.
async fn load_secret(store: &Store) -> Result<Secret, ApiError> {
    let sealer = store.sealer().map_err(secret_error)?;
    for _ in 0..4 {
        if let Some(v) = store.get::<Vec<u8>>(keys::IDEMPOTENCY_SECRET).await.map_err(store_error)? {
            let plain = sealer.open(&v.value, keys::IDEMPOTENCY_SECRET).map_err(secret_error)?;
            let secret: [u8; 32] = plain.as_slice().try_into().map_err(|_| secret_error("not 32 bytes"))?;
            if !sealer.is_current(&v.value) {
                let resealed = sealer.seal(&secret, keys::IDEMPOTENCY_SECRET).map_err(secret_error)?;
                let batch =
                    Batch::new().put(keys::IDEMPOTENCY_SECRET, &resealed, Some(Expect::Revision(v.mod_revision)));
                // Another replica resealing first is as good.
                let _ = store.commit(batch).await;
            }
            return Ok(Secret(secret));
        }
        let secret: [u8; 32] = otherix_auth::token::random_bytes(32).try_into().map_err(|_| ApiError::internal())?;
        let sealed = sealer.seal(&secret, keys::IDEMPOTENCY_SECRET).map_err(secret_error)?;
        match store.commit(Batch::new().put(keys::IDEMPOTENCY_SECRET, &sealed, Some(Expect::Absent))).await {
            Ok(_) => {
                tracing::info!(key = keys::IDEMPOTENCY_SECRET, "created the idempotency secret");
                return Ok(Secret(secret));
            }
            // Another replica made it first: read theirs.
            Err(StoreError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(store_error(e)),
        }
    }
    Err(secret_error("the secret kept changing"))
}

/// Whether a field carries a secret and stays out of the request digest.
/// `token_id` and the like name a token without being one.
pub fn is_secret_field(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("password") || n.contains("secret") || n == "token" || n.ends_with("_token")
}

fn tagged(mac: &mut Keyed, tag: u8, bytes: &[u8]) {
    mac.update(&[tag]);
    mac.update(bytes);
}

fn digest_value(mac: &mut Keyed, v: &Value) {
    let len = |mac: &mut Keyed, n: usize| mac.update(&(n as u64).to_be_bytes());
    match v {
        Value::Bool(b) => tagged(mac, b'b', &[u8::from(*b)]),
        Value::I32(i) => tagged(mac, b'i', &i.to_be_bytes()),
        Value::I64(i) => tagged(mac, b'l', &i.to_be_bytes()),
        Value::U32(i) => tagged(mac, b'u', &i.to_be_bytes()),
        Value::U64(i) => tagged(mac, b'v', &i.to_be_bytes()),
        Value::F32(f) => tagged(mac, b'f', &f.to_bits().to_be_bytes()),
        Value::F64(f) => tagged(mac, b'd', &f.to_bits().to_be_bytes()),
        Value::EnumNumber(i) => tagged(mac, b'e', &i.to_be_bytes()),
        Value::String(s) => {
            mac.update(b"s");
            len(mac, s.len());
            mac.update(s.as_bytes());
        }
        Value::Bytes(b) => {
            mac.update(b"y");
            len(mac, b.len());
            mac.update(b);
        }
        Value::Message(m) => digest_message(mac, m),
        Value::List(items) => {
            mac.update(b"[");
            len(mac, items.len());
            for i in items {
                digest_value(mac, i);
            }
        }
        Value::Map(map) => {
            mac.update(b"{");
            len(mac, map.len());
            // Map order is not fixed: sort, so equal requests digest alike.
            let mut entries: Vec<(&MapKey, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            for (k, v) in entries {
                digest_value(mac, &Value::from(k.clone()));
                digest_value(mac, v);
            }
        }
    }
}

/// Feeds a message's fields, in field-number order, secrets left out.
fn digest_message(mac: &mut Keyed, m: &DynamicMessage) {
    mac.update(b"(");
    for (field, value) in m.fields() {
        if is_secret_field(field.name()) {
            continue;
        }
        mac.update(&field.number().to_be_bytes());
        digest_value(mac, value);
    }
    mac.update(b")");
}

/// The HMAC a record keeps of a request: keyed, per RPC, secrets left out.
fn request_digest(secret: &Secret, rpc: &str, msg: &DynamicMessage) -> Vec<u8> {
    let mut mac = Keyed::new(&secret.0);
    mac.update(rpc.as_bytes());
    mac.update(&[0]);
    digest_message(&mut mac, msg);
    mac.finish()
}

fn record_key(user_id: &str, rpc: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(rpc.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    otherix_store::keys::idempotency(user_id, &otherix_auth::token::hex(&h.finalize()))
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
    let message = frame_payload(&body).and_then(|p| DynamicMessage::decode(rpc.input.input(), p).ok());
    let field_key = message
        .as_ref()
        .and_then(|m| m.get_field_by_name("request_id").and_then(|v| v.as_str().map(str::to_owned)))
        .filter(|s| !s.is_empty());
    let req = Request::from_parts(parts, Body::from(body));
    let Some(key) = header_key.filter(|k| !k.is_empty()).or(field_key) else { return next.run(req).await };
    match run(&st, &rpc, &path, &key, message, req, next).await {
        Ok(resp) => resp,
        Err(e) => grpc_error(ct.as_ref(), &e),
    }
}

/// Removes an in-progress marker when the call holding it ends without
/// settling it: its future was dropped (a client deadline, a disconnect).
struct InProgress {
    store: Store,
    key: String,
    mine: IdempotencyRecord,
    armed: bool,
}

impl InProgress {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let (store, key, mine) = (self.store.clone(), std::mem::take(&mut self.key), self.mine.clone());
        rt.spawn(async move {
            // The marker's write may still be on its way to etcd: look a few
            // times, and remove it only while it is this call's own marker.
            for _ in 0..5 {
                match store.get::<IdempotencyRecord>(&key).await {
                    Ok(Some(cur)) if cur.value == mine => {
                        let batch = Batch::new().delete(&key, Some(Expect::Revision(cur.mod_revision)));
                        if let Err(e) = store.commit(batch).await {
                            tracing::debug!(error = %e, "cancelled call's idempotency key not released");
                        } else {
                            tracing::debug!(rpc = %mine.rpc, "cancelled call released its idempotency key");
                        }
                        return;
                    }
                    Ok(Some(_)) => return,
                    Ok(None) => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "cancelled call's idempotency key not released");
                        return;
                    }
                }
            }
        });
    }
}

async fn run(
    st: &IdempotencyState,
    rpc: &Rpc,
    path: &str,
    key: &str,
    message: Option<DynamicMessage>,
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
    let Some(message) = message else {
        return Err(ApiError::invalid_field(
            "idempotency_key",
            "an idempotent call needs one uncompressed, well-formed request message",
        ));
    };
    let ct = req.headers().get(http::header::CONTENT_TYPE).cloned();
    let rkey = record_key(&caller.user_id, path, key);
    let digest = request_digest(st.secret().await?, path, &message);
    drop(message);

    let mut waited_until = None::<Instant>;
    let (pending, pending_rev, guard) = loop {
        if let Some(rec) = st.store.get::<IdempotencyRecord>(&rkey).await.map_err(store_error)? {
            if rec.value.request_hash != digest || rec.value.completed {
                return replay_or_refuse(&rec.value, &digest, ct.as_ref());
            }
            // In progress: wait a moment for it to finish (replay) or to be
            // released (a cancelled or failed call), then take the key.
            let deadline = *waited_until.get_or_insert_with(|| Instant::now() + WAIT_FOR_IN_PROGRESS);
            if Instant::now() >= deadline {
                return replay_or_refuse(&rec.value, &digest, ct.as_ref());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let lease = st.store.grant_lease(IN_PROGRESS_LEASE).await.map_err(store_error)?;
        let pending = IdempotencyRecord {
            rpc: path.to_owned(),
            request_hash: digest.clone(),
            completed: false,
            response: Vec::new(),
            created_at: Some(now_ts()),
        };
        // Armed before the write: if this future is dropped while the write
        // is in flight, the marker is still looked for and removed.
        let mut guard = InProgress { store: st.store.clone(), key: rkey.clone(), mine: pending.clone(), armed: true };
        match st
            .store
            .commit(Batch::new().put_leased(&rkey, pending.encode_to_vec(), lease, Some(Expect::Absent)))
            .await
        {
            // The txn's revision is the record's mod_revision.
            Ok(rev) => break (pending, rev, guard),
            // A concurrent call with the same key got there first.
            Err(StoreError::AlreadyExists { .. }) => {
                guard.disarm();
                continue;
            }
            Err(e) => {
                guard.disarm();
                return Err(store_error(e));
            }
        }
    };
    let mut guard = guard;

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
        let stored = match st.store.grant_lease(RETENTION).await {
            Ok(lease) => {
                let batch =
                    Batch::new().put_leased(&rkey, done.encode_to_vec(), lease, Some(Expect::Revision(pending_rev)));
                st.store.commit(batch).await.map(|_| ())
            }
            Err(e) => Err(e),
        };
        match stored {
            Ok(()) => guard.disarm(),
            // The guard releases the key: a retry runs again rather than
            // waiting on a marker nobody completes.
            Err(e) => tracing::warn!(error = %e, "idempotency record not completed"),
        }
    } else {
        // A failed call releases its key at once, so a retry runs again.
        match st.store.commit(Batch::new().delete(&rkey, Some(Expect::Revision(pending_rev)))).await {
            Ok(_) => guard.disarm(),
            Err(e) => tracing::warn!(error = %e, "idempotency record not released"),
        }
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
    digest: &[u8],
    ct: Option<&http::HeaderValue>,
) -> Result<Response<Body>, ApiError> {
    if rec.request_hash != digest {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_fields_are_left_out_of_the_digest_and_names_of_tokens_are_not() {
        for f in ["password", "current_password", "new_password", "client_secret", "token", "refresh_token"] {
            assert!(is_secret_field(f), "{f}");
        }
        for f in ["token_id", "username", "role", "request_id", "description"] {
            assert!(!is_secret_field(f), "{f}");
        }
    }

    #[test]
    fn the_digest_is_keyed_and_ignores_secrets() {
        let pool = DescriptorPool::decode(otherix_proto::FILE_DESCRIPTOR_SET).unwrap();
        let desc = pool.get_message_by_name("otherix.v1.UpdateUserRequest").unwrap();
        let msg = |password: &str, name: &str| {
            let mut m = DynamicMessage::new(desc.clone());
            m.set_field_by_name("user", Value::String("dana".into()));
            m.set_field_by_name("password", Value::String(password.into()));
            m.set_field_by_name("display_name", Value::String(name.into()));
            m
        };
        let (a, b) = (Secret([1; 32]), Secret([2; 32]));
        let d = request_digest(&a, "/x", &msg("pw-one-123456", "Dana"));
        assert_eq!(d, request_digest(&a, "/x", &msg("pw-two-123456", "Dana")));
        assert_ne!(d, request_digest(&a, "/x", &msg("pw-one-123456", "Dana O.")));
        assert_ne!(d, request_digest(&b, "/x", &msg("pw-one-123456", "Dana")));
        assert_ne!(d, request_digest(&a, "/y", &msg("pw-one-123456", "Dana")));
        assert!(!format!("{a:?}").contains('1'));
    }
}

//! Reads what is left of a request body before a final answer goes out.
//!
//! A server that answers (a 401, a 413) while the client is still sending the
//! body, then closes, makes the client's kernel see unread data and reset
//! the connection: the client gets EPIPE or "connection reset" instead of the
//! answer. So every final answer waits until the body has been read to its
//! end, up to a bound; only a body beyond the bound is cut off.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as _, Frame, SizeHint};

/// How much of an unwanted body is read and thrown away, at most.
pub const DRAIN_LIMIT_BYTES: u64 = 64 * 1024 * 1024;
/// How long reading an unwanted body may take, at most.
pub const DRAIN_TIME_LIMIT: Duration = Duration::from_secs(30);

struct Shared {
    body: Mutex<Body>,
    polled: AtomicBool,
}

/// A request body the drain layer can finish reading after the handler.
struct SharedBody(Arc<Shared>);

impl http_body::Body for SharedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.0.polled.store(true, Ordering::Relaxed);
        let mut body = self.0.body.lock().unwrap_or_else(|e| e.into_inner());
        Pin::new(&mut *body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.body.lock().unwrap_or_else(|e| e.into_inner()).is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.body.lock().unwrap_or_else(|e| e.into_inner()).size_hint()
    }
}

/// Whether the answer ends the exchange: anything but a gRPC response still
/// streaming (whose status comes in trailers, with the request possibly
/// still streaming in too).
fn is_final(resp: &Response<Body>) -> bool {
    let grpc = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    !grpc || resp.headers().contains_key("grpc-status")
}

/// Runs `inner` on the request, then reads the rest of the request body (at
/// most [`DRAIN_LIMIT_BYTES`], for at most [`DRAIN_TIME_LIMIT`]) before
/// returning a final answer.
pub async fn call_draining<S>(mut inner: S, req: Request<Body>) -> Result<Response<Body>, S::Error>
where
    S: tower::Service<Request<Body>, Response = Response<Body>>,
{
    let expects_continue =
        req.headers().get(http::header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (parts, body) = req.into_parts();
    let shared = Arc::new(Shared { body: Mutex::new(body), polled: AtomicBool::new(false) });
    let req = Request::from_parts(parts, Body::new(SharedBody(shared.clone())));
    futures::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
    let resp = inner.call(req).await?;
    // A client waiting for 100 Continue has sent nothing yet: asking for the
    // body would make it send what nobody reads.
    if !is_final(&resp) || (expects_continue && !shared.polled.load(Ordering::Relaxed)) {
        return Ok(resp);
    }
    let drained = tokio::time::timeout(DRAIN_TIME_LIMIT, drain(&shared)).await;
    if !matches!(drained, Ok(true)) {
        tracing::debug!("request body left unread: over the drain limit");
    }
    Ok(resp)
}

/// Reads and drops frames until the end; false past the byte limit or on a read error.
async fn drain(shared: &Shared) -> bool {
    let mut seen = 0u64;
    loop {
        let frame = futures::future::poll_fn(|cx| {
            let mut body = shared.body.lock().unwrap_or_else(|e| e.into_inner());
            if body.is_end_stream() {
                return Poll::Ready(None);
            }
            Pin::new(&mut *body).poll_frame(cx)
        })
        .await;
        match frame {
            None => return true,
            Some(Err(_)) => return false,
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    seen += d.len() as u64;
                    if seen > DRAIN_LIMIT_BYTES {
                        return false;
                    }
                }
            }
        }
    }
}

/// A tower layer applying [`call_draining`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DrainLayer;

impl<S> tower::Layer<S> for DrainLayer {
    type Service = Drain<S>;
    fn layer(&self, inner: S) -> Drain<S> {
        Drain { inner }
    }
}

/// The service [`DrainLayer`] builds.
#[derive(Debug, Clone)]
pub struct Drain<S> {
    inner: S,
}

impl<S> tower::Service<Request<Body>> for Drain<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(call_draining(inner, req))
    }
}

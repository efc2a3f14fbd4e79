//! Cross-origin access for browsers: preflights and response headers for
//! grpc-web and REST, for the origins the operator allows (none by default).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};

/// Request headers a browser may send cross-origin.
const ALLOWED_HEADERS: &str = "authorization, content-type, x-grpc-web, x-user-agent, grpc-timeout, \
     idempotency-key, if-match, traceparent, tracestate, x-request-id, connect-protocol-version, connect-timeout-ms";
/// Response headers a cross-origin page may read: the gRPC status travels in them.
const EXPOSED_HEADERS: &str = "grpc-status, grpc-message, grpc-status-details-bin, retry-after, allow, etag";
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE";
/// How long a browser may cache a preflight answer, in seconds.
const MAX_AGE: &str = "600";

/// An allowed origin pattern could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid allowed origin {origin:?}: {reason}")]
pub struct OriginError {
    /// The pattern as configured.
    pub origin: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// One allowed origin: `scheme://host[:port]`, where the port may be `*`
/// (any port) and the host may start with `*.` (any subdomain).
#[derive(Debug, Clone, PartialEq, Eq)]
struct OriginPattern {
    scheme: String,
    host: String,
    port: Option<String>,
}

impl OriginPattern {
    fn parse(text: &str) -> Result<OriginPattern, OriginError> {
        let err = |reason| OriginError { origin: text.to_owned(), reason };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| err("must be scheme://host[:port]"))?;
        if scheme != "http" && scheme != "https" {
            return Err(err("the scheme must be http or https"));
        }
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return Err(err("must be scheme://host[:port], without a path"));
        }
        let (host, port) = if rest.starts_with('[') {
            // An IPv6 literal: `[::1]` or `[::1]:8080`.
            let close = rest.find(']').ok_or_else(|| err("unclosed '['"))?;
            match &rest[close + 1..] {
                "" => (rest, None),
                p => (&rest[..=close], Some(p.strip_prefix(':').ok_or_else(|| err("bad port"))?)),
            }
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if let Some(p) = port
            && p != "*"
            && p.parse::<u16>().is_err()
        {
            return Err(err("the port must be a number or *"));
        }
        let bare = host.strip_prefix("*.").unwrap_or(host);
        if bare.is_empty() || bare.contains('*') {
            return Err(err("only a leading *. is allowed in the host"));
        }
        Ok(OriginPattern { scheme: scheme.to_owned(), host: host.to_ascii_lowercase(), port: port.map(str::to_owned) })
    }

    fn matches(&self, origin: &str) -> bool {
        let Ok(o) = OriginPattern::parse(origin) else { return false };
        if o.scheme != self.scheme || o.host.contains('*') || o.port.as_deref() == Some("*") {
            return false;
        }
        let host_ok = match self.host.strip_prefix("*.") {
            Some(suffix) => o.host.strip_suffix(suffix).is_some_and(|h| h.ends_with('.') && h.len() > 1),
            None => o.host == self.host,
        };
        let port_ok = match self.port.as_deref() {
            Some("*") => true,
            want => want == o.port.as_deref(),
        };
        host_ok && port_ok
    }
}

/// The origins allowed to call the API from a browser.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    allowed: Vec<OriginPattern>,
}

impl Cors {
    /// Parses the configured patterns.
    pub fn new<S: AsRef<str>>(origins: &[S]) -> Result<Cors, OriginError> {
        Ok(Cors { allowed: origins.iter().map(|o| OriginPattern::parse(o.as_ref())).collect::<Result<_, _>>()? })
    }

    /// Whether a request's `Origin` is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        self.allowed.iter().any(|p| p.matches(origin))
    }

    /// The answer to a preflight, or `None` when `req` is not one.
    fn preflight(&self, req: &Request<Body>) -> Option<Response<Body>> {
        if req.method() != Method::OPTIONS {
            return None;
        }
        let origin = req.headers().get(header::ORIGIN)?;
        req.headers().get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        if origin.to_str().is_ok_and(|o| self.allows(o)) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOWED_METHODS));
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOWED_HEADERS));
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
        }
        Some(resp)
    }

    fn decorate(&self, origin: Option<&HeaderValue>, resp: &mut Response<Body>) {
        let Some(origin) = origin else { return };
        let h = resp.headers_mut();
        h.append(header::VARY, HeaderValue::from_static("Origin"));
        if origin.to_str().is_ok_and(|o| self.allows(o)) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED_HEADERS));
        }
    }
}

/// A tower layer answering preflights and adding CORS headers.
#[derive(Debug, Clone, Default)]
pub struct CorsLayer(Arc<Cors>);

impl CorsLayer {
    /// A layer for `cors`.
    pub fn new(cors: Cors) -> CorsLayer {
        CorsLayer(Arc::new(cors))
    }
}

impl<S> tower::Layer<S> for CorsLayer {
    type Service = CorsService<S>;
    fn layer(&self, inner: S) -> CorsService<S> {
        CorsService { cors: self.0.clone(), inner }
    }
}

/// The service [`CorsLayer`] builds.
#[derive(Debug, Clone)]
pub struct CorsService<S> {
    cors: Arc<Cors>,
    inner: S,
}

impl<S> tower::Service<Request<Body>> for CorsService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let cors = self.cors.clone();
        if let Some(resp) = cors.preflight(&req) {
            return Box::pin(async move { Ok(resp) });
        }
        let origin = req.headers().get(header::ORIGIN).cloned();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            cors.decorate(origin.as_ref(), &mut resp);
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let c =
            Cors::new(&["http://localhost:*", "https://console.example.com", "https://*.example.org:8443"]).unwrap();
        // `:*` takes any port, the scheme's default included.
        for ok in [
            "http://localhost",
            "http://localhost:3000",
            "http://localhost:1",
            "https://console.example.com",
            "https://a.example.org:8443",
        ] {
            assert!(c.allows(ok), "{ok}");
        }
        for no in [
            "https://localhost:3000",
            "http://localhost.evil.com:3000",
            "https://console.example.com:444",
            "https://evil-console.example.com",
            "https://example.org:8443",
            "https://a.example.org",
            "null",
            "",
        ] {
            assert!(!c.allows(no), "{no}");
        }
        assert!(!Cors::default().allows("http://localhost:3000"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["localhost:3000", "ftp://x", "http://x/path", "http://x:port", "http://a*b", "http://"] {
            assert!(Cors::new(&[bad]).is_err(), "{bad}");
        }
    }
}

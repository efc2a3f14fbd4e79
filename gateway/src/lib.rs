//! REST/JSON transcoding built at start-up from the protos' `google.api.http`
//! annotations.
//!
//! Each REST call becomes a gRPC call to the same in-process router that
//! serves gRPC clients, so authorization, tracing and errors are shared.
//! JSON follows the proto3 mapping with the proto field names (snake_case) on
//! output, lowerCamelCase accepted on input, enums by name, timestamps in
//! RFC 3339 with `Z`, and 64-bit integers as JSON numbers.

use otherix_proto_json as json;
pub mod cors;
pub mod drain;
pub mod openapi;
pub mod template;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use otherix_errors::{ApiError, ErrorCode};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, MessageDescriptor, MethodDescriptor, Value};
use serde_json::Value as Json;
use tower::ServiceExt;

pub use template::PathTemplate;

/// Headers passed from a REST request into the gRPC call as metadata.
const FORWARDED_HEADERS: &[&str] =
    &["authorization", "traceparent", "tracestate", "idempotency-key", "x-request-id", "user-agent"];

/// A descriptor or annotation problem found while building the routes.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The descriptor set could not be decoded.
    #[error("cannot decode the descriptor set")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    /// An annotation is malformed.
    #[error("{method}: {reason}")]
    Rule {
        /// The RPC.
        method: String,
        /// What is wrong.
        reason: String,
    },
    /// A literal path segment of one route can be captured by a variable of
    /// another, so a resource named like the literal would be unreachable.
    #[error(
        "route collision: {literal:?} in {literal_route} can be captured by {{{field}}} in {variable_route}; \
         reserve it on the field with (otherix.v1.reserved_segments) and refuse it as a name, or move a route"
    )]
    Collision {
        /// The route with the literal segment.
        literal_route: String,
        /// The literal.
        literal: String,
        /// The route with the variable.
        variable_route: String,
        /// The variable's field path (empty for a bare `*`).
        field: String,
    },
    /// A path template is malformed.
    #[error("{method}: {source}")]
    Template {
        /// The RPC.
        method: String,
        /// The parse error.
        #[source]
        source: template::TemplateError,
    },
}

/// Marks a request that arrived over REST, for layers that want to know.
/// It is an extension, never a header, so no client can forge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViaRest;

/// Where the request body goes.
#[derive(Debug, Clone)]
enum BodyRule {
    None,
    Whole,
    Field(FieldDescriptor),
}

/// One HTTP binding of an RPC.
#[derive(Debug, Clone)]
pub struct Route {
    http_method: Method,
    template: PathTemplate,
    method: MethodDescriptor,
    grpc_path: String,
    body: BodyRule,
    response_body: Option<FieldDescriptor>,
}

impl Route {
    /// The HTTP method.
    pub fn http_method(&self) -> &Method {
        &self.http_method
    }
    /// The path template.
    pub fn template(&self) -> &PathTemplate {
        &self.template
    }
    /// The RPC's full name, e.g. `otherix.v1.ClusterService.GetDefaultPool`.
    pub fn rpc(&self) -> &str {
        self.method.full_name()
    }
    /// The RPC's gRPC path, e.g. `/otherix.v1.ClusterService/GetDefaultPool`.
    pub fn grpc_path(&self) -> &str {
        &self.grpc_path
    }
    /// The RPC's descriptor.
    pub fn method(&self) -> &MethodDescriptor {
        &self.method
    }
}

/// Authenticates and authorizes a REST call before its body is validated,
/// so an anonymous caller learns nothing about the request's shape. It may
/// put what it learned (the caller) into `parts.extensions`, which travel
/// with the gRPC call.
pub trait Authorizer: Send + Sync + 'static {
    /// Checks the caller of the RPC at `grpc_path`.
    fn authorize<'a>(
        &'a self,
        grpc_path: &'a str,
        parts: &'a mut http::request::Parts,
    ) -> futures::future::BoxFuture<'a, Result<(), ApiError>>;
}

/// Settings for the gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Time limit for one call.
    pub request_timeout: Duration,
}

/// The REST gateway in front of an in-process gRPC router.
#[derive(Clone)]
pub struct Gateway {
    routes: std::sync::Arc<Vec<Route>>,
    inner: axum::Router,
    config: GatewayConfig,
    authorizer: Option<std::sync::Arc<dyn Authorizer>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("routes", &self.routes.len()).finish()
    }
}

/// Reads the routes of every RPC in `pool` whose package starts with
/// `package_prefix` and that carries a `google.api.http` annotation.
pub fn routes_from_pool(pool: &DescriptorPool, package_prefix: &str) -> Result<Vec<Route>, GatewayError> {
    let Some(http_ext) = pool.get_extension_by_name("google.api.http") else {
        return Ok(Vec::new());
    };
    let mut routes = Vec::new();
    for service in pool.services().filter(|s| s.package_name().starts_with(package_prefix)) {
        for method in service.methods() {
            let opts = method.options();
            if !opts.has_extension(&http_ext) {
                continue;
            }
            let rule = match opts.get_extension(&http_ext).as_ref() {
                Value::Message(m) => m.clone(),
                _ => continue,
            };
            if method.is_client_streaming() || method.is_server_streaming() {
                return Err(GatewayError::Rule {
                    method: method.full_name().to_owned(),
                    reason: "streaming RPCs cannot carry a google.api.http binding".into(),
                });
            }
            add_rule(&mut routes, &method, &rule, true)?;
        }
    }
    check_collisions(pool, &routes)?;
    Ok(routes)
}

/// Refuses a route table where a literal segment of one route could be taken
/// by a variable of another (`/v1/nodes/join-tokens` against
/// `/v1/nodes/{name}`), unless the variable's field lists the literal in its
/// `otherix.v1.reserved_segments` option, meaning no resource may take that name.
pub fn check_collisions(pool: &DescriptorPool, routes: &[Route]) -> Result<(), GatewayError> {
    let reserved_ext = pool.get_extension_by_name("otherix.v1.reserved_segments");
    let reserved = |route: &Route, field: &str, literal: &str| -> bool {
        let (Some(ext), Some(f)) = (&reserved_ext, resolve_path(&route.method.input(), field)) else {
            return false;
        };
        let opts = f.options();
        if !opts.has_extension(ext) {
            return false;
        }
        match opts.get_extension(ext).as_ref() {
            Value::List(items) => items.iter().any(|v| v.as_str() == Some(literal)),
            _ => false,
        }
    };
    for a in routes {
        for b in routes {
            for (literal, field) in a.template.captured_literals(&b.template) {
                if field.is_empty() || !reserved(b, field, literal) {
                    return Err(GatewayError::Collision {
                        literal_route: format!("{} {}", a.http_method, a.template.as_str()),
                        literal: literal.to_owned(),
                        variable_route: format!("{} {}", b.http_method, b.template.as_str()),
                        field: field.to_owned(),
                    });
                }
            }
        }
    }
    Ok(())
}

fn add_rule(
    routes: &mut Vec<Route>,
    method: &MethodDescriptor,
    rule: &DynamicMessage,
    top: bool,
) -> Result<(), GatewayError> {
    let rule_err = |reason: String| GatewayError::Rule { method: method.full_name().to_owned(), reason };
    let str_field = |name: &str| match rule.get_field_by_name(name).as_deref() {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let mut binding = None;
    for (name, verb) in [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ] {
        if rule.has_field_by_name(name) {
            binding = Some((verb, str_field(name)));
        }
    }
    if rule.has_field_by_name("custom")
        && let Some(Value::Message(custom)) = rule.get_field_by_name("custom").as_deref()
    {
        let kind = match custom.get_field_by_name("kind").as_deref() {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let path = match custom.get_field_by_name("path").as_deref() {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let verb = Method::from_bytes(kind.as_bytes()).map_err(|_| rule_err(format!("bad custom method {kind:?}")))?;
        binding = Some((verb, path));
    }
    let (http_method, path) = binding.ok_or_else(|| rule_err("google.api.http has no pattern".into()))?;
    let template = PathTemplate::parse(&path)
        .map_err(|source| GatewayError::Template { method: method.full_name().to_owned(), source })?;
    let input = method.input();
    for f in template.fields() {
        let field = resolve_path(&input, f)
            .ok_or_else(|| rule_err(format!("path variable {f} is not a field of {}", input.full_name())))?;
        if field.is_list() || field.is_map() {
            return Err(rule_err(format!("path variable {f} is repeated")));
        }
    }
    let body = match str_field("body").as_str() {
        "" => BodyRule::None,
        "*" => BodyRule::Whole,
        name => BodyRule::Field(
            input.get_field_by_name(name).ok_or_else(|| rule_err(format!("body field {name} not found")))?,
        ),
    };
    if matches!(http_method, Method::GET | Method::DELETE) && !matches!(body, BodyRule::None) {
        return Err(rule_err(format!("{http_method} bindings take no body")));
    }
    let response_body = match str_field("response_body").as_str() {
        "" => None,
        name => Some(
            method
                .output()
                .get_field_by_name(name)
                .ok_or_else(|| rule_err(format!("response_body field {name} not found")))?,
        ),
    };
    let grpc_path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    routes.push(Route { http_method, template, method: method.clone(), grpc_path, body, response_body });
    if let Some(Value::List(extra)) = rule.get_field_by_name("additional_bindings").as_deref() {
        if !top && !extra.is_empty() {
            return Err(rule_err("additional_bindings may not nest".into()));
        }
        for b in extra {
            if let Value::Message(b) = b {
                add_rule(routes, method, b, false)?;
            }
        }
    }
    Ok(())
}

/// Finds the field a dotted path names (`vm.name`), through singular messages.
fn resolve_path(msg: &MessageDescriptor, path: &str) -> Option<FieldDescriptor> {
    let mut desc = msg.clone();
    let mut parts = path.split('.').peekable();
    while let Some(p) = parts.next() {
        let f = desc.get_field_by_name(p).or_else(|| desc.get_field_by_json_name(p))?;
        if parts.peek().is_none() {
            return Some(f);
        }
        if f.is_list() || f.is_map() {
            return None;
        }
        desc = f.kind().as_message()?.clone();
    }
    None
}

impl Gateway {
    /// A gateway over `routes` that calls `inner`, the gRPC router.
    pub fn new(routes: Vec<Route>, inner: axum::Router, config: GatewayConfig) -> Gateway {
        Gateway { routes: std::sync::Arc::new(routes), inner, config, authorizer: None }
    }

    /// Checks every call with `authorizer` before reading its fields.
    pub fn with_authorizer(mut self, authorizer: std::sync::Arc<dyn Authorizer>) -> Gateway {
        self.authorizer = Some(authorizer);
        self
    }

    /// The routes it serves.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The methods served on a path (HEAD with GET), for `Allow`.
    fn allowed(&self, path: &str) -> Vec<Method> {
        let mut out: Vec<Method> = Vec::new();
        for r in self.routes.iter().filter(|r| r.template.matches(path).is_some()) {
            if !out.contains(&r.http_method) {
                out.push(r.http_method.clone());
            }
            if r.http_method == Method::GET && !out.contains(&Method::HEAD) {
                out.push(Method::HEAD);
            }
        }
        out
    }

    fn find(&self, method: &Method, path: &str) -> Option<(&Route, Vec<template::Binding>)> {
        let method = if *method == Method::HEAD { &Method::GET } else { method };
        let mut best: Option<(&Route, Vec<template::Binding>)> = None;
        for r in self.routes.iter().filter(|r| r.http_method == *method) {
            if let Some(b) = r.template.matches(path)
                && best.as_ref().is_none_or(|(cur, _)| r.template.specificity() > cur.template.specificity())
            {
                best = Some((r, b));
            }
        }
        best
    }

    /// Serves one REST request.
    pub async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let head = req.method() == Method::HEAD;
        let mut resp = match self.try_handle(req).await {
            Ok(resp) => resp,
            Err(e) => error_response(&e),
        };
        if head {
            // HEAD answers what GET would, without the body.
            let len = http_body::Body::size_hint(resp.body()).exact();
            *resp.body_mut() = Body::empty();
            if let Some(len) = len {
                resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            }
        }
        resp
    }

    async fn try_handle(&self, req: Request<Body>) -> Result<Response<Body>, ApiError> {
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let Some((route, bindings)) = self.find(&parts.method, &path) else {
            let allowed = self.allowed(&path);
            if !allowed.is_empty() {
                let list: Vec<&str> = allowed.iter().map(Method::as_str).collect();
                let e =
                    ApiError::new(ErrorCode::MethodNotAllowed, format!("{} is not allowed on {path}", parts.method))
                        .with_detail("allow", list.join(", "));
                return Err(e);
            }
            return Err(not_found(&path));
        };
        // The body is read in full before anything is answered, refusals
        // included (see `drain` for why); only an announced oversize body is
        // refused first, and the drain layer reads it after.
        if let Some(len) = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            && len > self.config.max_body_bytes as u64
        {
            return Err(too_large(self.config.max_body_bytes));
        }
        let raw = match Limited::new(body, self.config.max_body_bytes).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                return Err(too_large(self.config.max_body_bytes));
            }
            Err(_) => return Err(ApiError::invalid_field("body", "the request body could not be read")),
        };
        // Who is calling comes before what the call says.
        if let Some(a) = &self.authorizer {
            a.authorize(&route.grpc_path, &mut parts).await?;
        }
        let has_body = !raw.iter().all(u8::is_ascii_whitespace);
        if has_body && let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default();
            let essence = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(ApiError::new(
                    ErrorCode::UnsupportedMediaType,
                    format!("request bodies are JSON: Content-Type {ct:?} is not application/json"),
                )
                .with_detail("content_type", ct));
            }
        }
        let input = route.method.input();
        let mut msg = DynamicMessage::new(input.clone());
        match &route.body {
            BodyRule::None => {
                if !raw.iter().all(u8::is_ascii_whitespace) {
                    return Err(ApiError::invalid_field(
                        "body",
                        format!("{} {} takes no request body", parts.method, route.template.as_str()),
                    ));
                }
            }
            BodyRule::Whole => json::merge_body(&mut msg, None, &raw)?,
            BodyRule::Field(f) => json::merge_body(&mut msg, Some(f), &raw)?,
        }
        let mut bound: Vec<String> = bindings.iter().map(|(f, _)| f.clone()).collect();
        if let BodyRule::Field(f) = &route.body {
            bound.push(f.name().to_owned());
        }
        let query: Vec<(String, String)> = parts
            .uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
            .unwrap_or_default();
        if matches!(route.body, BodyRule::Whole) && !query.is_empty() {
            return Err(ApiError::invalid_field(
                &query[0].0,
                format!("{} takes its fields in the body, not the query", route.template.as_str()),
            ));
        }
        json::merge_params(&mut msg, &query, &bound, "query parameter")?;
        // A body that names another resource than the path is a mistake, not
        // something to resolve silently in favour of either.
        let mut from_path = DynamicMessage::new(input.clone());
        json::merge_params(&mut from_path, &bindings, &[], "path parameter")?;
        for (field, value) in &bindings {
            if let Some(given) = json::get_path(&msg, field)
                && Some(&given) != json::get_path(&from_path, field).as_ref()
            {
                return Err(ApiError::invalid_field(
                    field,
                    format!("the body's {field} contradicts the path, which says {value:?}"),
                ));
            }
        }
        json::merge_params(&mut msg, &bindings, &[], "path parameter")?;
        if_match(&mut msg, &parts.headers)?;

        let grpc_req = self.grpc_request(route, &parts.headers, &parts.extensions, msg.encode_to_vec())?;
        let call = self.inner.clone().oneshot(grpc_req);
        let resp = match tokio::time::timeout(self.config.request_timeout, call).await {
            Ok(Ok(r)) => r,
            Ok(Err(never)) => match never {},
            Err(_) => {
                return Err(ApiError::new(
                    ErrorCode::RequestTimeout,
                    format!("the request did not finish within {:?}", self.config.request_timeout),
                ));
            }
        };
        let out = read_unary(resp, &route.method.output()).await?;
        let rendered = match &route.response_body {
            Some(f) => json::field_to_json(&out, f)?,
            None => json::message_to_json(&out)?,
        };
        let etag = rendered.get("etag").and_then(Json::as_str).filter(|e| !e.is_empty()).map(|e| format!("\"{e}\""));
        let body = serde_json::to_vec(&rendered).map_err(|_| ApiError::internal())?;
        let mut resp = json_response(StatusCode::OK, body);
        if let Some(v) = etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
            resp.headers_mut().insert(header::ETAG, v);
        }
        Ok(resp)
    }

    fn grpc_request(
        &self,
        route: &Route,
        headers: &HeaderMap,
        extensions: &http::Extensions,
        payload: Vec<u8>,
    ) -> Result<Request<Body>, ApiError> {
        let mut framed = BytesMut::with_capacity(payload.len() + 5);
        framed.put_u8(0);
        framed.put_u32(u32::try_from(payload.len()).map_err(|_| too_large(self.config.max_body_bytes))?);
        framed.put_slice(&payload);
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(&route.grpc_path)
            .version(http::Version::HTTP_2)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(Body::from(framed.freeze()))
            .map_err(|_| ApiError::internal())?;
        for name in FORWARDED_HEADERS {
            for v in headers.get_all(*name) {
                req.headers_mut().append(*name, v.clone());
            }
        }
        *req.extensions_mut() = extensions.clone();
        req.extensions_mut().insert(ViaRest);
        Ok(req)
    }
}

/// Carries an `If-Match` header into the request's `etag` field (for RPCs
/// that take one): a strong etag in quotes, `*` meaning any. A weak etag, a
/// list, or a body etag that contradicts the header is refused.
fn if_match(msg: &mut DynamicMessage, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(raw) = headers.get(header::IF_MATCH) else { return Ok(()) };
    let bad = |why: &str| ApiError::invalid_field("If-Match", why.to_owned());
    let Some(field) = prost_reflect::ReflectMessage::descriptor(msg).get_field_by_name("etag") else {
        return Err(bad("this endpoint does not take If-Match"));
    };
    let v = raw.to_str().map_err(|_| bad("If-Match is not text"))?.trim();
    if v == "*" {
        return Ok(());
    }
    let Some(tag) = v.strip_prefix('"').and_then(|t| t.strip_suffix('"')).filter(|t| !t.contains('"')) else {
        return Err(bad("If-Match takes one strong etag in double quotes (or *)"));
    };
    if let Value::String(given) = msg.get_field(&field).as_ref()
        && !given.is_empty()
        && given != tag
    {
        return Err(bad("the body's etag contradicts If-Match"));
    }
    msg.set_field(&field, Value::String(tag.to_owned()));
    Ok(())
}

/// Reads a unary gRPC response: the status from headers or trailers, then the one message.
async fn read_unary(resp: Response<Body>, output: &MessageDescriptor) -> Result<DynamicMessage, ApiError> {
    let (parts, body) = resp.into_parts();
    if let Some(status) = tonic::Status::from_header_map(&parts.headers)
        && status.code() != tonic::Code::Ok
    {
        return Err(ApiError::from_status(&status));
    }
    let collected = body.collect().await.map_err(|_| ApiError::internal())?;
    let trailers = collected.trailers().cloned();
    let mut data = collected.to_bytes();
    if let Some(t) = &trailers
        && let Some(status) = tonic::Status::from_header_map(t)
        && status.code() != tonic::Code::Ok
    {
        return Err(ApiError::from_status(&status));
    }
    if data.len() < 5 || data[0] != 0 {
        tracing::error!(len = data.len(), "malformed gRPC frame from the in-process router");
        return Err(ApiError::internal());
    }
    data.advance(1);
    let len = data.get_u32() as usize;
    if data.len() < len {
        return Err(ApiError::internal());
    }
    let payload: Bytes = data.split_to(len);
    DynamicMessage::decode(output.clone(), payload).map_err(|_| ApiError::internal())
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Renders an error as the documented JSON envelope with its HTTP status.
pub fn error_response(e: &ApiError) -> Response<Body> {
    let body = serde_json::to_vec(&e.to_json()).unwrap_or_default();
    let mut resp = json_response(e.code.http_status(), body);
    if let Some(Json::String(allow)) = e.details.get("allow")
        && let Ok(v) = HeaderValue::from_str(allow)
    {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    if let Some(secs) = e.retry_after_seconds() {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp
}

/// The JSON 404 for a path nothing serves.
pub fn not_found(path: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no route for {path}"))
        .with_detail("kind", "route")
        .with_detail("name", path)
        .with_detail("path", path)
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(ErrorCode::PayloadTooLarge, format!("the request body exceeds {limit} bytes"))
        .with_detail("limit_bytes", limit as u64)
}

/// A tower service wrapper so the gateway can sit in an axum router.
impl tower::Service<Request<Body>> for Gateway {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

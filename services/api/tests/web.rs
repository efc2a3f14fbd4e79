//! What a browser, a proxy or a hand-written HTTP client sees: refusals that
//! never reset the connection, authentication before validation, the HTTP
//! semantics of the REST surface (Allow, HEAD, 415, path/body agreement),
//! CORS, and what each listener advertises.

mod common;

use std::time::Duration;

use common::Harness;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 exchange over a raw socket: the head, a pause, then the body
/// (in pieces), then everything the server sends until it closes. An error
/// (a reset, a broken pipe) is returned, not hidden.
async fn raw_exchange(
    addr: std::net::SocketAddr,
    head: &str,
    body: &[u8],
    pause: Duration,
) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(head.as_bytes()).await?;
    tokio::time::sleep(pause).await;
    for chunk in body.chunks(64 * 1024) {
        s.write_all(chunk).await?;
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("no answer within 30 s"))??;
    Ok(out)
}

struct RawResponse {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

fn parse(raw: &[u8]) -> RawResponse {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response head");
    let headers = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status = headers.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    let mut body = raw[end + 4..].to_vec();
    if headers.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").expect("chunk size");
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16).unwrap();
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    RawResponse { status, headers, body }
}

/// A grpc-web call to an RPC that needs a token, sent without one.
fn grpc_web_head(len: usize) -> String {
    format!(
        "POST /otherix.v1.UserService/GetMe HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc-web+proto\r\n\
         X-Grpc-Web: 1\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )
}

#[tokio::test]
async fn thirty_refused_grpc_web_calls_over_http1_answer_cleanly() {
    let h = Harness::start().await;
    let addr = h.api.addr();
    // A 256 KiB frame: far more than the socket buffers take, so a server
    // that answered and closed without reading it would reset the connection.
    let payload = vec![0u8; 256 * 1024];
    let mut body = vec![0u8];
    body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    body.extend_from_slice(&payload);
    let (mut clean, mut resets) = (0, Vec::new());
    for i in 0..30 {
        match raw_exchange(addr, &grpc_web_head(body.len()), &body, Duration::from_millis(50)).await {
            Ok(raw) => {
                let r = parse(&raw);
                let text = format!("{}{}", r.headers, String::from_utf8_lossy(&r.body).to_ascii_lowercase());
                assert_eq!(r.status, 200, "call {i}: {text}");
                assert!(text.contains("grpc-status: 16") || text.contains("grpc-status:16"), "call {i}: {text}");
                clean += 1;
            }
            Err(e) => resets.push(format!("call {i}: {e}")),
        }
    }
    assert_eq!((clean, resets.len()), (30, 0), "{resets:?}");
}

#[tokio::test]
async fn oversize_puts_get_the_413_json() {
    let h = Harness::start().await;
    let addr = h.api.addr();
    for size in [2 * 1024 * 1024, 16 * 1024 * 1024] {
        let body = format!("{{\"name\":\"{}\"}}", "x".repeat(size));
        let head = format!(
            "PUT /v1/cluster/default-pool HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            h.admin_token,
            body.len()
        );
        let raw = raw_exchange(addr, &head, body.as_bytes(), Duration::from_millis(100))
            .await
            .unwrap_or_else(|e| panic!("{size} bytes: {e}"));
        let r = parse(&raw);
        assert_eq!(r.status, 413, "{size} bytes");
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "payload_too_large", "{v}");
        assert!(v["error"]["details"].is_object());
    }
}

#[tokio::test]
async fn a_slow_body_is_read_before_the_answer() {
    let h = Harness::start().await;
    let body = br#"{"name":123}"#;
    // Anonymous, with a body that would fail validation: the answer is 401,
    // and it comes after the body (the pause), on a connection closed cleanly.
    let head = format!(
        "PUT /v1/cluster/default-pool HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let raw = raw_exchange(h.api.addr(), &head, body, Duration::from_millis(500)).await.unwrap();
    let r = parse(&raw);
    assert_eq!(r.status, 401);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v, json!({"error":{"code":"unauthenticated","message":v["error"]["message"],"details":{}}}));
}

#[tokio::test]
async fn rest_http_semantics() {
    let h = Harness::start().await;
    h.wait_seeded().await;
    let url = h.url("/v1/cluster/default-pool");

    // Authentication before validation.
    let r = h.anon.put(&url).json(&json!({"name": 123})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["details"], json!({}));

    // A type error names the field.
    let r = h.http.put(&url).json(&json!({"name": 123})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["details"]["field"], "name", "{v}");
    assert_eq!(v["error"]["details"]["field_violations"][0]["field"], "name", "{v}");

    // 405 with Allow and the envelope.
    let r = h.http.post(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let allow = r.headers()["allow"].to_str().unwrap().to_owned();
    for m in ["GET", "HEAD", "PUT", "DELETE"] {
        assert!(allow.contains(m), "Allow: {allow}");
    }
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["details"].is_object(), "{v}");

    // The fixed routes answer 405 the same way.
    let r = h.http.post(h.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
    assert!(v["error"]["details"].is_object(), "{v}");

    // HEAD on a GET route.
    let r = h.http.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.bytes().await.unwrap().is_empty());

    // 415 for a body that is not JSON.
    let r = h.http.put(&url).header("content-type", "text/plain").body(r#"{"name":"x"}"#).send().await.unwrap();
    assert_eq!(r.status(), 415);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unsupported_media_type");

    // Duplicate keys.
    let r = h
        .http
        .put(&url)
        .header("content-type", "application/json")
        .body(r#"{"name":"a","name":"b"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["details"]["field"], "name", "{v}");

    // A body contradicting the path.
    let r = h.http.patch(h.url("/v1/users/admin")).json(&json!({"user": "someone-else"})).send().await;
    let r = r.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 400, "{v}");

    // Not found names the kind and the name.
    let r = h.http.get(h.url("/v1/users/nobody-here")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["error"]["details"]["kind"].as_str(), v["error"]["details"]["name"].as_str()),
        (Some("user"), Some("nobody-here")),
        "{v}"
    );

    // grpc-web with the JSON codec is refused plainly.
    let r = h
        .anon
        .post(h.url("/otherix.v1.UserService/GetMe"))
        .header("content-type", "application/grpc-web+json")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
}

#[test]
fn reserved_node_names_match_the_contract() {
    let pool = prost_reflect::DescriptorPool::decode(otherix_proto::FILE_DESCRIPTOR_SET).unwrap();
    let ext = pool.get_extension_by_name("otherix.v1.reserved_segments").unwrap();
    let node = pool.get_message_by_name("otherix.v1.GetNodeRequest").unwrap();
    let opts = node.get_field_by_name("name").unwrap().options();
    let listed: Vec<String> = match opts.get_extension(&ext).as_ref() {
        prost_reflect::Value::List(l) => l.iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
        other => panic!("{other:?}"),
    };
    assert_eq!(listed, otherix_pki::RESERVED_NODE_NAMES);
    for name in &listed {
        assert!(otherix_pki::validate_node_name(name).is_err(), "{name} accepted as a node name");
    }
}

#[tokio::test]
async fn cors_preflight_and_headers_for_allowed_origins_only() {
    let h = Harness::start_config(|c| c.server.cors.allowed_origins = vec!["http://localhost:*".into()]).await;
    let client = reqwest::Client::new();
    for (path, method, headers) in [
        ("/otherix.v1.UserService/GetMe", "POST", "content-type,x-grpc-web,authorization"),
        ("/v1/cluster/default-pool", "PUT", "content-type,authorization"),
    ] {
        let r = client
            .request(reqwest::Method::OPTIONS, h.url(path))
            .header("origin", "http://localhost:5173")
            .header("access-control-request-method", method)
            .header("access-control-request-headers", headers)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204, "{path}");
        assert_eq!(r.headers()["access-control-allow-origin"], "http://localhost:5173");
        let allow_methods = r.headers()["access-control-allow-methods"].to_str().unwrap();
        assert!(allow_methods.contains(method), "{allow_methods}");
        let allow_headers = r.headers()["access-control-allow-headers"].to_str().unwrap();
        for want in headers.split(',') {
            assert!(allow_headers.contains(want), "{want} not in {allow_headers}");
        }
        // Another origin gets no grant.
        let r = client
            .request(reqwest::Method::OPTIONS, h.url(path))
            .header("origin", "https://evil.example")
            .header("access-control-request-method", method)
            .send()
            .await
            .unwrap();
        assert!(r.headers().get("access-control-allow-origin").is_none());
    }
    // An actual call exposes the gRPC status headers.
    let r = client
        .post(h.url("/otherix.v1.UserService/GetMe"))
        .header("origin", "http://localhost:5173")
        .header("content-type", "application/grpc-web+proto")
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "http://localhost:5173");
    let exposed = r.headers()["access-control-expose-headers"].to_str().unwrap().to_owned();
    for want in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(want), "{exposed}");
    }
}

#[tokio::test]
async fn no_cors_by_default() {
    let h = Harness::start().await;
    let r = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, h.url("/v1/users/me"))
        .header("origin", "http://localhost:5173")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn openapi_lists_every_rest_route_and_docs_are_self_contained() {
    let h = Harness::start().await;
    let r = h.anon.get(h.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let pool = prost_reflect::DescriptorPool::decode(otherix_proto::FILE_DESCRIPTOR_SET).unwrap();
    let routes = otherix_gateway::routes_from_pool(&pool, "otherix.").unwrap();
    assert!(routes.len() > 25, "{}", routes.len());
    for route in &routes {
        let path = route.template().as_str();
        let verb = route.http_method().as_str().to_ascii_lowercase();
        let op = &doc["paths"][path][&verb];
        assert!(op.is_object(), "{verb} {path} missing from /openapi.json");
        let rpc = route.rpc();
        let (service, method) = rpc.rsplit_once('.').unwrap();
        let service = service.rsplit('.').next().unwrap();
        assert_eq!(op["operationId"], format!("{service}_{method}"));
    }
    // Login needs no token; GetMe does.
    assert_eq!(doc["paths"]["/v1/auth/login"]["post"]["security"], json!([]));
    assert!(doc["paths"]["/v1/users/me"]["get"].get("security").is_none());
    assert_eq!(doc["components"]["schemas"]["otherix.v1.LoginRequest"]["required"], json!(["password"]));

    let r = h.anon.get(h.url("/docs")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = r.text().await.unwrap();
    assert!(html.contains("/openapi.json"));
    assert!(!html.contains("http://") && !html.contains("https://"), "the reference page loads nothing from elsewhere");
}

#[tokio::test]
async fn rate_limits_say_when_to_retry_on_rest_and_grpc() {
    let h = Harness::start().await;
    let mut limited = None;
    for _ in 0..40 {
        let r = h
            .anon
            .post(h.url("/v1/auth/login"))
            .json(&json!({"username": "admin", "password": "wrong-password-123"}))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), 401);
    }
    let r = limited.expect("repeated failed logins are rate limited");
    let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited");
    assert!(v["error"]["details"]["retry_after_seconds"].as_u64().is_some(), "{v}");

    // gRPC carries a google.rpc.RetryInfo.
    let mut auth = otherix_proto::v1::auth_service_client::AuthServiceClient::new(h.grpc_channel().await);
    let err = auth
        .login(otherix_proto::v1::LoginRequest {
            username: "admin".into(),
            password: "wrong-password-123".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    use prost::Message;
    let status = otherix_proto::google::rpc::Status::decode(err.details()).unwrap();
    let info =
        status.details.iter().find(|a| a.type_url == "type.googleapis.com/google.rpc.RetryInfo").expect("RetryInfo");
    let info = otherix_proto::google::rpc::RetryInfo::decode(info.value.as_slice()).unwrap();
    assert!(info.retry_delay.unwrap().seconds >= 1);
}

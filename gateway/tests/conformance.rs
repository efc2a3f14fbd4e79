//! Table-driven conformance of the REST gateway: one case per HttpRule
//! feature, against an in-process gRPC echo service built from a test proto.

use std::time::Duration;

use axum::body::Body;
use bytes::{Buf, BufMut, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use otherix_errors::{ApiError, ErrorCode};
use otherix_gateway::{Gateway, GatewayConfig, routes_from_pool};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, Value};
use serde_json::{Value as Json, json};

fn pool() -> DescriptorPool {
    let here = env!("CARGO_MANIFEST_DIR");
    compile(&format!("{here}/tests"), "conformance.proto")
}

fn compile(dir: &str, file: &str) -> DescriptorPool {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("conf.bin");
    let here = env!("CARGO_MANIFEST_DIR");
    let status = std::process::Command::new("protoc")
        .arg(format!("-I{dir}"))
        .arg(format!("-I{here}/../proto"))
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", out.display()))
        .arg(file)
        .current_dir(dir)
        .status()
        .expect("protoc runs (install protobuf-compiler and libprotobuf-dev)");
    assert!(status.success());
    DescriptorPool::decode(std::fs::read(out).unwrap().as_slice()).unwrap()
}

/// The echo service: returns the request with `rpc` and `auth` filled in;
/// `Fail` answers an Otherix error, `Slow` takes two seconds.
fn echo_router(pool: DescriptorPool) -> axum::Router {
    let svc = tower::service_fn(move |req: Request<Body>| {
        let pool = pool.clone();
        async move {
            let path = req.uri().path().to_owned();
            let auth = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
            if path.ends_with("/Fail") {
                let err = ApiError::new(ErrorCode::NotFound, "thing not found").with_detail("name", "a");
                return Ok::<_, std::convert::Infallible>(err.to_status().into_http::<Body>());
            }
            if path.ends_with("/Slow") {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            let mut data = req.into_body().collect().await.unwrap().to_bytes();
            data.advance(1);
            let len = data.get_u32() as usize;
            let desc = pool.get_message_by_name("conf.v1.Thing").unwrap();
            let mut msg = DynamicMessage::decode(desc, &data[..len]).unwrap();
            msg.set_field_by_name("rpc", Value::String(path));
            msg.set_field_by_name("auth", Value::String(auth));
            let payload = msg.encode_to_vec();
            let mut framed = BytesMut::new();
            framed.put_u8(0);
            framed.put_u32(payload.len() as u32);
            framed.put_slice(&payload);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let body = http_body_util::StreamBody::new(futures::stream::iter(vec![
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(framed.freeze())),
                Ok(http_body::Frame::trailers(trailers)),
            ]));
            let resp = Response::builder().header("content-type", "application/grpc").body(Body::new(body)).unwrap();
            Ok(resp)
        }
    });
    axum::Router::new().fallback_service(svc)
}

fn gateway() -> Gateway {
    let pool = pool();
    let routes = routes_from_pool(&pool, "conf.").unwrap();
    let cfg = GatewayConfig { max_body_bytes: 1024, request_timeout: Duration::from_millis(300) };
    Gateway::new(routes, echo_router(pool), cfg)
}

struct Case {
    name: &'static str,
    method: &'static str,
    uri: &'static str,
    body: Option<&'static str>,
    status: StatusCode,
    /// Fields the JSON answer must contain (a subset match).
    expect: Json,
    /// Fields the answer must not contain.
    absent: &'static [&'static str],
}

fn subset(want: &Json, got: &Json) -> bool {
    match (want, got) {
        (Json::Object(w), Json::Object(g)) => w.iter().all(|(k, v)| g.get(k).is_some_and(|gv| subset(v, gv))),
        (Json::Array(w), Json::Array(g)) => w.len() == g.len() && w.iter().zip(g).all(|(w, g)| subset(w, g)),
        _ => want == got,
    }
}

#[tokio::test]
async fn http_rule_features() {
    let gw = gateway();
    let big_body: &'static str = Box::leak(format!("{{\"name\":\"{}\"}}", "x".repeat(2000)).into_boxed_str());
    let cases = [
        Case {
            name: "path variable, query scalars of every kind, repeated and nested query",
            method: "GET",
            uri: "/v1/things/a?big=9007199254740993&small=7&flag=true&color=COLOR_RED&tags=x&tags=y&inner.count=5&at=2024-01-02T03:04:05Z",
            body: None,
            status: StatusCode::OK,
            expect: json!({"name":"a","big":9007199254740993_i64,"small":7,"flag":true,"color":"COLOR_RED","tags":["x","y"],
                "inner":{"name":"","count":5},"at":"2024-01-02T03:04:05Z","rpc":"/conf.v1.Echo/Get","display_name":""}),
            absent: &["maybe"],
        },
        Case {
            name: "a literal template wins over a variable one",
            method: "GET",
            uri: "/v1/things/me",
            body: None,
            status: StatusCode::OK,
            expect: json!({"rpc":"/conf.v1.Echo/GetMe"}),
            absent: &["inner", "at", "maybe"],
        },
        Case {
            name: "body * with lowerCamelCase input, 64-bit integer as string, snake_case output",
            method: "POST",
            uri: "/v1/things",
            body: Some(r#"{"name":"n","displayName":"camel","big":"12","maybe":"yes"}"#),
            status: StatusCode::OK,
            expect: json!({"name":"n","display_name":"camel","big":12,"maybe":"yes","rpc":"/conf.v1.Echo/Create"}),
            absent: &[],
        },
        Case {
            name: "body * takes no query parameters",
            method: "POST",
            uri: "/v1/things?name=x",
            body: Some("{}"),
            status: StatusCode::BAD_REQUEST,
            expect: json!({"error":{"code":"validation_failed"}}),
            absent: &[],
        },
        Case {
            name: "body field plus path variable",
            method: "PATCH",
            uri: "/v1/things/a",
            body: Some(r#"{"name":"i","count":3}"#),
            status: StatusCode::OK,
            expect: json!({"name":"a","inner":{"name":"i","count":3},"rpc":"/conf.v1.Echo/Update"}),
            absent: &[],
        },
        Case {
            name: "a body field contradicting a path variable is refused",
            method: "PUT",
            uri: "/v1/put/from-path",
            body: Some(r#"{"name":"from-body","flag":true}"#),
            status: StatusCode::BAD_REQUEST,
            expect: json!({"error":{"code":"validation_failed","details":{"field":"name"}}}),
            absent: &[],
        },
        Case {
            name: "a body field agreeing with a path variable is fine",
            method: "PUT",
            uri: "/v1/put/from-path",
            body: Some(r#"{"name":"from-path","flag":true}"#),
            status: StatusCode::OK,
            expect: json!({"name":"from-path","flag":true}),
            absent: &[],
        },
        Case {
            name: "custom verb",
            method: "POST",
            uri: "/v1/things/a:start",
            body: None,
            status: StatusCode::OK,
            expect: json!({"name":"a","rpc":"/conf.v1.Echo/Start"}),
            absent: &[],
        },
        Case {
            name: "multi-segment variable and nested field variable",
            method: "GET",
            uri: "/v1/projects/p1/things/n1",
            body: None,
            status: StatusCode::OK,
            expect: json!({"parent":"projects/p1","inner":{"name":"n1"},"rpc":"/conf.v1.Echo/Nested"}),
            absent: &[],
        },
        Case {
            name: "additional binding",
            method: "GET",
            uri: "/v1/alt/z",
            body: None,
            status: StatusCode::OK,
            expect: json!({"name":"z","rpc":"/conf.v1.Echo/Nested"}),
            absent: &[],
        },
        Case {
            name: "response_body",
            method: "GET",
            uri: "/v1/inner/q?inner.name=w",
            body: None,
            status: StatusCode::OK,
            expect: json!({"name":"w","count":0}),
            absent: &["rpc"],
        },
        Case {
            name: "a gRPC error becomes the JSON envelope with details",
            method: "DELETE",
            uri: "/v1/things/a",
            body: None,
            status: StatusCode::NOT_FOUND,
            expect: json!({"error":{"code":"not_found","message":"thing not found","details":{"name":"a"}}}),
            absent: &[],
        },
        Case {
            name: "unknown query parameter",
            method: "GET",
            uri: "/v1/things/a?nope=1",
            body: None,
            status: StatusCode::BAD_REQUEST,
            expect: json!({"error":{"code":"validation_failed","details":{"field":"nope"}}}),
            absent: &[],
        },
        Case {
            name: "badly typed query parameter",
            method: "GET",
            uri: "/v1/things/a?flag=maybe",
            body: None,
            status: StatusCode::BAD_REQUEST,
            expect: json!({"error":{"code":"validation_failed","details":{"field":"flag"}}}),
            absent: &[],
        },
        Case {
            name: "malformed JSON",
            method: "POST",
            uri: "/v1/things",
            body: Some("{\"name\":"),
            status: StatusCode::BAD_REQUEST,
            expect: json!({"error":{"code":"validation_failed"}}),
            absent: &[],
        },
        Case {
            name: "a badly typed body field is named by its path",
            method: "POST",
            uri: "/v1/things",
            body: Some(r#"{"name":"a","inner":{"count":"many"}}"#),
            status: StatusCode::BAD_REQUEST,
            expect: json!({"error":{"code":"validation_failed","details":{"field":"inner.count",
                "field_violations":[{"field":"inner.count"}]}}}),
            absent: &[],
        },
        Case {
            name: "a badly typed top-level field is named",
            method: "POST",
            uri: "/v1/things",
            body: Some(r#"{"name":123}"#),
            status: StatusCode::BAD_REQUEST,
            expect: json!({"error":{"code":"validation_failed","details":{"field":"name"}}}),
            absent: &[],
        },
        Case {
            name: "a body field under a body: field rule is named by its full path",
            method: "PATCH",
            uri: "/v1/things/a",
            body: Some(r#"{"count":true}"#),
            status: StatusCode::BAD_REQUEST,
            expect: json!({"error":{"code":"validation_failed","details":{"field":"inner.count"}}}),
            absent: &[],
        },
        Case {
            name: "duplicate keys are refused",
            method: "POST",
            uri: "/v1/things",
            body: Some(r#"{"name":"a","inner":{"name":"x","name":"y"}}"#),
            status: StatusCode::BAD_REQUEST,
            expect: json!({"error":{"code":"validation_failed","details":{"field":"inner.name"}}}),
            absent: &[],
        },
        Case {
            name: "unknown body field",
            method: "POST",
            uri: "/v1/things",
            body: Some(r#"{"nope":1}"#),
            status: StatusCode::BAD_REQUEST,
            expect: json!({"error":{"code":"validation_failed"}}),
            absent: &[],
        },
        Case {
            name: "body over the limit",
            method: "POST",
            uri: "/v1/things",
            body: Some(big_body),
            status: StatusCode::PAYLOAD_TOO_LARGE,
            expect: json!({"error":{"code":"payload_too_large"}}),
            absent: &[],
        },
        Case {
            name: "a body where the binding takes none",
            method: "GET",
            uri: "/v1/things/a",
            body: Some("{}"),
            status: StatusCode::BAD_REQUEST,
            expect: json!({"error":{"code":"validation_failed"}}),
            absent: &[],
        },
        Case {
            name: "unknown path",
            method: "GET",
            uri: "/v1/nothing/here",
            body: None,
            status: StatusCode::NOT_FOUND,
            expect: json!({"error":{"code":"not_found","details":{"kind":"route","name":"/v1/nothing/here"}}}),
            absent: &[],
        },
        Case {
            name: "known path, wrong method",
            method: "PUT",
            uri: "/v1/things/a",
            body: None,
            status: StatusCode::METHOD_NOT_ALLOWED,
            expect: json!({"error":{"code":"method_not_allowed"}}),
            absent: &[],
        },
        Case {
            name: "time limit",
            method: "GET",
            uri: "/v1/slow",
            body: None,
            status: StatusCode::SERVICE_UNAVAILABLE,
            expect: json!({"error":{"code":"request_timeout"}}),
            absent: &[],
        },
    ];
    let mut failures = Vec::new();
    for c in &cases {
        let req = Request::builder()
            .method(c.method)
            .uri(c.uri)
            .header("content-type", "application/json")
            .body(c.body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        let resp = gw.handle(req).await;
        let status = resp.status();
        assert_eq!(resp.headers()["content-type"], "application/json", "{}", c.name);
        let got: Json = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let ok = status == c.status && subset(&c.expect, &got) && c.absent.iter().all(|k| got.get(k).is_none());
        if !ok {
            failures.push(format!("{}: {status} {got}", c.name));
        }
    }
    assert!(failures.is_empty(), "failing cases:\n{}", failures.join("\n"));
}

async fn call(gw: &Gateway, req: Request<Body>) -> (StatusCode, http::HeaderMap, bytes::Bytes) {
    let resp = gw.handle(req).await;
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn method_not_allowed_lists_allow_and_head_serves_get() {
    let gw = gateway();
    let req = Request::builder().method("PUT").uri("/v1/things/a").body(Body::empty()).unwrap();
    let (status, headers, body) = call(&gw, req).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let allow = headers["allow"].to_str().unwrap();
    for m in ["GET", "HEAD", "PATCH", "DELETE"] {
        assert!(allow.contains(m), "Allow: {allow}");
    }
    let v: Json = serde_json::from_slice(&body).unwrap();
    assert!(v["error"]["details"].is_object(), "{v}");

    let req = Request::builder().method("HEAD").uri("/v1/things/a").body(Body::empty()).unwrap();
    let (status, headers, body) = call(&gw, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers["content-length"].to_str().unwrap().parse::<u64>().unwrap() > 0);
    assert!(body.is_empty());
}

#[tokio::test]
async fn non_json_bodies_get_415() {
    let gw = gateway();
    for (ct, want) in [
        ("text/plain", StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("application/x-www-form-urlencoded", StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("application/json; charset=utf-8", StatusCode::OK),
        ("application/merge-patch+json", StatusCode::OK),
    ] {
        let req = Request::builder()
            .method("POST")
            .uri("/v1/things")
            .header("content-type", ct)
            .body(Body::from(r#"{"name":"a"}"#))
            .unwrap();
        let (status, _, body) = call(&gw, req).await;
        assert_eq!(status, want, "{ct}: {}", String::from_utf8_lossy(&body));
    }
}

/// Refuses everything, counting its calls.
struct DenyAll(std::sync::atomic::AtomicUsize);

impl otherix_gateway::Authorizer for DenyAll {
    fn authorize<'a>(
        &'a self,
        _: &'a str,
        _: &'a mut http::request::Parts,
    ) -> futures::future::BoxFuture<'a, Result<(), ApiError>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Err(ApiError::new(ErrorCode::Unauthenticated, "who are you")) })
    }
}

#[tokio::test]
async fn authentication_comes_before_validation() {
    let deny = std::sync::Arc::new(DenyAll(Default::default()));
    let gw = gateway().with_authorizer(deny.clone());
    let req = Request::builder()
        .method("POST")
        .uri("/v1/things")
        .header("content-type", "text/plain")
        .body(Body::from(r#"{"name":123,"name":4}"#))
        .unwrap();
    let (status, _, body) = call(&gw, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{}", String::from_utf8_lossy(&body));
    let v: Json = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["details"], json!({}));
    assert_eq!(deny.0.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A contract with two routes where `/v1/boxes/special` is also a
/// `/v1/boxes/{name}`, with and without the reservation.
fn collision_pool(reserve: bool) -> DescriptorPool {
    let dir = tempfile::tempdir().unwrap();
    let opt = if reserve { r#" [(otherix.v1.reserved_segments) = "special"]"# } else { "" };
    let text = format!(
        r#"syntax = "proto3";
package col.v1;
import "google/api/annotations.proto";
import "otherix/v1/routing.proto";
message Box {{ string name = 1{opt}; }}
service Boxes {{
  rpc Special(Box) returns (Box) {{ option (google.api.http) = {{post: "/v1/boxes/special" body: "*"}}; }}
  rpc Delete(Box) returns (Box) {{ option (google.api.http) = {{delete: "/v1/boxes/{{name}}"}}; }}
}}
"#
    );
    std::fs::write(dir.path().join("col.proto"), text).unwrap();
    compile(dir.path().to_str().unwrap(), "col.proto")
}

#[test]
fn colliding_routes_are_refused_unless_reserved() {
    let err = routes_from_pool(&collision_pool(false), "col.").unwrap_err();
    match &err {
        otherix_gateway::GatewayError::Collision { literal, literal_route, variable_route, field } => {
            assert_eq!(literal, "special");
            assert_eq!(literal_route, "POST /v1/boxes/special");
            assert_eq!(variable_route, "DELETE /v1/boxes/{name}");
            assert_eq!(field, "name");
        }
        other => panic!("not a collision: {other}"),
    }
    assert_eq!(routes_from_pool(&collision_pool(true), "col.").unwrap().len(), 2);
}

#[tokio::test]
async fn authorization_is_forwarded_as_metadata() {
    let gw = gateway();
    let req = Request::builder().uri("/v1/things/a").header("authorization", "Bearer abc").body(Body::empty()).unwrap();
    let got: Json =
        serde_json::from_slice(&gw.handle(req).await.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(got["auth"], "Bearer abc");
}

#[test]
fn streaming_rpcs_with_http_rules_are_refused() {
    // The contract's own protos must build routes without error.
    let pool = DescriptorPool::decode(otherix_proto::FILE_DESCRIPTOR_SET).unwrap();
    let routes = routes_from_pool(&pool, "otherix.").unwrap();
    assert!(routes.iter().any(|r| r.template().as_str() == "/v1/cluster/default-pool"));
}

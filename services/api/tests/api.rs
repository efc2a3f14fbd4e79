//! The control plane on a real port against a real etcd: REST, gRPC,
//! grpc-web, reflection, health, limits and errors.

mod common;

use std::time::Duration;

use common::Harness;
use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::v1::cluster_service_client::ClusterServiceClient as Cluster;
use otherix_proto::v1::{DefaultPool, GetDefaultPoolRequest, SetDefaultPoolRequest, UnsetDefaultPoolRequest};
use prost::Message;
use serde_json::{Value, json};

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn health_endpoints() {
    let h = Harness::start().await;
    let (s, body) = json_of(h.http.get(h.url("/healthz")).send().await.unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    let (s, body) = json_of(h.http.get(h.url("/readyz")).send().await.unwrap()).await;
    assert_eq!((s, body["status"].as_str()), (200, Some("ready")));
}

#[tokio::test]
async fn default_pool_over_rest() {
    let h = Harness::start().await;
    h.wait_seeded().await;
    let url = h.url("/v1/cluster/default-pool");

    let (s, body) = json_of(h.http.get(&url).send().await.unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(body["name"], "default", "seeded from storage_pools.default_pool_name: {body}");

    let (s, body) = json_of(h.http.put(&url).json(&json!({"name": "fast-ssd"})).send().await.unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(body["name"], "fast-ssd");
    let at = body["updated_at"].as_str().unwrap();
    assert!(at.ends_with('Z') && at.contains('T'), "RFC 3339 with Z: {at}");

    let (_, body) = json_of(h.http.get(&url).send().await.unwrap()).await;
    assert_eq!(body["name"], "fast-ssd");

    let (s, body) = json_of(h.http.delete(&url).send().await.unwrap()).await;
    assert_eq!((s, body), (200, json!({})));
    // Unsetting again is fine.
    let (s, _) = json_of(h.http.delete(&url).send().await.unwrap()).await;
    assert_eq!(s, 200);

    let (s, body) = json_of(h.http.get(&url).send().await.unwrap()).await;
    assert_eq!(s, 404);
    assert_eq!(body["error"]["code"], "not_found");
    assert!(body["error"]["message"].as_str().unwrap().contains("default pool"));

    let (s, body) = json_of(h.http.put(&url).json(&json!({"name": "Not_A_Label"})).send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert_eq!(body["error"]["code"], "validation_failed");
    assert_eq!(body["error"]["details"]["field"], "name");
}

#[tokio::test]
async fn bad_requests_are_refused_and_the_server_survives() {
    let h = Harness::start().await;
    let url = h.url("/v1/cluster/default-pool");

    let big = format!("{{\"name\":\"{}\"}}", "a".repeat(2 * 1024 * 1024));
    let (s, body) =
        json_of(h.http.put(&url).header("content-type", "application/json").body(big).send().await.unwrap()).await;
    assert_eq!(s, 413);
    assert_eq!(body["error"]["code"], "payload_too_large");

    let (s, body) =
        json_of(h.http.put(&url).header("content-type", "application/json").body("{\"name\":").send().await.unwrap())
            .await;
    assert_eq!(s, 400);
    assert_eq!(body["error"]["code"], "validation_failed");

    let (s, body) = json_of(h.http.get(h.url("/v1/no/such/thing")).send().await.unwrap()).await;
    assert_eq!(s, 404);
    assert_eq!(body["error"]["code"], "not_found");
    let (s, _) = json_of(h.http.get(h.url("/favicon.ico")).send().await.unwrap()).await;
    assert_eq!(s, 404);
    let (s, body) = json_of(h.http.post(&url).send().await.unwrap()).await;
    assert_eq!(s, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed");

    // A gRPC message over the limit is refused too.
    let mut client = Cluster::new(h.authed(Some(&h.admin_token)).await);
    let err = client
        .set_default_pool(SetDefaultPoolRequest {
            name: "a".repeat(2 * 1024 * 1024),
            request_id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(ApiError::from_status(&err).code, ErrorCode::PayloadTooLarge, "{err:?}");

    let (s, _) = json_of(h.http.get(h.url("/healthz")).send().await.unwrap()).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn default_pool_over_grpc() {
    let h = Harness::start().await;
    h.wait_seeded().await;
    let mut client = Cluster::new(h.authed(Some(&h.admin_token)).await);
    let got = client.get_default_pool(GetDefaultPoolRequest {}).await.unwrap().into_inner();
    assert_eq!(got.name, "default");
    let set = client
        .set_default_pool(SetDefaultPoolRequest {
            name: "grpc-pool".into(),
            request_id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.name, "grpc-pool");
    // Same store behind both surfaces.
    let (_, body) = json_of(h.http.get(h.url("/v1/cluster/default-pool")).send().await.unwrap()).await;
    assert_eq!(body["name"], "grpc-pool");

    client.unset_default_pool(UnsetDefaultPoolRequest::default()).await.unwrap();
    let err = client.get_default_pool(GetDefaultPoolRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let api = ApiError::from_status(&err);
    assert_eq!(api.code, ErrorCode::NotFound);
    assert_eq!(api.details["setting"], "default_pool");

    let err = client
        .set_default_pool(SetDefaultPoolRequest {
            name: "-bad".into(),
            request_id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(ApiError::from_status(&err).code, ErrorCode::ValidationFailed);
}

#[tokio::test]
async fn grpc_web_over_http1() {
    let h = Harness::start().await;
    h.wait_seeded().await;
    let payload = GetDefaultPoolRequest {}.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    let client = reqwest::Client::builder().http1_only().build().unwrap();
    let resp = client
        .post(h.url("/otherix.v1.ClusterService/GetDefaultPool"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("authorization", format!("Bearer {}", h.admin_token))
        .body(frame)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    let body = resp.bytes().await.unwrap();
    assert_eq!(body[0], 0, "first frame is data");
    let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    let msg = DefaultPool::decode(&body[5..5 + len]).unwrap();
    assert_eq!(msg.name, "default");
    let trailer = &body[5 + len..];
    assert_eq!(trailer[0], 0x80, "then the trailers frame");
    assert!(String::from_utf8_lossy(&trailer[5..]).contains("grpc-status:0"));
}

#[tokio::test]
async fn readyz_fails_while_the_store_is_down() {
    let h = Harness::start().await;
    let Harness { etcd, api, base, http, state, .. } = h;
    let _state = state;
    drop(etcd);
    let mut last = 0;
    for _ in 0..100 {
        let r = http.get(format!("{base}/readyz")).send().await.unwrap();
        last = r.status().as_u16();
        if last == 503 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["reason"], "store_unavailable");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last, 503);
    // Liveness is unaffected, and calls fail with the documented code once
    // the caches have been without their watch past the staleness bound
    // (they never serve data that may miss a change for longer).
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    let mut r = http.get(format!("{base}/v1/cluster/default-pool")).send().await.unwrap();
    for _ in 0..100 {
        if r.status() == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        r = http.get(format!("{base}/v1/cluster/default-pool")).send().await.unwrap();
    }
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_timeout");
    api.shutdown().await;
}

#[tokio::test]
async fn an_external_etcd_that_is_down_at_start_shows_in_readyz() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (client, peer) = otherix_etcd_member::free_ports().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let state = tempfile::tempdir().unwrap();
    let mut config = otherix_api::Config::default();
    config.server.listen = format!("127.0.0.1:{port}");
    config.agent_server.listen = "127.0.0.1:0".into();
    config.etcd.endpoints = vec![format!("http://127.0.0.1:{client}")];
    config.etcd.request_timeout_seconds = 1;
    config.state_dir = state.path().to_owned();
    let starting = tokio::spawn(otherix_api::ApiServer::start_with(config, common::options()));

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut seen = None;
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            seen = Some((r.status().as_u16(), r.json::<Value>().await.unwrap()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, body) = seen.expect("the listener opens while the store is down");
    assert_eq!((status, body["reason"].as_str()), (503, Some("store_unavailable")));
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    let (s, body) = json_of(http.get(format!("{base}/v1/users/me")).send().await.unwrap()).await;
    assert_eq!((s, body["error"]["code"].as_str()), (503, Some("request_timeout")));
    assert!(!starting.is_finished());

    // The store comes up: start-up completes and the server is ready.
    let etcd = otherix_testkit::TestEtcd::start_on(client, peer).await;
    let api = tokio::time::timeout(Duration::from_secs(30), starting).await.unwrap().unwrap().unwrap();
    assert_eq!(http.get(format!("{base}/readyz")).send().await.unwrap().status(), 200);
    let login = common::login(&http, &base, common::ADMIN, common::ADMIN_PASSWORD).await;
    assert!(login["access_token"].is_string());
    api.shutdown().await;
    drop(etcd);
}

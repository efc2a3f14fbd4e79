//! Etags on mutable resources: an `ETag` on REST reads, `If-Match` (REST) or
//! the `etag` field (gRPC) makes a change conditional, and a stale one is
//! refused with 409 `etag_mismatch`.

mod common;

use common::Harness;
use serde_json::{Value, json};

async fn call(r: reqwest::RequestBuilder) -> (u16, Option<String>, Value) {
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let etag = resp.headers().get("etag").map(|v| v.to_str().unwrap().to_owned());
    (status, etag, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn stale_etags_are_refused_and_current_ones_pass() {
    let h = Harness::start().await;
    h.wait_seeded().await;
    let pool = h.url("/v1/cluster/default-pool");
    let (s, etag, body) = call(h.http.get(&pool)).await;
    assert_eq!(s, 200, "{body}");
    let etag = etag.expect("an ETag header");
    assert_eq!(etag, format!("\"{}\"", body["etag"].as_str().unwrap()));

    // A change with the current etag passes and moves the etag on.
    let (s, next, body) = call(h.http.put(&pool).header("if-match", &etag).json(&json!({"name": "fast"}))).await;
    assert_eq!(s, 200, "{body}");
    let next = next.unwrap();
    assert_ne!(next, etag);
    // The old etag is now stale: refused, nothing changed.
    let (s, _, body) = call(h.http.put(&pool).header("if-match", &etag).json(&json!({"name": "slow"}))).await;
    assert_eq!((s, body["error"]["code"].as_str()), (409, Some("etag_mismatch")), "{body}");
    assert_eq!(body["error"]["details"]["current_etag"], next.trim_matches('"'));
    assert_eq!(call(h.http.get(&pool)).await.2["name"], "fast");
    // Weak or malformed If-Match is a client error; `*` means any.
    let (s, _, _) = call(h.http.put(&pool).header("if-match", "W/\"1\"").json(&json!({"name": "x"}))).await;
    assert_eq!(s, 400);
    let (s, _, _) = call(h.http.put(&pool).header("if-match", "*").json(&json!({"name": "any"}))).await;
    assert_eq!(s, 200);
    let (s, _, body) = call(h.http.delete(&pool).header("if-match", &next)).await;
    assert_eq!((s, body["error"]["code"].as_str()), (409, Some("etag_mismatch")), "{body}");

    // Users: PATCH and DELETE honour If-Match; a read shows the etag.
    let (s, _, body) = call(h.http.post(h.url("/v1/users")).json(&json!({
        "username": "erin", "email": "erin@example.com", "password": "a-long-password-1", "role": "viewer"
    })))
    .await;
    assert_eq!(s, 200, "{body}");
    let (_, user_etag, body) = call(h.http.get(h.url("/v1/users/erin"))).await;
    let user_etag = user_etag.expect("ETag on a user");
    assert_eq!(user_etag, format!("\"{}\"", body["etag"].as_str().unwrap()));
    let (s, new_etag, body) = call(
        h.http.patch(h.url("/v1/users/erin")).header("if-match", &user_etag).json(&json!({"display_name": "Erin"})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_ne!(new_etag.unwrap(), user_etag);
    let (s, _, body) = call(h.http.delete(h.url("/v1/users/erin")).header("if-match", &user_etag)).await;
    assert_eq!((s, body["error"]["code"].as_str()), (409, Some("etag_mismatch")), "{body}");
    assert_eq!(call(h.http.get(h.url("/v1/users/erin"))).await.0, 200);

    // The same refusal over gRPC, from the etag field.
    let mut c = otherix_proto::v1::cluster_service_client::ClusterServiceClient::with_interceptor(
        h.grpc_channel().await,
        common::Bearer(Some(h.admin_token.clone())),
    );
    let err = c
        .set_default_pool(otherix_proto::v1::SetDefaultPoolRequest {
            name: "grpc".into(),
            etag: "1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted);
    assert_eq!(otherix_errors::ApiError::from_status(&err).code, otherix_errors::ErrorCode::EtagMismatch);
}

//! AIP-158 pagination on the List RPCs, over REST and gRPC.

mod common;

use common::Harness;
use serde_json::{Value, json};

async fn call(r: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn lists_page_with_tokens_bound_to_their_query() {
    let h = Harness::start().await;
    for i in 0..5 {
        let (s, body) = call(h.http.post(h.url("/v1/users")).json(&json!({
            "username": format!("user-{i}"), "email": format!("u{i}@example.com"),
            "password": "a-long-password-1", "role": "viewer"
        })))
        .await;
        assert_eq!(s, 200, "{body}");
    }
    // Six users (admin + five) in pages of two: every user once, in order.
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let (s, body) = call(h.http.get(h.url(&format!("/v1/users?page_size=2&page_token={token}")))).await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["total_size"], 6);
        let page: Vec<String> =
            body["users"].as_array().unwrap().iter().map(|u| u["username"].as_str().unwrap().to_owned()).collect();
        assert!(page.len() <= 2);
        names.extend(page);
        pages += 1;
        token = body["next_page_token"].as_str().unwrap_or_default().to_owned();
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["admin", "user-0", "user-1", "user-2", "user-3", "user-4"]);

    // A token from one query is refused for another; a made-up token too.
    let (_, first) = call(h.http.get(h.url("/v1/nodes/join-tokens?page_size=1"))).await;
    let (_, users) = call(h.http.get(h.url("/v1/users?page_size=1"))).await;
    let t = users["next_page_token"].as_str().unwrap();
    let (s, body) = call(h.http.get(h.url(&format!("/v1/nodes?page_token={t}&status=ready")))).await;
    assert_eq!((s, body["error"]["code"].as_str()), (400, Some("validation_failed")), "{body}");
    let (s, body) = call(h.http.get(h.url("/v1/users?page_token=bm90LWEtdG9rZW4"))).await;
    assert_eq!((s, body["error"]["details"]["field"].as_str()), (400, Some("page_token")), "{body}");
    let (s, _) = call(h.http.get(h.url("/v1/users?page_size=-1"))).await;
    assert_eq!(s, 400);
    assert_eq!(first["total_size"], 0);

    // The same over gRPC.
    let mut c = otherix_proto::v1::user_service_client::UserServiceClient::with_interceptor(
        h.grpc_channel().await,
        common::Bearer(Some(h.admin_token.clone())),
    );
    let p = c
        .list_users(otherix_proto::v1::ListUsersRequest { page_size: 4, page_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p.users.len(), p.total_size), (4, 6));
    let rest = c
        .list_users(otherix_proto::v1::ListUsersRequest { page_size: 4, page_token: p.next_page_token })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.users.iter().map(|u| u.username.as_str()).collect::<Vec<_>>(), ["user-3", "user-4"]);
    assert!(rest.next_page_token.is_empty());
}

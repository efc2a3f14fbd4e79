//! Every RPC of the contract, called over gRPC as each role and as nobody:
//! the answer must follow its `otherix.v1.access` rule and the role matrix.
//! New RPCs are covered without touching this test.

mod common;

use common::{DynamicCodec, Harness};
use otherix_api::access::AccessTable;
use otherix_auth::Role;
use otherix_errors::{ApiError, ErrorCode};
use prost_reflect::{DescriptorPool, DynamicMessage};

#[tokio::test]
async fn every_rpc_as_every_role() {
    let h = Harness::start().await;
    let pool = DescriptorPool::decode(otherix_proto::FILE_DESCRIPTOR_SET).unwrap();
    let access = AccessTable::from_pool(&pool).unwrap();
    let mut tokens = vec![(Some(Role::Admin), Some(h.admin_token.clone())), (None, None)];
    for (name, role) in [("opal", Role::Operator), ("devi", Role::Developer), ("vic", Role::Viewer)] {
        tokens.push((Some(role), Some(h.user_token(name, role.as_str()).await)));
    }
    let channel = h.grpc_channel().await;
    let mut checked = 0;
    let mut failures = Vec::new();
    for service in pool.services().filter(|s| s.package_name() == "otherix.v1") {
        for method in service.methods() {
            let path = format!("/{}/{}", service.full_name(), method.name());
            let rule = access.rule(&path).unwrap();
            for (role, token) in &tokens {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready().await.unwrap();
                let mut req = tonic::Request::new(DynamicMessage::new(method.input()));
                if let Some(t) = token {
                    req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
                }
                let pq = http::uri::PathAndQuery::try_from(path.as_str()).unwrap();
                let outcome = if method.is_client_streaming() {
                    let mut sreq = tonic::Request::new(tokio_stream::empty::<DynamicMessage>());
                    *sreq.metadata_mut() = req.metadata().clone();
                    grpc.streaming(sreq, pq, DynamicCodec(method.clone())).await.map(|_| ())
                } else if method.is_server_streaming() {
                    grpc.server_streaming(req, pq, DynamicCodec(method.clone())).await.map(|_| ())
                } else {
                    grpc.unary(req, pq, DynamicCodec(method.clone())).await.map(|_| ())
                };
                let got = outcome.err().map(|s| ApiError::from_status(&s));
                let code = got.as_ref().map(|e| e.code);
                let who = role.map_or("anonymous", Role::as_str);
                let ok = match (role, rule.public) {
                    // Agent-plane RPCs: no user token opens them (not served
                    // here at all counts as refused too).
                    _ if rule.agent || rule.control_plane => {
                        matches!(code, Some(ErrorCode::Unauthenticated) | Some(ErrorCode::NotFound))
                    }
                    (_, true) => code != Some(ErrorCode::Unauthenticated) && code != Some(ErrorCode::PermissionDenied),
                    (None, false) => code == Some(ErrorCode::Unauthenticated),
                    (Some(r), false) if rule.authenticated || r.grant(&rule.permission).is_some() => {
                        code != Some(ErrorCode::Unauthenticated) && code != Some(ErrorCode::PermissionDenied)
                    }
                    (Some(_), false) => {
                        code == Some(ErrorCode::PermissionDenied)
                            && got.as_ref().unwrap().details["required_permission"] == rule.permission.as_str()
                    }
                };
                if !ok {
                    failures.push(format!("{path} as {who}: {got:?}"));
                }
                checked += 1;
            }
        }
    }
    assert!(failures.is_empty(), "{} of {checked} calls broke the matrix:\n{}", failures.len(), failures.join("\n"));
    assert!(checked >= 5 * 17, "only {checked} calls made");
}

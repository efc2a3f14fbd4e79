//! A client that knows nothing but the server's address finds and calls
//! GetDefaultPool through gRPC reflection (v1 and v1alpha), as grpcurl does.

mod common;

use common::{DynamicCodec, Harness};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn reflect(channel: tonic::transport::Channel, req: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(channel);
    let stream = tokio_stream::iter(vec![ServerReflectionRequest { host: String::new(), message_request: Some(req) }]);
    let mut resp = client.server_reflection_info(stream).await.unwrap().into_inner();
    resp.message().await.unwrap().unwrap().message_response.unwrap()
}

#[tokio::test]
async fn get_default_pool_via_reflection() {
    let h = Harness::start().await;
    h.wait_seeded().await;
    let channel = h.grpc_channel().await;

    let MessageResponse::ListServicesResponse(list) =
        reflect(channel.clone(), MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.clone()).collect();
    assert!(names.contains(&"otherix.v1.ClusterService".to_owned()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");

    let MessageResponse::FileDescriptorResponse(files) =
        reflect(channel.clone(), MessageRequest::FileContainingSymbol("otherix.v1.ClusterService".into())).await
    else {
        panic!("no descriptors");
    };
    // Fetch missing imports by file name, as grpcurl does.
    let mut set = prost_types::FileDescriptorSet::default();
    let mut pending: Vec<Vec<u8>> = files.file_descriptor_proto;
    while let Some(raw) = pending.pop() {
        let file = prost_types::FileDescriptorProto::decode(raw.as_slice()).unwrap();
        if set.file.iter().any(|f| f.name == file.name) {
            continue;
        }
        for dep in &file.dependency {
            if !set.file.iter().any(|f| f.name.as_deref() == Some(dep.as_str())) {
                let MessageResponse::FileDescriptorResponse(more) =
                    reflect(channel.clone(), MessageRequest::FileByFilename(dep.clone())).await
                else {
                    panic!("no descriptor for {dep}");
                };
                pending.extend(more.file_descriptor_proto);
            }
        }
        set.file.push(file);
    }
    set.file.reverse();
    let pool = DescriptorPool::from_file_descriptor_set(set).unwrap();
    let method = pool
        .get_service_by_name("otherix.v1.ClusterService")
        .unwrap()
        .methods()
        .find(|m| m.name() == "GetDefaultPool")
        .unwrap();

    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/otherix.v1.ClusterService/GetDefaultPool");
    let mut req = tonic::Request::new(DynamicMessage::new(method.input()));
    req.metadata_mut().insert("authorization", format!("Bearer {}", h.admin_token).parse().unwrap());
    let resp = grpc.unary(req, path, DynamicCodec(method.clone())).await.unwrap().into_inner();
    assert_eq!(resp.get_field_by_name("name").unwrap().as_str(), Some("default"));

    // The older v1alpha service answers too, for clients that only know it.
    let mut alpha = tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut resp = alpha.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let first = resp.message().await.unwrap().unwrap();
    assert!(format!("{first:?}").contains("otherix.v1.ClusterService"));
}

#[tokio::test]
async fn the_public_port_advertises_and_serves_only_its_own_services() {
    let h = Harness::start().await;
    let channel = h.grpc_channel().await;
    let MessageResponse::ListServicesResponse(list) =
        reflect(channel.clone(), MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.clone()).collect();
    for absent in ["otherix.agent.v1.VmRuntimeService", "otherix.agent.v1.HeartbeatService"] {
        assert!(!names.contains(&absent.to_owned()), "{absent} advertised: {names:?}");
    }
    for present in ["otherix.v1.UserService", "otherix.agent.v1.EnrolmentService", "grpc.health.v1.Health"] {
        assert!(names.contains(&present.to_owned()), "{present} missing: {names:?}");
    }

    // Calls to the agent-side services answer unimplemented, even with a token.
    let pool = DescriptorPool::decode(otherix_proto::FILE_DESCRIPTOR_SET).unwrap();
    for (service, method) in
        [("otherix.agent.v1.VmRuntimeService", "ListVms"), ("otherix.agent.v1.HeartbeatService", "Heartbeat")]
    {
        let m = pool.get_service_by_name(service).unwrap().methods().find(|m| m.name() == method);
        let m = m.unwrap_or_else(|| pool.get_service_by_name(service).unwrap().methods().next().unwrap());
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path: http::uri::PathAndQuery = format!("/{service}/{}", m.name()).parse().unwrap();
        let mut req = tonic::Request::new(DynamicMessage::new(m.input()));
        req.metadata_mut().insert("authorization", format!("Bearer {}", h.admin_token).parse().unwrap());
        let err = grpc.unary(req, path, DynamicCodec(m.clone())).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{service}: {err:?}");
    }
}

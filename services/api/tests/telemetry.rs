//! Spans reach an OTLP collector (an in-process one here), one per RPC,
//! joined to the caller's W3C trace context on REST and gRPC alike.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Harness;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use otherix_proto::v1::GetDefaultPoolRequest;
use otherix_proto::v1::cluster_service_client::ClusterServiceClient;

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_spans_are_exported_with_the_callers_trace_context() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let guard = otherix_telemetry::init(&otherix_telemetry::TelemetryConfig {
        service_name: "otherix-api-test".into(),
        level: "warn".into(),
        format: otherix_telemetry::LogFormat::Text,
        otlp_endpoint: Some(format!("http://{addr}")),
    })
    .unwrap();
    let guard = std::sync::Arc::new(guard);

    let h = Harness::start().await;
    h.wait_seeded().await;
    let rest_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let grpc_trace = "0af7651916cd43dd8448eb211c80319c";
    let r = h
        .http
        .get(h.url("/v1/cluster/default-pool"))
        .header("traceparent", format!("00-{rest_trace}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut client = ClusterServiceClient::new(h.authed(Some(&h.admin_token)).await);
    let mut req = tonic::Request::new(GetDefaultPoolRequest {});
    req.metadata_mut().insert("traceparent", format!("00-{grpc_trace}-00f067aa0ba902b7-01").parse().unwrap());
    client.get_default_pool(req).await.unwrap();
    client
        .set_default_pool(otherix_proto::v1::SetDefaultPoolRequest {
            name: "-bad".into(),
            request_id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();

    let mut spans = Vec::new();
    for _ in 0..100 {
        // The exporter runs on the runtime: flush from a blocking thread.
        let g = guard.clone();
        tokio::task::spawn_blocking(move || g.flush()).await.unwrap();
        spans = collector.0.lock().unwrap().clone();
        if spans.iter().filter(|s| s.name.starts_with("otherix.v1.ClusterService/")).count() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rpc: Vec<&Span> = spans.iter().filter(|s| s.name.starts_with("otherix.v1.ClusterService/")).collect();
    let rest = rpc.iter().find(|s| hex(&s.trace_id) == rest_trace).expect("the REST call's span joins its traceparent");
    assert_eq!(rest.name, "otherix.v1.ClusterService/GetDefaultPool");
    assert_eq!(attr(rest, "transport").as_deref(), Some("rest"));
    assert_eq!(attr(rest, "permission").as_deref(), Some("cluster:read"));
    assert_eq!(attr(rest, "rpc.grpc.status_code").as_deref(), Some("0"));
    assert_eq!(hex(&rest.parent_span_id), "00f067aa0ba902b7");

    let grpc = rpc.iter().find(|s| hex(&s.trace_id) == grpc_trace).expect("the gRPC call's span joins its traceparent");
    assert_eq!(attr(grpc, "transport").as_deref(), Some("grpc"));
    assert_eq!(attr(grpc, "caller").as_deref(), Some("admin"));

    let failed = rpc.iter().find(|s| s.name.ends_with("/SetDefaultPool")).expect("a span for the failed call");
    assert_eq!(attr(failed, "rpc.grpc.status_code").as_deref(), Some("3"));
    h.api.shutdown().await;
}

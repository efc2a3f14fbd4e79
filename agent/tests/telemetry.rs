//! The agent binary exports its spans over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (an in-process collector here), with `service.name` otherix-agent, as otherix-api does.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use otherix_agent_testkit::{AgentProcess, TestDir, wait_for};
use otherix_proto::otherix::agent::v1::ListPoolsRequest;
use otherix_proto::otherix::agent::v1::vm_runtime_service_client::VmRuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

/// Exported span names by `service.name`.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<HashMap<String, Vec<String>>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let names = seen.entry(service).or_default();
            for ss in rs.scope_spans {
                names.extend(ss.spans.into_iter().map(|s| s.name));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_otlp_collector() {
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

    let dir = TestDir::new("otlp");
    let socket = dir.path.join("agent.sock");
    let config = dir.path.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  unix_socket: {sock}\nruntime:\n  state_dir: {d}/state\n  pools:\n    - name: default\n      path: {d}/pool\n  qemu:\n    accel: tcg\n",
            sock = socket.display(),
            d = dir.path.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path.join("agent.log")).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_otherix-agent"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"))
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(log))
        .spawn()
        .unwrap();
    let _agent = AgentProcess { child };

    let ch = wait_for("the agent socket", Duration::from_secs(60), || {
        let socket: PathBuf = socket.clone();
        async move {
            Endpoint::try_from("http://agent.local")
                .unwrap()
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move { UnixStream::connect(socket).await.map(TokioIo::new) }
                }))
                .await
                .ok()
        }
    })
    .await;
    let pools = VmRuntimeServiceClient::new(ch).list_pools(ListPoolsRequest {}).await.unwrap().into_inner().pools;
    assert_eq!(pools.len(), 1);

    // The batch exporter sends within its scheduled delay (5 s).
    let names = wait_for("rpc.ListPools exported by otherix-agent", Duration::from_secs(30), || {
        let seen = collector.0.lock().unwrap().get("otherix-agent").cloned().unwrap_or_default();
        async move { seen.iter().any(|n| n == "rpc.ListPools").then_some(seen) }
    })
    .await;
    assert!(names.iter().any(|n| n == "runtime.open"), "{names:?}");
    let log = std::fs::read_to_string(dir.path.join("agent.log")).unwrap();
    assert!(log.contains("agent runtime ready"), "{log}");
    assert!(!log.contains("\u{1b}["), "colour codes in a log that is not a terminal: {log}");
}

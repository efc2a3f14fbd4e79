//! The real `otherix-agent` binary refuses image fetches to the cloud metadata address,
//! directly and through a redirect from an allowed HTTP server, and says so in the task and
//! in its log. No VM boots.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use otherix_agent_testkit::{AgentProcess, HttpServer, Route, TestDir, wait_for};
use otherix_proto::otherix::agent::v1::vm_runtime_service_client::VmRuntimeServiceClient;
use otherix_proto::otherix::agent::v1::{
    CreateVmRequest, GetTaskRequest, ImageFormat, ImageSource, ListVmsRequest, Task, TaskState, VmSpec,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

async fn connect(socket: PathBuf) -> VmRuntimeServiceClient<Channel> {
    let ch = wait_for("the agent socket", Duration::from_secs(60), || {
        let socket = socket.clone();
        async move {
            let ep = Endpoint::try_from("http://agent.local").unwrap();
            ep.connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { UnixStream::connect(socket).await.map(TokioIo::new) }
            }))
            .await
            .ok()
        }
    })
    .await;
    VmRuntimeServiceClient::new(ch)
}

async fn create(c: &mut VmRuntimeServiceClient<Channel>, task_id: &str, url: String) -> Task {
    let spec = VmSpec {
        name: "meta".into(),
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 0,
        pool: "default".into(),
        image: Some(ImageSource { url, sha256: String::new(), format: ImageFormat::Qcow2 as i32 }),
        cloud_init: None,
    };
    let req = CreateVmRequest {
        task_id: task_id.into(),
        vm_id: uuid::Uuid::new_v4().to_string(),
        generation: 1,
        spec: Some(spec),
    };
    let t = c.create_vm(req).await.unwrap().into_inner();
    for _ in 0..4 {
        let t = c.get_task(GetTaskRequest { task_id: t.task_id.clone(), wait_ms: 30_000 }).await.unwrap().into_inner();
        if t.state != TaskState::Running as i32 {
            return t;
        }
    }
    panic!("task {task_id} did not finish");
}

#[tokio::test]
async fn metadata_fetches_are_refused_directly_and_after_a_redirect() {
    let dir = TestDir::new("fetchpol");
    let mut routes = HashMap::new();
    routes.insert("/img/redirect.qcow2".to_string(), Route::Redirect("http://169.254.169.254/latest/x.qcow2".into()));
    let http = HttpServer::start(routes).await;
    let socket = dir.path.join("agent.sock");
    let config = dir.path.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  unix_socket: {sock}\nruntime:\n  state_dir: {d}/state\n  pools:\n    - name: default\n      path: {d}/pool\n  qemu:\n    accel: tcg\n  images:\n    allowed_schemes: [http]\n    fetch_allow: [127.0.0.1]\n",
            sock = socket.display(),
            d = dir.path.display()
        ),
    )
    .unwrap();
    let log_path = dir.path.join("agent.log");
    let _agent = AgentProcess::start(std::path::Path::new(env!("CARGO_BIN_EXE_otherix-agent")), &config, &log_path);
    let mut c = connect(socket).await;

    let direct = create(&mut c, "direct", "http://169.254.169.254/latest/x.qcow2".into()).await;
    let via = create(&mut c, "redirect", http.url("/img/redirect.qcow2")).await;
    for (t, want) in [(&direct, "address 169.254.169.254 is metadata"), (&via, "redirect to http://169.254.169.254/")] {
        assert_eq!(t.state, TaskState::Failed as i32, "{t:?}");
        let e = t.error.as_ref().unwrap();
        assert_eq!(e.code, "download_failed", "{t:?}");
        assert!(e.message.contains(want), "{t:?}");
    }
    // The redirecting server was asked: the refusal came from the redirect check.
    assert_eq!(http.hits("/img/redirect.qcow2"), 1);
    // Nothing was left behind, and the log says why.
    assert!(c.list_vms(ListVmsRequest {}).await.unwrap().into_inner().vms.is_empty());
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("task failed") && log.contains("is metadata"), "{log}");
}

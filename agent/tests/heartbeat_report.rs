//! What the real agent reports over the heartbeat, against a stand-in control plane (a TLS
//! heartbeat server on a test CA) and one real TCG VM: the accelerator in use, the pool the
//! control plane declared (created under the pool root and usable for VMs), its image cache
//! (name, sha256, size), and CPUs taken by the running VM and given back by its deletion,
//! reported at once when the task finishes (the control plane's interval here is 10 minutes).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use otherix_agent_testkit::{AgentProcess, HttpServer, Route, TestDir, sha256_file, vm_slots, wait_for};
use otherix_pki::ClusterCa;
use otherix_proto::otherix::agent::v1::heartbeat_service_server::{HeartbeatService, HeartbeatServiceServer};
use otherix_proto::otherix::agent::v1::vm_runtime_service_client::VmRuntimeServiceClient;
use otherix_proto::otherix::agent::v1::{
    CloudInit, CreateVmRequest, DeclaredPool, DeleteVmRequest, GetTaskRequest, HeartbeatRequest, HeartbeatResponse,
    ImageFormat, ImageSource, Task, TaskState, VmSpec,
};
use tokio::net::{TcpListener, UnixStream};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status, Streaming};

const VALIDITY: Duration = Duration::from_secs(3600);

type Reports = Arc<Mutex<Vec<HeartbeatRequest>>>;

/// Records every report; answers with the `default` pool (no path) and a 10 minute interval.
struct FakeCp {
    reports: Reports,
}

#[tonic::async_trait]
impl HeartbeatService for FakeCp {
    type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<HeartbeatResponse, Status>> + Send>>;

    async fn heartbeat(
        &self,
        req: Request<Streaming<HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut inbound = req.into_inner();
        let reports = self.reports.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                reports.lock().unwrap().push(r);
                let answer = HeartbeatResponse {
                    received_at: None,
                    declared_pools: vec![DeclaredPool { name: "default".into(), path: String::new() }],
                    heartbeat_interval_seconds: 600,
                };
                if tx.send(Ok(answer)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the fake control plane over TLS (client certificates from `ca` required).
async fn start_cp(ca: &ClusterCa, reports: Reports) -> SocketAddr {
    let cert = ca.issue_server_cert(&["127.0.0.1".into()], VALIDITY).unwrap();
    let tls = otherix_pki::server_config_mtls(&cert.cert_pem, &cert.key_pem, ca.cert_pem(), true).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<_, std::io::Error>>(4);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    let _ = tx.send(Ok(tls)).await;
                }
            });
        }
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HeartbeatServiceServer::new(FakeCp { reports }))
            .serve_with_incoming(ReceiverStream::new(rx)),
    );
    addr
}

fn write_material(ca: &ClusterCa, dir: &Path, node: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let (key, csr) = otherix_pki::generate_agent_key_and_csr(node).unwrap();
    let signed = ca.sign_agent_csr(&csr, node, VALIDITY).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("agent.crt"), &signed.cert_pem).unwrap();
    std::fs::write(dir.join("agent.key"), &key).unwrap();
    std::fs::set_permissions(dir.join("agent.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
}

async fn connect(socket: std::path::PathBuf) -> VmRuntimeServiceClient<Channel> {
    let ch = wait_for("the agent socket", Duration::from_secs(60), || {
        let socket = socket.clone();
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
    VmRuntimeServiceClient::new(ch)
}

async fn finish(c: &mut VmRuntimeServiceClient<Channel>, t: Task) -> Task {
    for _ in 0..4 {
        let t = c.get_task(GetTaskRequest { task_id: t.task_id.clone(), wait_ms: 60_000 }).await.unwrap().into_inner();
        if t.state != TaskState::Running as i32 {
            return t;
        }
    }
    panic!("task {} did not finish", t.task_id);
}

/// Waits for a report (among those after `from`) satisfying `f`.
async fn report_where(
    reports: &Reports,
    from: usize,
    limit: Duration,
    f: impl Fn(&HeartbeatRequest) -> bool,
) -> HeartbeatRequest {
    let what = "a matching heartbeat report";
    wait_for(what, limit, || {
        let found = reports.lock().unwrap().iter().skip(from).find(|r| f(r)).cloned();
        async move { found }
    })
    .await
}

fn cpus(r: &HeartbeatRequest) -> (u32, u32) {
    (r.capabilities.as_ref().unwrap().cpu_cores, r.resources.as_ref().unwrap().cpu_available)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_accelerator_pools_cache_and_cpus() {
    let _slots = vm_slots(1);
    let image = otherix_agent_testkit::test_image();
    let dir = TestDir::new("hb");
    let mut routes = HashMap::new();
    routes.insert("/img/test.qcow2".to_string(), Route::File(image.qcow2()));
    let http = HttpServer::start(routes).await;

    let ca = ClusterCa::generate().unwrap();
    let reports: Reports = Arc::default();
    let cp = start_cp(&ca, reports.clone()).await;
    let certs = dir.path.join("certs");
    write_material(&ca, &certs, "hb-node");
    let socket = dir.path.join("agent.sock");
    let config = dir.path.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "bootstrap:\n  cp_url: https://127.0.0.1:{port}\ntls:\n  cert_dir: {certs}\n\
             server:\n  listen: 127.0.0.1:0\n  unix_socket: {sock}\nstorage:\n  pool_root: {d}/pools\n\
             capacity:\n  max_cpus: 2\nruntime:\n  state_dir: {d}/state\n  qemu:\n    accel: tcg\n\
             \x20 images:\n    allowed_schemes: [http]\n    fetch_allow: [127.0.0.1]\n",
            port = cp.port(),
            certs = certs.display(),
            sock = socket.display(),
            d = dir.path.display()
        ),
    )
    .unwrap();
    let _agent = AgentProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_otherix-agent")),
        &config,
        &dir.path.join("agent.log"),
    );
    let agent_log = || std::fs::read_to_string(dir.path.join("agent.log")).unwrap_or_default();

    // The declared pool shows up in a report (the first answer declared it), under the root.
    let r = report_where(&reports, 0, Duration::from_secs(30), |r| {
        r.pools.iter().any(|p| p.reconciliation_status == "ready")
    })
    .await;
    let pool = r.pools[0].pool.clone().unwrap();
    assert_eq!(
        (pool.name.as_str(), pool.path.clone()),
        ("default", dir.path.join("pools/default").display().to_string())
    );
    assert!(dir.path.join("pools/default").is_dir());
    assert_eq!(r.capabilities.as_ref().unwrap().accelerator, "tcg");
    let (cores, available) = cpus(&r);
    assert_eq!(available, cores, "no VM yet: {}", agent_log());

    // A VM in the declared pool: its vCPU is taken, its image is in the cache report.
    let mut c = connect(socket).await;
    let vm_id = uuid::Uuid::new_v4().to_string();
    let spec = VmSpec {
        name: "hb-vm".into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 0,
        pool: "default".into(),
        image: Some(ImageSource {
            url: http.url("/img/test.qcow2"),
            sha256: String::new(),
            format: ImageFormat::Qcow2 as i32,
        }),
        cloud_init: Some(CloudInit::default()),
    };
    let t = c
        .create_vm(CreateVmRequest {
            task_id: "hb-create".into(),
            vm_id: vm_id.clone(),
            generation: 1,
            spec: Some(spec),
        })
        .await
        .unwrap()
        .into_inner();
    let t = finish(&mut c, t).await;
    assert_eq!(t.state, TaskState::Succeeded as i32, "{:?}\n{}", t.error, agent_log());
    let sha = sha256_file(&image.qcow2());
    let size = std::fs::metadata(image.qcow2()).unwrap().len();
    let r = report_where(&reports, 0, Duration::from_secs(20), |r| {
        cpus(r).1 + 1 == cpus(r).0
            && r.pools.iter().any(|p| p.pool.as_ref().is_some_and(|p| p.images.iter().any(|i| i.name == "test.qcow2")))
    })
    .await;
    let img = r.pools[0].pool.as_ref().unwrap().images.iter().find(|i| i.name == "test.qcow2").unwrap().clone();
    assert_eq!((img.sha256.as_str(), img.size_bytes), (sha.as_str(), size));

    // Deleting it gives the CPU back, reported at once (not after the 10 minute interval).
    let seen = reports.lock().unwrap().len();
    let t = c.delete_vm(DeleteVmRequest { task_id: "hb-delete".into(), vm_id }).await.unwrap().into_inner();
    assert_eq!(finish(&mut c, t).await.state, TaskState::Succeeded as i32);
    report_where(&reports, seen, Duration::from_secs(10), |r| cpus(r).0 == cpus(r).1).await;
}

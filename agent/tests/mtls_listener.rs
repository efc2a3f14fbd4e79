//! The agent's mTLS listener, with the real binary and cert material from a test CA: a
//! control-plane replica certificate is served, another node's certificate, a certificate
//! from another CA and a client without a certificate are all refused. No QEMU.

use std::path::Path;
use std::time::Duration;

use otherix_agent_testkit::{AgentProcess, TestDir};
use otherix_pki::ClusterCa;
use otherix_proto::otherix::agent::v1::ListPoolsRequest;
use otherix_proto::otherix::agent::v1::vm_runtime_service_client::VmRuntimeServiceClient;
use tonic::transport::{ClientTlsConfig, Endpoint, Identity};

const VALIDITY: Duration = Duration::from_secs(3600);

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

/// The port the agent bound for `server.listen: 127.0.0.1:0`, from its log line (no
/// bind-drop-rebind race with other tests).
async fn bound_port(log: &Path) -> u16 {
    otherix_agent_testkit::wait_for("the agent's mTLS listener", Duration::from_secs(30), || async {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let line = text.lines().find(|l| l.contains("serving the agent API over mTLS"))?;
        let addr = line.split("addr=Some(").nth(1)?.split(')').next()?;
        addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
    })
    .await
}

/// Calls ListPools over mTLS as `identity` (cert, key), accepting the server the way the
/// control plane does: a certificate from `ca` naming node worker-1.
async fn list_pools(port: u16, ca: &str, identity: Option<(&str, &str)>) -> Result<usize, String> {
    let mut tls = ClientTlsConfig::new().domain_name("node-worker-1.agents.otherix.local");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let ch = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config_with_verifier(tls, otherix_pki::node_server_verifier(ca, "worker-1").unwrap())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    VmRuntimeServiceClient::new(ch)
        .list_pools(ListPoolsRequest {})
        .await
        .map(|r| r.into_inner().pools.len())
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test]
async fn only_the_control_plane_is_served() {
    let dir = TestDir::new("mtls");
    let ca = ClusterCa::generate().unwrap();
    let certs = dir.path.join("certs");
    write_material(&ca, &certs, "worker-1");
    let config = dir.path.join("agent.yaml");
    // The control plane is not running: the heartbeat keeps retrying, the listener serves.
    std::fs::write(
        &config,
        format!(
            "bootstrap:\n  cp_url: https://127.0.0.1:1\ntls:\n  cert_dir: {certs}\nserver:\n  listen: 127.0.0.1:0\n\
             runtime:\n  state_dir: {d}/state\n  qemu:\n    accel: tcg\n",
            certs = certs.display(),
            d = dir.path.display()
        ),
    )
    .unwrap();
    let _agent = AgentProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_otherix-agent")),
        &config,
        &dir.path.join("agent.log"),
    );
    let port = bound_port(&dir.path.join("agent.log")).await;

    let replica = ca.issue_server_cert(&["localhost".into()], VALIDITY).unwrap();
    let mut served = Err(String::new());
    for _ in 0..100 {
        served = list_pools(port, ca.cert_pem(), Some((&replica.cert_pem, &replica.key_pem))).await;
        if served.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = || std::fs::read_to_string(dir.path.join("agent.log")).unwrap_or_default();
    assert_eq!(served, Ok(0), "{}", log());

    // Another node's certificate (same CA): refused in the handshake, for its identity.
    let other = dir.path.join("other");
    write_material(&ca, &other, "worker-2");
    let (cert, key) = (
        std::fs::read_to_string(other.join("agent.crt")).unwrap(),
        std::fs::read_to_string(other.join("agent.key")).unwrap(),
    );
    assert!(list_pools(port, ca.cert_pem(), Some((&cert, &key))).await.is_err());
    // No client certificate: the handshake fails.
    assert!(list_pools(port, ca.cert_pem(), None).await.is_err());
    // A replica certificate from another CA: the handshake fails.
    let rogue = ClusterCa::generate().unwrap();
    let fake = rogue.issue_server_cert(&["localhost".into()], VALIDITY).unwrap();
    assert!(list_pools(port, ca.cert_pem(), Some((&fake.cert_pem, &fake.key_pem))).await.is_err());
    let log = log();
    assert!(log.contains("not the control plane: the certificate of node \"worker-2\""), "{log}");
    assert!(log.contains("mTLS handshake failed"), "{log}");
    assert!(log.contains("agent: using existing cert material"), "{log}");
}

//! The heartbeat client against a real mTLS server: identity from the cert, reports,
//! declared pools, interval from the server, triggers, reconnect after a restart, refusals.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{TestCp, wait_for};
use otherix_agent_enrolment::{
    BootstrapOptions, BootstrapOutcome, DirPools, FactsConfig, HeartbeatClient, HeartbeatConfig, HostFactsProvider,
    Material, TokenSource, bootstrap,
};
use otherix_proto::otherix::agent::v1::DeclaredPool;

async fn enrol(cp: &TestCp, dir: &std::path::Path, name: &str) -> Material {
    let o = BootstrapOptions::new(
        cp.url(),
        TokenSource::Value("otx_join_test".into()),
        cp.fingerprint(),
        name,
        "127.0.0.1:9443",
        dir.join(name).join("certs"),
    );
    match bootstrap(&o).await.unwrap() {
        BootstrapOutcome::Bootstrapped { material, .. } => material,
        other => panic!("{other:?}"),
    }
}

fn fast() -> HeartbeatConfig {
    HeartbeatConfig {
        interval: Duration::from_secs(30),
        change_check_interval: Duration::from_millis(200),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        refused_retry: Duration::from_millis(400),
        connect_timeout: Duration::from_secs(5),
        stale_after_intervals: 3,
    }
}

#[tokio::test]
async fn reports_pools_interval_trigger_and_reconnect() {
    common::init_tracing();
    let mut cp = TestCp::start();
    let dir = tempfile::tempdir().unwrap();
    let material = enrol(&cp, dir.path(), "worker-1").await;

    let pool_root = dir.path().join("pools");
    let pools = Arc::new(DirPools::new(&pool_root));
    let mut facts_cfg = FactsConfig::new(dir.path().join("state"));
    facts_cfg.capacity.max_cpus = Some(1);
    facts_cfg.capacity.max_memory_bytes = Some(1 << 30);
    facts_cfg.qemu_binary = Some("/nonexistent/qemu".into());
    let facts = Arc::new(HostFactsProvider::new(facts_cfg, "0.1.0-test", Some(pools.clone())));
    *cp.state.declared.lock().unwrap() = vec![DeclaredPool { name: "default".into(), path: String::new() }];

    let client = HeartbeatClient::new(&cp.url(), &material, facts, pools.clone()).unwrap().with_config(fast()).unwrap();
    let trigger = client.trigger();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(client.run(async move {
        let _ = stop_rx.await;
    }));

    // The first report comes at once, under the cert's identity.
    let (identity, first) =
        wait_for("the first report", Duration::from_secs(10), || cp.state.reports().first().cloned()).await;
    assert_eq!(identity, "worker-1");
    assert_eq!(first.agent_version, "0.1.0-test");
    assert!(first.architecture == "amd64" || first.architecture == "arm64");
    let caps = first.capabilities.clone().unwrap();
    assert_eq!(caps.cpu_cores, 1);
    assert!(caps.memory_bytes <= 1 << 30 && caps.memory_bytes > 0);
    assert!(caps.accelerator == "tcg" || caps.accelerator == "kvm");
    assert_eq!(caps.qemu_version, "");
    assert!(!caps.kernel_version.is_empty());
    let res = first.resources.unwrap();
    assert!(res.memory_total_bytes >= caps.memory_bytes);
    assert!(res.system_disk_total_bytes > 0);

    // The declared pool reaches the sink, the directory appears, and a report with the pool
    // follows without waiting for the 30 s interval (the facts changed).
    wait_for("the pool directory", Duration::from_secs(10), || pool_root.join("default").is_dir().then_some(())).await;
    let with_pool = wait_for("a report with the pool", Duration::from_secs(10), || {
        cp.state.reports().into_iter().find(|(_, r)| !r.pools.is_empty()).map(|(_, r)| r)
    })
    .await;
    assert_eq!(with_pool.pools[0].pool.as_ref().unwrap().name, "default");
    assert_eq!(with_pool.pools[0].reconciliation_status, "ready");
    assert!(with_pool.pools[0].pool.as_ref().unwrap().capacity_bytes > 0);

    // A trigger reports now.
    let n = cp.state.reports().len();
    trigger.notify_one();
    wait_for("a triggered report", Duration::from_secs(5), || (cp.state.reports().len() > n).then_some(())).await;

    // The server's interval wins: at 1 s, reports keep coming.
    cp.state.interval_secs.store(1, Ordering::SeqCst);
    trigger.notify_one();
    let n = cp.state.reports().len();
    wait_for("interval reports", Duration::from_secs(10), || (cp.state.reports().len() >= n + 3).then_some(())).await;

    // Restart the server on the same port with the same CA: the client reconnects.
    let (ca, state, addr) = (cp.ca.clone(), cp.state.clone(), cp.addr);
    cp.stop();
    let streams_before = state.streams.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cp = TestCp::start_with(ca, state.clone(), Some(addr), &["localhost", "127.0.0.1"]);
    wait_for("a new stream", Duration::from_secs(15), || {
        (state.streams.load(Ordering::SeqCst) > streams_before).then_some(())
    })
    .await;
    let n = state.reports().len();
    wait_for("reports after the restart", Duration::from_secs(10), || (state.reports().len() > n).then_some(())).await;
    assert!(state.reports().iter().all(|(id, _)| id == "worker-1"));

    // Shutdown stops the client.
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("client stops on shutdown").unwrap();
    drop(cp);
}

#[tokio::test]
async fn revoked_cert_is_retried_at_max_backoff_until_readmitted() {
    common::init_tracing();
    let cp = TestCp::start();
    let dir = tempfile::tempdir().unwrap();
    let material = enrol(&cp, dir.path(), "worker-2").await;
    cp.state.revoked.lock().unwrap().push("worker-2".into());
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Vec<DeclaredPool>>::new()));
    let sink_seen = seen.clone();
    let sink = move |p: Vec<DeclaredPool>| sink_seen.lock().unwrap().push(p);
    let facts = Arc::new(HostFactsProvider::new(FactsConfig::new(dir.path()), "v", None));
    let client =
        HeartbeatClient::new(&cp.url(), &material, facts, Arc::new(sink)).unwrap().with_config(fast()).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(client.run(async move {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(cp.state.reports().is_empty());
    assert_eq!(cp.state.streams.load(Ordering::SeqCst), 0);
    // Readmitted: the next retry gets through, and answers reach the (closure) sink.
    cp.state.revoked.lock().unwrap().clear();
    *cp.state.declared.lock().unwrap() = vec![DeclaredPool { name: "p".into(), path: "/x".into() }];
    wait_for("a report after readmission", Duration::from_secs(5), || cp.state.reports().first().cloned()).await;
    wait_for("the sink", Duration::from_secs(5), || seen.lock().unwrap().first().cloned()).await;
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_cert_from_another_ca_never_gets_a_stream() {
    common::init_tracing();
    let cp = TestCp::start();
    let dir = tempfile::tempdir().unwrap();
    let mut material = enrol(&cp, dir.path(), "worker-3").await;
    // Same CA for the server, but our cert and key from elsewhere: the handshake fails.
    let other = otherix_pki::ClusterCa::generate().unwrap();
    let (key, csr) = otherix_pki::generate_agent_key_and_csr("worker-3").unwrap();
    material.cert_pem = other.sign_agent_csr(&csr, "worker-3", Duration::from_secs(3600)).unwrap().cert_pem;
    material.key_pem = key;
    let facts = Arc::new(HostFactsProvider::new(FactsConfig::new(dir.path()), "v", None));
    let client = HeartbeatClient::new(&cp.url(), &material, facts, Arc::new(|_: Vec<DeclaredPool>| {}))
        .unwrap()
        .with_config(fast())
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(client.run(async move {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(cp.state.reports().is_empty());
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
}

/// A node certificate cannot serve as the control plane to an agent's heartbeat client: a
/// fake control plane on 127.0.0.1 presenting another node's certificate from the same CA
/// (one that even names 127.0.0.1) gets handshakes (so the client tried) but never a stream
/// or a report.
#[tokio::test]
async fn a_node_certificate_cannot_pose_as_the_control_plane() {
    common::init_tracing();
    let cp = TestCp::start();
    let dir = tempfile::tempdir().unwrap();
    let material = enrol(&cp, dir.path(), "victim").await;
    // A certificate as issued before node certificates named the node only: it names
    // 127.0.0.1 and localhost and allows serverAuth, so only the identity check stops it.
    let (cert, key) = common::legacy_node_cert(&cp.ca, "impostor");
    let fake = TestCp::start_impostor(cp.ca.clone(), &cert, &key);
    let facts = Arc::new(HostFactsProvider::new(FactsConfig::new(dir.path()), "v", None));
    let declared = Arc::new(std::sync::Mutex::new(0usize));
    let sink_declared = declared.clone();
    let sink = move |_: Vec<DeclaredPool>| *sink_declared.lock().unwrap() += 1;
    let client =
        HeartbeatClient::new(&fake.url(), &material, facts, Arc::new(sink)).unwrap().with_config(fast()).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(client.run(async move {
        let _ = stop_rx.await;
    }));
    wait_for("two refused handshakes", Duration::from_secs(10), || {
        (fake.state.handshake_failures.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    assert_eq!(fake.state.streams.load(Ordering::SeqCst), 0);
    assert!(fake.state.reports().is_empty());
    assert_eq!(*declared.lock().unwrap(), 0, "nothing from the impostor was applied");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
}

/// A deleted node learns it from the refusal (`node_deleted`) and checks back only every
/// `refused_retry`, not at the reconnect backoff.
#[tokio::test]
async fn a_deleted_node_stops_retrying_hot() {
    common::init_tracing();
    let cp = TestCp::start();
    let dir = tempfile::tempdir().unwrap();
    let material = enrol(&cp, dir.path(), "worker-4").await;
    cp.state.deleted.lock().unwrap().push("worker-4".into());
    let facts = Arc::new(HostFactsProvider::new(FactsConfig::new(dir.path()), "v", None));
    let config = HeartbeatConfig {
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(50),
        refused_retry: Duration::from_secs(4),
        ..fast()
    };
    let client = HeartbeatClient::new(&cp.url(), &material, facts, Arc::new(|_: Vec<DeclaredPool>| {}))
        .unwrap()
        .with_config(config)
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(client.run(async move {
        let _ = stop_rx.await;
    }));
    wait_for("the first refusal", Duration::from_secs(10), || {
        (cp.state.refusals.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    // At the 50 ms backoff this would be dozens of attempts; the jittered retry is >= 2 s.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(cp.state.refusals.load(Ordering::SeqCst), 1);
    assert!(cp.state.reports().is_empty());
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
}

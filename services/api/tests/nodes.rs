//! Node enrolment and the agent channel against a real etcd and real TLS:
//! join tokens, the CA pin, CSR signing, mTLS heartbeats, node lifecycle.

mod common;

use std::time::Duration;

use common::{Harness, client_with};
use otherix_errors::{ApiError, ErrorCode};
use otherix_proto::otherix::agent::v1::enrolment_service_client::EnrolmentServiceClient;
use otherix_proto::otherix::agent::v1::heartbeat_service_client::HeartbeatServiceClient;
use otherix_proto::otherix::agent::v1::{Capabilities, HeartbeatRequest, HeartbeatResponse, JoinRequest, Resources};
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

async fn call(r: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

struct Agent {
    name: String,
    key: String,
    cert: String,
}

async fn harness() -> Harness {
    Harness::start_config(|c| {
        c.nodes.heartbeat_interval_seconds = 1;
        c.nodes.stale_threshold_seconds = 2;
        c.nodes.gone_grace_seconds = 2;
    })
    .await
}

fn agent_url(h: &Harness) -> String {
    format!("https://localhost:{}", h.api.agent_addr().unwrap().port())
}

async fn channel(h: &Harness, ca: &str, identity: Option<(&str, &str)>) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(agent_url(h)).unwrap().tls_config(tls).unwrap().connect().await
}

async fn ca_pem(h: &Harness) -> (String, String) {
    let (s, body) = call(h.anon.get(h.url("/v1/ca"))).await;
    assert_eq!(s, 200);
    (body["ca_cert_pem"].as_str().unwrap().to_owned(), body["fingerprint_sha256"].as_str().unwrap().to_owned())
}

async fn join(h: &Harness, ca: &str, token: &str, name: &str) -> Result<Agent, ApiError> {
    join_advertising(h, ca, token, name, "127.0.0.1:9443").await
}

async fn join_advertising(h: &Harness, ca: &str, token: &str, name: &str, endpoint: &str) -> Result<Agent, ApiError> {
    let (key, csr) = otherix_pki::generate_agent_key_and_csr(name).unwrap();
    let mut c = EnrolmentServiceClient::new(channel(h, ca, None).await.unwrap());
    let resp = c
        .join(JoinRequest {
            token: token.into(),
            csr_pem: csr,
            node_name: name.into(),
            architecture: "amd64".into(),
            advertised_endpoint: endpoint.into(),
        })
        .await
        .map_err(|s| ApiError::from_status(&s))?
        .into_inner();
    otherix_pki::verify_chain(&resp.cert_pem, ca).unwrap();
    Ok(Agent { name: name.into(), key, cert: resp.cert_pem })
}

fn report() -> HeartbeatRequest {
    HeartbeatRequest {
        agent_version: "0.1.0".into(),
        architecture: "amd64".into(),
        capabilities: Some(Capabilities {
            cpu_cores: 2,
            memory_bytes: 4 << 30,
            accelerator: "tcg".into(),
            qemu_version: "7.2.22".into(),
            ..Default::default()
        }),
        resources: Some(Resources {
            cpu_available: 2,
            memory_available_bytes: 3 << 30,
            memory_total_bytes: 4 << 30,
            system_disk_total_bytes: 100 << 30,
            system_disk_free_bytes: 50 << 30,
        }),
        pools: vec![],
    }
}

/// Opens a heartbeat stream, sends one report and returns the first answer and the stream.
async fn beat(
    h: &Harness,
    ca: &str,
    a: &Agent,
) -> Result<
    (HeartbeatResponse, tokio::sync::mpsc::Sender<HeartbeatRequest>, tonic::Streaming<HeartbeatResponse>),
    ApiError,
> {
    let ch = channel(h, ca, Some((&a.cert, &a.key)))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unauthenticated, e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(report()).await.unwrap();
    let mut resp = HeartbeatServiceClient::new(ch)
        .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| ApiError::from_status(&s))?
        .into_inner();
    let first = resp.message().await.map_err(|s| ApiError::from_status(&s))?.ok_or_else(ApiError::internal)?;
    Ok((first, tx, resp))
}

async fn node_status(h: &Harness, name: &str) -> Value {
    call(h.http.get(h.url(&format!("/v1/nodes/{name}")))).await.1
}

async fn wait_status(h: &Harness, name: &str, want: &str) {
    for _ in 0..200 {
        if node_status(h, name).await["status"] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node {name} never became {want}: {}", node_status(h, name).await);
}

#[tokio::test]
async fn two_agents_join_and_become_ready() {
    let h = harness().await;
    let (ca, fingerprint) = ca_pem(&h).await;
    assert!(fingerprint.starts_with("sha256:"));
    let (s, multi) =
        call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({"ttl_seconds": 600, "max_uses": 5}))).await;
    assert_eq!(s, 200, "{multi}");
    assert_eq!(multi["ca_fingerprint_sha256"], fingerprint);
    assert!(multi["token"].as_str().unwrap().starts_with("otx_join_"));
    let (_, single) =
        call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({"intended_node_name": "node-b"}))).await;
    assert_eq!(single["join_token"]["max_uses"], 1);

    let a = join(&h, &ca, multi["token"].as_str().unwrap(), "node-a").await.unwrap();
    let b = join(&h, &ca, single["token"].as_str().unwrap(), "node-b").await.unwrap();
    assert_eq!(node_status(&h, "node-a").await["status"], "pending");
    for agent in [&a, &b] {
        let (answer, _tx, _rx) = beat(&h, &ca, agent).await.unwrap();
        assert_eq!(answer.heartbeat_interval_seconds, 1);
        assert_eq!(answer.declared_pools[0].name, "default");
        let n = node_status(&h, &agent.name).await;
        assert_eq!(n["status"], "ready", "{n}");
        assert_eq!(n["accelerator"], "tcg");
        assert_eq!(n["capacity"]["cpu_cores"], 2);
    }
    let (_, list) = call(h.http.get(h.url("/v1/nodes"))).await;
    let names: Vec<&str> = list["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["node-a", "node-b"]);
    // Viewers see the reduced shape.
    let viewer = h.user_token("vince", "viewer").await;
    let (_, n) = call(client_with(&viewer).get(h.url("/v1/nodes/node-a"))).await;
    assert_eq!(n["status"], "ready");
    assert!(n.get("capacity").is_none() && n.get("advertised_endpoint").is_some_and(|v| v == ""), "{n}");

    // Consumptions are recorded with the source address.
    let id = multi["join_token"]["id"].as_str().unwrap();
    let (_, c) = call(h.http.get(h.url(&format!("/v1/nodes/join-tokens/{id}/consumptions")))).await;
    assert_eq!(c["consumptions"][0]["node_name"], "node-a");
    assert_eq!(c["consumptions"][0]["source_address"], "127.0.0.1");
    let (_, tokens) = call(h.http.get(h.url("/v1/nodes/join-tokens"))).await;
    let listed = tokens["join_tokens"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "the spent single-use token is not listed: {tokens}");
    assert_eq!(listed[0]["consumption_count"], 1);
}

#[tokio::test]
async fn join_refusals() {
    let h = harness().await;
    let (ca, _) = ca_pem(&h).await;
    let (_, single) = call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({"max_uses": 1}))).await;
    let token = single["token"].as_str().unwrap();
    join(&h, &ca, token, "n1").await.unwrap();
    assert_eq!(join(&h, &ca, token, "n2").await.err().map(|e| e.code), Some(ErrorCode::TokenExhausted));
    assert_eq!(join(&h, &ca, "otx_join_nope", "n3").await.err().map(|e| e.code), Some(ErrorCode::TokenInvalid));
    let forged = format!("otx_join_{}", "A".repeat(43));
    assert_eq!(join(&h, &ca, &forged, "n3").await.err().map(|e| e.code), Some(ErrorCode::TokenInvalid));

    let (_, t) = call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({}))).await;
    let id = t["join_token"]["id"].as_str().unwrap();
    assert_eq!(call(h.http.delete(h.url(&format!("/v1/nodes/join-tokens/{id}")))).await.0, 200);
    assert_eq!(
        join(&h, &ca, t["token"].as_str().unwrap(), "n4").await.err().map(|e| e.code),
        Some(ErrorCode::TokenExpired)
    );

    // A token whose lifetime ran out (the record's expiry moved into the past).
    let (_, t) = call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({"ttl_seconds": 60}))).await;
    let id = t["join_token"]["id"].as_str().unwrap().to_owned();
    let store = otherix_store::Store::connect(&[h.etcd.endpoint()], Duration::from_secs(5)).await.unwrap();
    store
        .update::<otherix_proto::otherix::store::v1::JoinTokenRecord, otherix_store::StoreError, _>(
            &format!("join_tokens/{id}"),
            |cur| {
                Ok(cur.map(|r| otherix_proto::otherix::store::v1::JoinTokenRecord {
                    expires_at: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
                    ..r.clone()
                }))
            },
        )
        .await
        .unwrap();
    assert_eq!(
        join(&h, &ca, t["token"].as_str().unwrap(), "n5").await.err().map(|e| e.code),
        Some(ErrorCode::TokenExpired)
    );

    // A node with an active certificate cannot join twice.
    let (_, t) = call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({}))).await;
    assert_eq!(
        join(&h, &ca, t["token"].as_str().unwrap(), "n1").await.err().map(|e| e.code),
        Some(ErrorCode::Conflict)
    );
    // A bound token enrols only its node.
    let (_, t) = call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({"intended_node_name": "n7"}))).await;
    assert_eq!(
        join(&h, &ca, t["token"].as_str().unwrap(), "n8").await.err().map(|e| e.code),
        Some(ErrorCode::ValidationFailed)
    );
    // Bad TTL.
    let (s, body) = call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({"ttl_seconds": 5}))).await;
    assert_eq!((s, body["error"]["details"]["field"].as_str()), (400, Some("ttl_seconds")));
}

#[tokio::test]
async fn only_enrolled_agents_reach_the_heartbeat() {
    let h = harness().await;
    let (ca, _) = ca_pem(&h).await;
    let (_, t) = call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({}))).await;
    let a = join(&h, &ca, t["token"].as_str().unwrap(), "node-a").await.unwrap();

    // A certificate from another CA: the handshake fails.
    let other = otherix_pki::ClusterCa::generate().unwrap();
    let (key, csr) = otherix_pki::generate_agent_key_and_csr("node-a").unwrap();
    let foreign = other.sign_agent_csr(&csr, "node-a", Duration::from_secs(3600)).unwrap();
    let impostor = Agent { name: "node-a".into(), key, cert: foreign.cert_pem };
    assert!(beat(&h, &ca, &impostor).await.is_err());

    // No client certificate: refused.
    let mut c = HeartbeatServiceClient::new(channel(&h, &ca, None).await.unwrap());
    let err = c.heartbeat(tokio_stream::iter(vec![report()])).await.unwrap_err();
    assert_eq!(ApiError::from_status(&err).code, ErrorCode::Unauthenticated);

    // A user token does not open the agent plane, not even an admin's.
    let mut req = tonic::Request::new(tokio_stream::iter(vec![report()]));
    req.metadata_mut().insert("authorization", format!("Bearer {}", h.admin_token).parse().unwrap());
    let err = c.heartbeat(req).await.unwrap_err();
    assert_eq!(ApiError::from_status(&err).code, ErrorCode::Unauthenticated);

    // An agent certificate does not open user RPCs: the agent listener does
    // not serve them at all.
    let ch = channel(&h, &ca, Some((&a.cert, &a.key))).await.unwrap();
    let mut users = otherix_proto::v1::user_service_client::UserServiceClient::new(ch);
    let err = users.get_me(otherix_proto::v1::GetMeRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}

#[tokio::test]
async fn lifecycle_unreachable_gone_readmit_cordon_delete() {
    let h = harness().await;
    let (ca, _) = ca_pem(&h).await;
    let (_, t) = call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({}))).await;
    let a = join(&h, &ca, t["token"].as_str().unwrap(), "node-a").await.unwrap();
    let (_, tx, _rx) = beat(&h, &ca, &a).await.unwrap();
    drop(tx);
    wait_status(&h, "node-a", "unreachable").await;
    wait_status(&h, "node-a", "gone").await;
    let err = beat(&h, &ca, &a).await.err().unwrap();
    assert_eq!(err.code, ErrorCode::NodeGone, "{err}");
    let (s, n) = call(h.http.post(h.url("/v1/nodes/node-a/readmit")).json(&json!({}))).await;
    assert_eq!((s, n["status"].as_str()), (200, Some("pending")));
    beat(&h, &ca, &a).await.unwrap();
    assert_eq!(node_status(&h, "node-a").await["status"], "ready");

    let (s, n) = call(h.http.post(h.url("/v1/nodes/node-a/cordon")).json(&json!({}))).await;
    assert_eq!((s, n["cordoned"].as_bool()), (200, Some(true)));
    assert_eq!(call(h.http.post(h.url("/v1/nodes/node-a/cordon")).json(&json!({}))).await.0, 200);
    let (_, n) = call(h.http.post(h.url("/v1/nodes/node-a/uncordon")).json(&json!({}))).await;
    assert_eq!(n["cordoned"], false);
    let (s, body) = call(h.http.post(h.url("/v1/nodes/node-a/readmit")).json(&json!({}))).await;
    assert_eq!((s, body["error"]["code"].as_str()), (409, Some("conflict")));
    let dev = h.user_token("dora", "developer").await;
    let (s, body) = call(client_with(&dev).post(h.url("/v1/nodes/node-a/cordon")).json(&json!({}))).await;
    assert_eq!((s, body["error"]["details"]["required_permission"].as_str()), (403, Some("node:maintenance")));

    // Deleting revokes: the open stream ends and the agent cannot reconnect.
    let (_, tx, mut rx) = beat(&h, &ca, &a).await.unwrap();
    assert_eq!(call(h.http.delete(h.url("/v1/nodes/node-a"))).await.0, 200);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(s) => return Some(ApiError::from_status(&s)),
            }
        }
    })
    .await
    .expect("the stream closes");
    let ended = ended.expect("refused, not just closed");
    assert_eq!(ended.code, ErrorCode::Unauthenticated);
    // The agent learns why: its node was deleted (not a transient failure).
    assert_eq!(ended.details.get("reason").and_then(|v| v.as_str()), Some("node_deleted"), "{:?}", ended.details);
    drop(tx);
    let again = beat(&h, &ca, &a).await.err().unwrap();
    let reason = again.details.get("reason").and_then(|v| v.as_str());
    assert_eq!((again.code, reason), (ErrorCode::Unauthenticated, Some("node_deleted")));
    assert_eq!(call(h.http.get(h.url("/v1/nodes/node-a"))).await.0, 404);
}

#[tokio::test]
async fn memory_pressure_sets_after_consecutive_reports_and_clears_at_once() {
    let h = harness().await;
    let (ca, _) = ca_pem(&h).await;
    let (_, t) = call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({}))).await;
    let a = join(&h, &ca, t["token"].as_str().unwrap(), "node-p").await.unwrap();
    let (_, tx, mut rx) = beat(&h, &ca, &a).await.unwrap();
    let low = |free: u64| HeartbeatRequest {
        resources: Some(Resources { memory_available_bytes: free, ..report().resources.unwrap() }),
        ..report()
    };
    // 4 GiB total: 200 MiB free is under the 10% threshold.
    let mut seen = Vec::new();
    for _ in 0..3 {
        tx.send(low(200 << 20)).await.unwrap();
        rx.message().await.unwrap().unwrap();
        let n = node_status(&h, "node-p").await;
        seen.push((n["pressure"]["memory"]["active"].as_bool(), n["pressure"]["memory"]["consecutive_count"].as_i64()));
    }
    assert_eq!(seen, [(Some(false), Some(1)), (Some(false), Some(2)), (Some(true), Some(3))]);
    assert!(node_status(&h, "node-p").await["pressure"]["memory"]["since"].is_string());
    assert_eq!(node_status(&h, "node-p").await["pressure"]["system_disk"]["active"], false);
    tx.send(low(3 << 30)).await.unwrap();
    rx.message().await.unwrap().unwrap();
    let n = node_status(&h, "node-p").await;
    assert_eq!(
        (n["pressure"]["memory"]["active"].as_bool(), n["pressure"]["memory"]["consecutive_count"].as_i64()),
        (Some(false), Some(0))
    );
}

/// A join-token holder who advertises `localhost` or a wildcard gets a certificate that
/// names its node only; presented by a fake control plane on 127.0.0.1, an agent's client
/// (the control-plane verifier every agent uses) refuses it for its identity before sending
/// anything, while the real control plane is still accepted under the same name.
#[tokio::test]
async fn hostile_advertised_endpoints_are_recorded_not_certified() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let h = harness().await;
    let (ca, _) = ca_pem(&h).await;
    let (_, t) = call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({"max_uses": 5}))).await;
    let token = t["token"].as_str().unwrap();
    let victim = join(&h, &ca, token, "victim").await.unwrap();
    let agent_client = |port: u16| {
        let tls =
            ClientTlsConfig::new().domain_name("localhost").identity(Identity::from_pem(&victim.cert, &victim.key));
        Endpoint::from_shared(format!("https://localhost:{port}"))
            .unwrap()
            .tls_config_with_verifier(tls, otherix_pki::control_plane_verifier(&ca).unwrap())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
    };

    for (name, endpoint) in [("evil-1", "localhost:18445"), ("evil-2", "*.agents.otherix.local:9443")] {
        let evil = join_advertising(&h, &ca, token, name, endpoint).await.unwrap();
        let info = otherix_pki::cert_info(&evil.cert).unwrap();
        assert_eq!(info.sans, [format!("node-{name}.agents.otherix.local")], "{name}");
        assert!(info.uris.is_empty(), "{name}");
        assert_eq!(node_status(&h, name).await["advertised_endpoint"], endpoint);

        // The fake control plane: the real CA, the evil node's certificate, 127.0.0.1.
        let tls = otherix_pki::server_config_mtls(&evil.cert, &evil.key, &ca, false).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let failures = Arc::new(AtomicUsize::new(0));
        let seen = failures.clone();
        let fake = tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                if acceptor.accept(tcp).await.is_err() {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let err = agent_client(port).connect().await.unwrap_err();
        let chain = {
            let mut s = err.to_string();
            let mut cur = std::error::Error::source(&err);
            while let Some(e) = cur {
                s.push_str(&format!(": {e}"));
                cur = e.source();
            }
            s
        };
        assert!(
            chain.contains(&format!("not the control plane: the certificate of node \"{name}\"")),
            "{name}: {chain}"
        );
        for _ in 0..100 {
            if failures.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(failures.load(Ordering::SeqCst), 1, "{name}: the handshake was attempted and failed");
        fake.abort();
    }

    // The real control plane, dialled by the same name: accepted, and the heartbeat works.
    let port = h.api.agent_addr().unwrap().port();
    let ch = agent_client(port).connect().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(report()).await.unwrap();
    let mut answers = HeartbeatServiceClient::new(ch)
        .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(answers.message().await.unwrap().is_some());
}

/// The store's current revision, read through a client of the test's own.
async fn store_revision(h: &Harness) -> i64 {
    let store = otherix_store::Store::connect(&[h.etcd.endpoint()], Duration::from_secs(5)).await.unwrap();
    store.current_revision().await.unwrap()
}

/// Sends one report on an open stream and returns the answer (or the refusal).
async fn send(
    tx: &tokio::sync::mpsc::Sender<HeartbeatRequest>,
    rx: &mut tonic::Streaming<HeartbeatResponse>,
    hb: HeartbeatRequest,
) -> Result<HeartbeatResponse, tonic::Status> {
    tx.send(hb).await.map_err(|_| tonic::Status::cancelled("stream closed"))?;
    match rx.message().await {
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(tonic::Status::cancelled("stream ended")),
        Err(s) => Err(s),
    }
}

#[tokio::test]
async fn the_cluster_default_pool_is_what_agents_are_told() {
    let h = harness().await;
    let (ca, _) = ca_pem(&h).await;
    let (_, t) = call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({"max_uses": 1}))).await;
    let a = join(&h, &ca, t["token"].as_str().unwrap(), "node-p").await.unwrap();
    let (first, tx, mut rx) = beat(&h, &ca, &a).await.unwrap();
    assert_eq!(first.declared_pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["default"]);

    let (s, body) = call(h.http.put(h.url("/v1/cluster/default-pool")).json(&json!({"name": "fast-ssd"}))).await;
    assert_eq!(s, 200, "{body}");
    let next = send(&tx, &mut rx, report()).await.unwrap();
    assert_eq!(next.declared_pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["fast-ssd"]);

    let (s, _) = call(h.http.delete(h.url("/v1/cluster/default-pool"))).await;
    assert_eq!(s, 200);
    let next = send(&tx, &mut rx, report()).await.unwrap();
    assert!(next.declared_pools.is_empty(), "{next:?}");
}

#[tokio::test]
async fn steady_heartbeats_write_nothing_and_hostile_reports_are_refused() {
    let h = harness().await;
    let (ca, _) = ca_pem(&h).await;
    let (_, t) = call(h.http.post(h.url("/v1/nodes/join-tokens")).json(&json!({"max_uses": 1}))).await;
    let a = join(&h, &ca, t["token"].as_str().unwrap(), "node-s").await.unwrap();
    let (_, tx, mut rx) = beat(&h, &ca, &a).await.unwrap();
    wait_status(&h, "node-s", "ready").await;

    // Identical reports: answered, and nothing is written.
    let before = store_revision(&h).await;
    for _ in 0..4 {
        send(&tx, &mut rx, report()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(store_revision(&h).await, before, "a steady node's reports wrote to etcd");

    // Free memory moving by a tenth of the total is worth a write.
    let mut moved = report();
    moved.resources.as_mut().unwrap().memory_available_bytes = 2 << 30;
    send(&tx, &mut rx, moved).await.unwrap();
    assert!(store_revision(&h).await > before, "a changed report was not recorded");
    let n = node_status(&h, "node-s").await;
    assert_eq!(n["capacity"]["memory_available_bytes"], 2u64 << 30, "{n}");

    // A report cannot change the architecture the node joined with.
    let mut arch = report();
    arch.architecture = "arm64".into();
    let err = send(&tx, &mut rx, arch).await.unwrap_err();
    assert_eq!(ApiError::from_status(&err).code, ErrorCode::ValidationFailed, "{err:?}");

    // Reopening the stream again and again costs no write either (the first
    // report after the one above records memory moving back).
    drop(beat(&h, &ca, &a).await.unwrap());
    let before = store_revision(&h).await;
    for _ in 0..5 {
        let (answer, _tx, _rx) = beat(&h, &ca, &a).await.unwrap();
        assert_eq!(answer.heartbeat_interval_seconds, 1);
    }
    assert_eq!(store_revision(&h).await, before, "reconnects wrote to etcd");

    // An oversized report (400 KB) is refused by the stream and writes nothing.
    let (_, tx, mut rx) = beat(&h, &ca, &a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = store_revision(&h).await;
    let mut big = report();
    big.agent_version = "x".repeat(400 * 1024);
    let err = send(&tx, &mut rx, big).await.unwrap_err();
    assert!(
        matches!(err.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::Internal),
        "{err:?}"
    );
    assert_eq!(store_revision(&h).await, before, "an oversized report reached etcd");
    assert_eq!(node_status(&h, "node-s").await["agent_version"], "0.1.0");
}

//! With `server.tls` the one listener speaks TLS: gRPC over h2 (ALPN), REST
//! and grpc-web over HTTP/1.1 and h2.

mod common;

use std::process::Command;

use otherix_api::ApiServer;
use otherix_api::config::TlsConfig;
use otherix_proto::v1::GetDefaultPoolRequest;
use otherix_proto::v1::cluster_service_client::ClusterServiceClient;
use otherix_testkit::TestEtcd;

#[tokio::test]
async fn one_tls_listener_serves_grpc_and_rest() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let (ca, crt, key) = (dir.path().join("ca.crt"), dir.path().join("api.crt"), dir.path().join("api.key"));
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir.path()).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(
        &[&["req", "-x509"][..], &ec, &["-days", "1", "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.crt"]]
            .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout",
                "api.key",
                "-out",
                "api.csr",
            ],
        ]
        .concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        "api.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-copy_extensions",
        "copy",
        "-out",
        "api.crt",
    ]);

    let etcd = TestEtcd::start().await;
    let mut config = common::config(&etcd, dir.path());
    config.server.tls = Some(TlsConfig { cert_file: crt.clone(), key_file: key });
    let api = ApiServer::start_with(config, common::options()).await.unwrap();
    let port = api.addr().port();
    let pem = std::fs::read(&ca).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let http = reqwest::Client::builder().tls_backend_preconfigured(tls).build().unwrap();
    let r = http.get(format!("https://localhost:{port}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&pem))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let login = common::login(&http, &format!("https://localhost:{port}"), common::ADMIN, common::ADMIN_PASSWORD).await;
    let token = login["access_token"].as_str().unwrap().to_owned();
    let mut client = ClusterServiceClient::new(tonic::service::interceptor::InterceptedService::new(
        channel,
        common::Bearer(Some(token)),
    ));
    // Seeding runs in the background; wait for it.
    let mut name = String::new();
    for _ in 0..100 {
        if let Ok(r) = client.get_default_pool(GetDefaultPoolRequest {}).await {
            name = r.into_inner().name;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(name, "default");

    // Plaintext on the TLS port gets nowhere.
    let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/healthz")).send().await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    api.shutdown().await;
}

//! Connecting to an external etcd that requires TLS client certificates and
//! user/password authentication: a real etcd with real certificates.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use otherix_store::{ConnectConfig, Credentials, Store, Target, TlsMaterial};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn leaf(issuer: &Issuer<'_, KeyPair>, cn: &str, server: bool) -> (String, String) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    if server {
        p.subject_alt_names =
            vec![SanType::DnsName("localhost".try_into().unwrap()), SanType::IpAddress("127.0.0.1".parse().unwrap())];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    } else {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn ca(cn: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(p, key))
}

fn pki() -> Pki {
    let (ca_pem, issuer) = ca("etcd test CA");
    // The client's CN is no etcd user: with auth on, only the password admits it.
    Pki { ca_pem, server: leaf(&issuer, "etcd", true), client: leaf(&issuer, "otherix-client", false) }
}

struct Etcd(std::process::Child);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// etcd serving clients over TLS and demanding a client certificate from the CA.
fn start_tls_etcd(dir: &Path, pki: &Pki) -> (Etcd, String) {
    let (client, peer) = (free_port(), free_port());
    let ca = write(dir, "ca.pem", &pki.ca_pem);
    let cert = write(dir, "server.pem", &pki.server.0);
    let key = write(dir, "server.key", &pki.server.1);
    let url = format!("https://127.0.0.1:{client}");
    let child = Command::new("etcd")
        .args([
            "--name=tls",
            &format!("--data-dir={}", dir.join("data").display()),
            &format!("--listen-client-urls={url}"),
            &format!("--advertise-client-urls={url}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            &format!("--initial-cluster=tls=http://127.0.0.1:{peer}"),
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--client-cert-auth",
            &format!("--trusted-ca-file={ca}"),
            &format!("--cert-file={cert}"),
            &format!("--key-file={key}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd-server installed");
    (Etcd(child), url)
}

fn tls(pki: &Pki, with_client_cert: bool) -> TlsMaterial {
    TlsMaterial {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        client: with_client_cert.then(|| (pki.client.0.clone().into_bytes(), pki.client.1.clone().into_bytes())),
        domain: None,
    }
}

fn config(url: &str, tls: Option<TlsMaterial>, credentials: Option<Credentials>) -> ConnectConfig {
    ConnectConfig {
        target: Target::Urls(vec![url.to_owned()]),
        tls,
        credentials,
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
    }
}

async fn can_read(cfg: &ConnectConfig) -> Result<(), String> {
    let store =
        Store::connect_with(cfg).await.map_err(|e| format!("connect: {e}: {:?}", std::error::Error::source(&e)))?;
    store.get_raw("probe").await.map(|_| ()).map_err(|e| format!("read: {e}: {:?}", std::error::Error::source(&e)))
}

#[tokio::test]
async fn tls_client_certificates_and_passwords_are_required_and_used() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let (_etcd, url) = start_tls_etcd(dir.path(), &pki);
    let full = config(&url, Some(tls(&pki, true)), None);
    let t0 = Instant::now();
    while let Err(e) = can_read(&full).await {
        assert!(t0.elapsed() < Duration::from_secs(20), "TLS etcd never answered: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Plain HTTP, no client certificate, or another CA: refused.
    let plain = config(&url.replace("https://", "http://"), None, None);
    assert!(can_read(&plain).await.is_err(), "plain HTTP was served");
    let no_cert = config(&url, Some(tls(&pki, false)), None);
    let err = can_read(&no_cert).await.expect_err("a client without a certificate was served");
    assert!(err.contains("read"), "{err}");
    let (other_ca, _) = ca("another CA");
    let wrong_ca = config(&url, Some(TlsMaterial { ca_pem: other_ca.into_bytes(), ..tls(&pki, true) }), None);
    assert!(can_read(&wrong_ca).await.is_err(), "a server certificate from an untrusted CA was accepted");

    // Turn on etcd authentication (root user, root role), as an operator would.
    let admin = etcd_client::Client::connect(
        [url.as_str()],
        Some(
            etcd_client::ConnectOptions::new().with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(&pki.ca_pem))
                    .identity(etcd_client::Identity::from_pem(&pki.client.0, &pki.client.1)),
            ),
        ),
    )
    .await
    .unwrap();
    let mut auth = admin.auth_client();
    auth.user_add("root", "s3cret-root-pass", None).await.unwrap();
    auth.user_grant_role("root", "root").await.unwrap();
    auth.auth_enable().await.unwrap();

    // A certificate alone no longer reads; the right password does; a wrong one does not.
    let err = can_read(&full).await.expect_err("read without credentials after auth was enabled");
    assert!(err.contains("read"), "{err}");
    let good = Credentials { user: "root".into(), password: "s3cret-root-pass".into() };
    let with_password = config(&url, Some(tls(&pki, true)), Some(good));
    can_read(&with_password).await.unwrap();
    let store = Store::connect_with(&with_password).await.unwrap();
    store.commit(otherix_store::Batch::new().put_raw("k", b"v".to_vec(), None)).await.unwrap();
    assert_eq!(store.get_raw("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    let bad = Credentials { user: "root".into(), password: "wrong".into() };
    let err =
        can_read(&config(&url, Some(tls(&pki, true)), Some(bad))).await.expect_err("a wrong password was accepted");
    assert!(err.contains("connect"), "authentication happens at connect: {err}");
}

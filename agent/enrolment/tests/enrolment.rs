//! Bootstrap against a real TLS server: pinning, join, files and modes, existing and partial
//! material, refusals, connection failures.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::Ordering;

use common::TestCp;
use otherix_agent_enrolment::{
    BootstrapError, BootstrapOptions, BootstrapOutcome, TokenSource, bootstrap, load_material,
};
use otherix_errors::{ApiError, ErrorCode};

fn opts(cp: &TestCp, fingerprint: &str, dir: &Path) -> BootstrapOptions {
    BootstrapOptions::new(
        cp.url(),
        TokenSource::Value("otx_join_test".into()),
        fingerprint,
        "worker-1",
        "127.0.0.1:9443",
        dir.join("certs"),
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn fingerprint_mismatch_is_refused_with_both_values() {
    common::init_tracing();
    let cp = TestCp::start();
    let other = otherix_pki::ClusterCa::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = bootstrap(&opts(&cp, &other.fingerprint_sha256(), dir.path())).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BootstrapError::FingerprintMismatch { .. }), "{msg}");
    assert_eq!(
        msg,
        format!(
            "bootstrap: CA fingerprint mismatch (expected sha256:{} got {})",
            other.fingerprint_sha256(),
            cp.fingerprint()
        )
    );
    // Nothing was joined, nothing written.
    assert_eq!(cp.state.join_requests.lock().unwrap().len(), 0);
    assert!(!dir.path().join("certs").exists());
}

#[tokio::test]
async fn join_writes_material_then_existing_and_partial_state() {
    common::init_tracing();
    let cp = TestCp::start();
    let dir = tempfile::tempdir().unwrap();
    // The fingerprint as colon-separated upper-case hex, without prefix.
    let fp = otherix_pki::parse_fingerprint(&cp.fingerprint()).unwrap();
    let colons = fp.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "otx_join_from_file\n").unwrap();
    let mut o = opts(&cp, &colons, dir.path());
    o.token = TokenSource::File(token_file);
    o.architecture = Some("aarch64".into());

    let outcome = bootstrap(&o).await.unwrap();
    let BootstrapOutcome::Bootstrapped { node_id, material, ca_fingerprint } = outcome else {
        panic!("expected a join, got {outcome:?}")
    };
    assert_eq!(node_id, "node-id-worker-1");
    assert_eq!(ca_fingerprint, cp.fingerprint());
    assert_eq!(material.node_name, "worker-1");
    let reqs = cp.state.join_requests.lock().unwrap().clone();
    assert_eq!(reqs, vec![("worker-1".into(), "arm64".into(), "127.0.0.1:9443".into(), "otx_join_from_file".into())]);

    let certs = dir.path().join("certs");
    assert_eq!(mode(&certs), 0o700);
    assert_eq!(mode(&certs.join("agent.key")), 0o600);
    assert_eq!(mode(&certs.join("agent.crt")), 0o644);
    assert_eq!(std::fs::read_to_string(certs.join("ca.crt")).unwrap().trim(), cp.ca.cert_pem().trim());
    assert_eq!(std::fs::read_dir(&certs).unwrap().count(), 3, "no temp files left");
    otherix_pki::verify_chain(&std::fs::read_to_string(certs.join("agent.crt")).unwrap(), cp.ca.cert_pem()).unwrap();

    let loaded = load_material(&certs).unwrap().expect("material");
    assert_eq!(loaded.node_name, "worker-1");
    assert_eq!(loaded.key_pem, material.key_pem);

    // A second run leaves everything alone.
    let again = bootstrap(&o).await.unwrap();
    assert!(matches!(again, BootstrapOutcome::AlreadyBootstrapped { .. }), "{again:?}");
    assert_eq!(cp.state.joins.load(Ordering::SeqCst), 1);

    // Key deleted, cert kept: partial state, for bootstrap and for serve.
    std::fs::remove_file(certs.join("agent.key")).unwrap();
    let err = bootstrap(&o).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BootstrapError::PartialState { .. }), "{msg}");
    assert!(msg.contains("partial bootstrap state"), "{msg}");
    assert!(msg.contains(&certs.join("agent.crt").display().to_string()), "{msg}");
    assert!(msg.contains(&certs.join("agent.key").display().to_string()), "{msg}");
    assert!(msg.contains("mint a fresh join token"), "{msg}");
    let err = load_material(&certs).unwrap_err();
    assert!(err.to_string().contains("partial bootstrap state"), "{err}");
    assert_eq!(cp.state.joins.load(Ordering::SeqCst), 1);

    // force joins again and replaces the material.
    o.force = true;
    assert!(matches!(bootstrap(&o).await.unwrap(), BootstrapOutcome::Bootstrapped { .. }));
    assert_eq!(cp.state.joins.load(Ordering::SeqCst), 2);
    assert!(load_material(&certs).unwrap().is_some());

    // A key from elsewhere: invalid material, not silently used.
    let (other_key, _) = otherix_pki::generate_agent_key_and_csr("worker-1").unwrap();
    std::fs::write(certs.join("agent.key"), other_key).unwrap();
    let err = load_material(&certs).unwrap_err();
    assert!(matches!(err, BootstrapError::InvalidMaterial { .. }), "{err}");
    assert!(err.to_string().contains("does not belong"), "{err}");
    // None at all: bootstrap first.
    assert!(load_material(&dir.path().join("empty")).unwrap().is_none());
}

#[tokio::test]
async fn refused_join_surfaces_the_code() {
    common::init_tracing();
    let cp = TestCp::start();
    let dir = tempfile::tempdir().unwrap();
    for (err, expected) in [
        (ApiError::new(ErrorCode::TokenExpired, "join token expired"), "HTTP 401 token_expired"),
        (ApiError::new(ErrorCode::TokenExhausted, "join token has no uses left"), "HTTP 401 token_exhausted"),
        (ApiError::new(ErrorCode::TokenInvalid, "unknown join token"), "HTTP 401 token_invalid"),
        (ApiError::new(ErrorCode::Conflict, "node worker-1 already holds an active certificate"), "HTTP 409 conflict"),
        (ApiError::invalid_field("node_name", "bad"), "HTTP 400 validation_failed"),
    ] {
        let code = err.code;
        *cp.state.join_refusal.lock().unwrap() = Some(err);
        let e = bootstrap(&opts(&cp, &cp.fingerprint(), dir.path())).await.unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("bootstrap protocol: CSR submission rejected by CP: {expected}")), "{msg}");
        assert_eq!(e.rejection_code(), Some(code));
    }
    assert!(!dir.path().join("certs").join("agent.key").exists());
}

#[tokio::test]
async fn unacceptable_certificates_are_refused() {
    common::init_tracing();
    let cp = TestCp::start();
    let dir = tempfile::tempdir().unwrap();
    *cp.state.join_cert_name.lock().unwrap() = Some("worker-2".into());
    let e = bootstrap(&opts(&cp, &cp.fingerprint(), dir.path())).await.unwrap_err();
    assert!(matches!(e, BootstrapError::BadCertificate(_)), "{e}");
    assert!(e.to_string().contains("worker-2"), "{e}");
    assert!(!dir.path().join("certs").join("agent.crt").exists());
}

#[tokio::test]
async fn connection_failures_and_unverifiable_servers() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // Nothing listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let fp = format!("sha256:{}", "00".repeat(32));
    let o = BootstrapOptions::new(
        format!("https://127.0.0.1:{port}"),
        TokenSource::Value("t".into()),
        fp,
        "worker-1",
        "127.0.0.1:9443",
        dir.path().join("certs"),
    );
    let e = bootstrap(&o).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("bootstrap protocol: fetch /v1/ca: connect https://127.0.0.1:{port}:")), "{msg}");
    assert!(msg.to_lowercase().contains("connection refused"), "{msg}");

    // A replica whose certificate does not name the host we dial: the control plane is
    // recognised by its identity, not by the host name, so the join goes through.
    let ca = std::sync::Arc::new(otherix_pki::ClusterCa::generate().unwrap());
    let cp = TestCp::start_with(ca, Default::default(), None, &["cp.elsewhere.example"]);
    let elsewhere = tempfile::tempdir().unwrap();
    bootstrap(&opts(&cp, &cp.fingerprint(), elsewhere.path())).await.unwrap();
    assert_eq!(cp.state.join_requests.lock().unwrap().len(), 1);

    // Bad inputs fail before any network traffic.
    let cp = TestCp::start();
    for (mutate, needle) in [
        (
            Box::new(|o: &mut BootstrapOptions| o.ca_fingerprint = "sha256:abc".into())
                as Box<dyn Fn(&mut BootstrapOptions)>,
            "CA fingerprint",
        ),
        (Box::new(|o: &mut BootstrapOptions| o.node_name = "Bad_Name".into()), "invalid node name"),
        (Box::new(|o: &mut BootstrapOptions| o.cp_url = "http://127.0.0.1:1".into()), "https://"),
        (Box::new(|o: &mut BootstrapOptions| o.architecture = Some("sparc".into())), "architecture"),
        (
            Box::new(|o: &mut BootstrapOptions| o.token = TokenSource::Env("OTHERIX_TEST_UNSET_TOKEN_ENV".into())),
            "OTHERIX_TEST_UNSET_TOKEN_ENV",
        ),
    ] {
        let mut o = opts(&cp, &cp.fingerprint(), dir.path());
        mutate(&mut o);
        let e = bootstrap(&o).await.unwrap_err();
        assert!(matches!(e, BootstrapError::Config(_)), "{e}");
        assert!(e.to_string().contains(needle), "{e} lacks {needle}");
    }
    assert_eq!(cp.state.join_requests.lock().unwrap().len(), 0);
}

/// A join-token holder's node certificate cannot pose as the control plane: the impostor
/// serves the real CA, so the pinned fingerprint matches, but the join connection refuses
/// its certificate for its identity and the token is never sent. Both a certificate as issued
/// now and one as issued before (with `localhost` and `127.0.0.1` from the advertised
/// endpoint, and serverAuth) are refused.
#[tokio::test]
async fn an_impostor_with_a_node_certificate_never_gets_the_token() {
    common::init_tracing();
    let ca = std::sync::Arc::new(otherix_pki::ClusterCa::generate().unwrap());
    let (key, csr) = otherix_pki::generate_agent_key_and_csr("impostor").unwrap();
    let current = ca.sign_agent_csr(&csr, "impostor", std::time::Duration::from_secs(3600)).unwrap().cert_pem;
    for (cert, key) in [(current, key), common::legacy_node_cert(&ca, "impostor")] {
        let fake = TestCp::start_impostor(ca.clone(), &cert, &key);
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(&fake, &fake.fingerprint(), dir.path());
        o.token = TokenSource::Value("otx_join_victims_secret".into());
        let e = bootstrap(&o).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, BootstrapError::NotControlPlane { .. }), "{msg}");
        assert_eq!(
            msg,
            format!(
                "bootstrap: the server at {} is not the control plane: the certificate of node \"impostor\" \
                 lacks the control-plane identity (spiffe://otherix.local/control-plane); the join token was not sent to it",
                fake.url()
            )
        );
        // The handshake was attempted (and failed on the impostor's side too)...
        common::wait_for("the refused handshake", std::time::Duration::from_secs(5), || {
            (fake.state.handshake_failures.load(Ordering::SeqCst) >= 1).then_some(())
        })
        .await;
        // ...and no join request, so no token, reached it.
        assert!(fake.state.join_requests.lock().unwrap().is_empty());
        assert!(!dir.path().join("certs").join("agent.crt").exists());
    }
}

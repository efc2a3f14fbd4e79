//! Secrets at rest and token limits against a real etcd: what etcd holds
//! gives neither the CA key nor the signing secrets away, start-up refuses a
//! missing or wrong key, rotation re-seals, and a token minted with the real
//! signing key for three years (or dated in the future) is refused.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::Harness;
use otherix_api::ApiServer;
use otherix_auth::jwt;
use otherix_proto::otherix::store::v1::{ClusterCaRecord, SigningKeys};
use otherix_store::{Sealer, Store};
use prost::Message;

fn key_file(state: &Path) -> PathBuf {
    state.join("secrets/etcd-encryption.key")
}

async fn raw_store(h: &Harness) -> Store {
    Store::connect(&[h.etcd.endpoint()], Duration::from_secs(5)).await.unwrap()
}

/// The signing keys as the server uses them, opened with the key file.
async fn real_keys(h: &Harness) -> Vec<jwt::Key> {
    let sealer = Sealer::load(&key_file(h.state.path()), &[]).unwrap();
    let raw = raw_store(h).await.get_raw("auth/signing_keys").await.unwrap().unwrap();
    SigningKeys::decode(raw.as_slice())
        .unwrap()
        .keys
        .into_iter()
        .map(|k| jwt::Key {
            secret: sealer.open(&k.secret, &format!("auth/signing_keys/{}", k.id)).unwrap(),
            id: k.id,
            retire_after: None,
        })
        .collect()
}

#[tokio::test]
async fn etcd_holds_the_ca_key_and_signing_secrets_only_sealed() {
    let h = Harness::start().await;
    use std::os::unix::fs::MetadataExt;
    let kf = key_file(h.state.path());
    assert_eq!(std::fs::metadata(&kf).unwrap().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(kf.parent().unwrap()).unwrap().mode() & 0o777, 0o700);

    let store = raw_store(&h).await;
    let ca = store.get_raw("pki/cluster_ca").await.unwrap().expect("the CA record");
    let ca_text = String::from_utf8_lossy(&ca);
    assert!(ca_text.contains("BEGIN CERTIFICATE"));
    assert!(!ca_text.contains("PRIVATE KEY"), "the CA key is in plaintext");
    assert!(ca_text.contains("otherix-sealed:"));

    let raw = store.get_raw("auth/signing_keys").await.unwrap().expect("the signing keys");
    let keys = real_keys(&h).await;
    assert!(!keys.is_empty());
    for k in &keys {
        assert_eq!(k.secret.len(), 32);
        assert!(!raw.windows(k.secret.len()).any(|w| w == k.secret.as_slice()), "a signing secret is in plaintext");
    }
    // The opened key is the one the server signs with: its token verifies.
    let claims = jwt_claims(&h.admin_token);
    assert!(jwt::verify(&h.admin_token, &keys, claims.iat + 1, &jwt::Limits::for_ttl(900)).is_ok());
    h.api.shutdown().await;
}

fn jwt_claims(token: &str) -> jwt::Claims {
    let body = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap()
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn tokens_minted_with_the_real_key_for_years_or_in_the_future_are_refused() {
    let h = Harness::start().await;
    let keys = real_keys(&h).await;
    let admin = jwt_claims(&h.admin_token);
    let me = h.url("/v1/users/me");
    let status = async |token: String| h.anon.get(&me).bearer_auth(token).send().await.unwrap().status().as_u16();
    let t = now();
    // Control: the same key, user and session with the configured lifetime pass.
    let normal = jwt::Claims { iat: t, exp: t + 900, ..admin.clone() };
    assert_eq!(status(jwt::sign(&normal, &keys[0])).await, 200);
    let three_years = jwt::Claims { iat: t, exp: t + 3 * 365 * 86_400, ..admin.clone() };
    assert_eq!(status(jwt::sign(&three_years, &keys[0])).await, 401);
    let future = jwt::Claims { iat: t + 3600, exp: t + 3600 + 900, ..admin };
    assert_eq!(status(jwt::sign(&future, &keys[0])).await, 401);
    h.api.shutdown().await;
}

#[tokio::test]
async fn start_refuses_a_missing_or_wrong_key_and_rotation_reseals() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::start().await;
    // An idempotent call makes the (sealed) idempotency secret.
    let r = h
        .http
        .put(h.url("/v1/cluster/default-pool"))
        .header("idempotency-key", "rotation-test")
        .json(&serde_json::json!({"name": "default"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let Harness { state, etcd, api, .. } = h;
    api.shutdown().await;
    let config = || common::config(&etcd, state.path());
    let kf = key_file(state.path());
    let old = std::fs::read(&kf).unwrap();

    // The key file is gone: refused, and no new key is made over sealed secrets.
    std::fs::rename(&kf, state.path().join("saved.key")).unwrap();
    let err = ApiServer::start_with(config(), common::options()).await.expect_err("started without its key");
    let msg = format!("{err}: {}", std::error::Error::source(&err).map(|e| e.to_string()).unwrap_or_default());
    assert!(msg.contains("does not exist") && msg.contains("etcd.encryption.key_file"), "{msg}");
    assert!(!kf.exists(), "a new key was made over sealed secrets");

    // Another key: refused, naming the key ids.
    std::fs::write(&kf, [7u8; 32]).unwrap();
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = ApiServer::start_with(config(), common::options()).await.expect_err("started with a wrong key");
    let msg = format!("{err}: {}", std::error::Error::source(&err).map(|e| e.to_string()).unwrap_or_default());
    assert!(msg.contains("is sealed with key"), "{msg}");

    // Rotation: the new key current, the old one listed for reading.
    let old_file = state.path().join("secrets/old.key");
    std::fs::write(&old_file, &old).unwrap();
    std::fs::set_permissions(&old_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = config();
    c.etcd.encryption.previous_key_files = vec![old_file.clone()];
    let api = ApiServer::start_with(c, common::options()).await.expect("starts during a rotation");
    api.shutdown().await;
    let store = Store::connect(&[etcd.endpoint()], Duration::from_secs(5)).await.unwrap();
    let new = Sealer::new(&[7u8; 32], &[]);
    let ca = ClusterCaRecord::decode(store.get_raw("pki/cluster_ca").await.unwrap().unwrap().as_slice()).unwrap();
    let sealed = otherix_store::sealed::text_bytes(&ca.key_pem).expect("sealed");
    assert!(new.is_current(&sealed), "the CA key was not sealed again with the new key");
    let set = SigningKeys::decode(store.get_raw("auth/signing_keys").await.unwrap().unwrap().as_slice()).unwrap();
    assert!(set.keys.iter().all(|k| new.is_current(&k.secret)), "a signing key was not sealed again");
    let idem =
        Vec::<u8>::decode(store.get_raw("auth/idempotency_secret").await.unwrap().expect("made").as_slice()).unwrap();
    assert!(new.is_current(&idem), "the idempotency secret was not sealed again");

    // Once resealed the old key is no longer needed.
    std::fs::remove_file(&old_file).unwrap();
    let api = ApiServer::start_with(config(), common::options()).await.expect("starts with the new key alone");
    api.shutdown().await;
}

#[tokio::test]
async fn plaintext_secrets_from_an_earlier_version_are_sealed_at_start() {
    let h = Harness::start().await;
    let Harness { state, etcd, api, .. } = h;
    api.shutdown().await;
    // Put the records back as a version without sealing wrote them.
    let sealer = Sealer::load(&key_file(state.path()), &[]).unwrap();
    let store = Store::connect(&[etcd.endpoint()], Duration::from_secs(5)).await.unwrap();
    let mut ca = ClusterCaRecord::decode(store.get_raw("pki/cluster_ca").await.unwrap().unwrap().as_slice()).unwrap();
    ca.key_pem = sealer.open_text(&ca.key_pem, "pki/cluster_ca").unwrap();
    assert!(ca.key_pem.contains("PRIVATE KEY"));
    let mut set = SigningKeys::decode(store.get_raw("auth/signing_keys").await.unwrap().unwrap().as_slice()).unwrap();
    for k in &mut set.keys {
        k.secret = sealer.open(&k.secret, &format!("auth/signing_keys/{}", k.id)).unwrap();
    }
    let batch = otherix_store::Batch::new().put("pki/cluster_ca", &ca, None).put("auth/signing_keys", &set, None);
    store.commit(batch).await.unwrap();
    // With the key file gone too (an upgrade: no key yet), start-up makes one and seals.
    std::fs::remove_file(key_file(state.path())).unwrap();
    let api =
        ApiServer::start_with(common::config(&etcd, state.path()), common::options()).await.expect("upgrade starts");
    let base = format!("http://{}", api.addr());
    let login = common::login(&reqwest::Client::new(), &base, common::ADMIN, common::ADMIN_PASSWORD).await;
    assert!(login["access_token"].is_string());
    api.shutdown().await;
    let sealer = Sealer::load(&key_file(state.path()), &[]).unwrap();
    let ca = ClusterCaRecord::decode(store.get_raw("pki/cluster_ca").await.unwrap().unwrap().as_slice()).unwrap();
    assert!(!ca.key_pem.contains("PRIVATE KEY"), "the CA key stayed in plaintext");
    assert!(sealer.open_text(&ca.key_pem, "pki/cluster_ca").unwrap().contains("PRIVATE KEY"));
    let set = SigningKeys::decode(store.get_raw("auth/signing_keys").await.unwrap().unwrap().as_slice()).unwrap();
    assert!(set.keys.iter().all(|k| sealer.is_current(&k.secret)), "a signing key stayed in plaintext");
}

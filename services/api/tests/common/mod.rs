//! Shared set-up: a real etcd member and the control plane on a real port,
//! with the bootstrap admin signed in.

#![allow(dead_code)]

use otherix_api::identity::bootstrap::BootstrapAdmin;
use otherix_api::{ApiServer, Config, StartOptions};
use otherix_testkit::TestEtcd;
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const ADMIN: &str = "admin";
pub const ADMIN_EMAIL: &str = "admin@otherix.local";
pub const ADMIN_PASSWORD: &str = "correct-horse-battery-staple";

pub struct Harness {
    pub state: tempfile::TempDir,
    pub etcd: TestEtcd,
    pub api: ApiServer,
    pub base: String,
    /// Sends the admin's access token.
    pub http: reqwest::Client,
    /// Sends no credentials.
    pub anon: reqwest::Client,
    pub admin_token: String,
}

pub fn config(etcd: &TestEtcd, state: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.agent_server.listen = "127.0.0.1:0".into();
    c.etcd.endpoints = vec![etcd.endpoint()];
    c.state_dir = state.to_owned();
    c
}

pub fn options() -> StartOptions {
    StartOptions {
        bootstrap_admin: Some(BootstrapAdmin {
            email: ADMIN_EMAIL.into(),
            username: ADMIN.into(),
            password: ADMIN_PASSWORD.into(),
        }),
    }
}

pub fn client_with(token: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("authorization", format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder().default_headers(h).build().unwrap()
}

/// A gRPC interceptor sending a bearer token.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(req)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

impl Harness {
    pub async fn start() -> Harness {
        Self::start_config(|_| {}).await
    }

    pub async fn start_config(tune: impl FnOnce(&mut Config)) -> Harness {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let etcd = TestEtcd::start().await;
        let state = tempfile::tempdir().unwrap();
        let mut c = config(&etcd, state.path());
        tune(&mut c);
        let api = ApiServer::start_with(c, options()).await.expect("api starts");
        let base = format!("http://{}", api.addr());
        let anon = reqwest::Client::new();
        let admin_token = login(&anon, &base, ADMIN, ADMIN_PASSWORD).await["access_token"].as_str().unwrap().to_owned();
        let http = client_with(&admin_token);
        Harness { state, etcd, api, base, http, anon, admin_token }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn grpc_channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.base.clone()).unwrap().connect().await.unwrap()
    }

    /// A channel whose calls carry `token`.
    pub async fn authed(&self, token: Option<&str>) -> Authed {
        InterceptedService::new(self.grpc_channel().await, Bearer(token.map(str::to_owned)))
    }

    /// Creates a user with a role and returns its access token.
    pub async fn user_token(&self, username: &str, role: &str) -> String {
        let password = format!("{username}-password-123");
        let r = self
            .http
            .post(self.url("/v1/users"))
            .json(&json!({"username": username, "password": password, "role": role}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        login(&self.anon, &self.base, username, &password).await["access_token"].as_str().unwrap().to_owned()
    }

    /// Waits until the first-boot seeding of the default pool is visible.
    pub async fn wait_seeded(&self) {
        for _ in 0..200 {
            let r = self.http.get(self.url("/v1/cluster/default-pool")).send().await.unwrap();
            if r.status() == 200 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("default pool never seeded");
    }
}

/// Logs in over REST; panics unless it succeeds.
pub async fn login(http: &reqwest::Client, base: &str, username: &str, password: &str) -> Value {
    let r = http
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "login as {username}");
    r.json().await.unwrap()
}

/// A gRPC codec for messages known only at run time (from descriptors).
#[derive(Clone)]
pub struct DynamicCodec(pub prost_reflect::MethodDescriptor);

pub struct DynEncoder;
pub struct DynDecoder(prost_reflect::MessageDescriptor);

impl tonic::codec::Encoder for DynEncoder {
    type Item = prost_reflect::DynamicMessage;
    type Error = tonic::Status;
    fn encode(&mut self, item: Self::Item, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::Message::encode(&item, dst).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Decoder for DynDecoder {
    type Item = prost_reflect::DynamicMessage;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Self::Item>, tonic::Status> {
        prost_reflect::DynamicMessage::decode(self.0.clone(), src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for DynamicCodec {
    type Encode = prost_reflect::DynamicMessage;
    type Decode = prost_reflect::DynamicMessage;
    type Encoder = DynEncoder;
    type Decoder = DynDecoder;
    fn encoder(&mut self) -> DynEncoder {
        DynEncoder
    }
    fn decoder(&mut self) -> DynDecoder {
        DynDecoder(self.0.output())
    }
}

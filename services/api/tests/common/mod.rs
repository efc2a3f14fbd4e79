//! Shared set-up: a real etcd member and the control plane on a real port.

#![allow(dead_code)]

use otherix_api::{ApiServer, Config};
use otherix_testkit::TestEtcd;

pub struct Harness {
    pub etcd: TestEtcd,
    pub api: ApiServer,
    pub base: String,
    pub http: reqwest::Client,
}

pub fn config(etcd: &TestEtcd) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.etcd.endpoints = vec![etcd.endpoint()];
    c.state_dir = std::env::temp_dir();
    c
}

impl Harness {
    pub async fn start() -> Harness {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let etcd = TestEtcd::start().await;
        let api = ApiServer::start(config(&etcd)).await.expect("api starts");
        let base = format!("http://{}", api.addr());
        let http = reqwest::Client::new();
        Harness { etcd, api, base, http }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn grpc_channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.base.clone()).unwrap().connect().await.unwrap()
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

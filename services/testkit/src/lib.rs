//! Test support: a throwaway etcd member on free loopback ports, started with
//! fast raft timings so it is ready in about 0.1 s. Loopback TCP is open to
//! every local user; that is fine for tests, and the product's own member
//! listens on Unix sockets instead (see `otherix-etcd-member`).

use otherix_etcd_member::{Member, MemberConfig, free_ports};

/// An etcd member in a temporary directory; stopped and wiped on drop.
#[derive(Debug)]
pub struct TestEtcd {
    member: Option<Member>,
    _dir: tempfile::TempDir,
}

impl TestEtcd {
    /// Starts a fresh member.
    pub async fn start() -> TestEtcd {
        let (client, peer) = free_ports().expect("free ports");
        Self::start_on(client, peer).await
    }

    /// Starts a fresh member on the given loopback ports.
    pub async fn start_on(client: u16, peer: u16) -> TestEtcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = MemberConfig::new("test", &dir.path().join("etcd"), client, peer);
        cfg.heartbeat_interval_ms = 10;
        cfg.election_timeout_ms = 100;
        let member = Member::start(cfg).await.expect("etcd starts (is etcd-server installed?)");
        TestEtcd { member: Some(member), _dir: dir }
    }

    /// The client endpoint, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        self.member.as_ref().map(|m| m.config().client_url()).unwrap_or_default()
    }

    /// The member's pid.
    pub fn pid(&self) -> Option<u32> {
        self.member.as_ref().and_then(Member::pid)
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        drop(self.member.take());
    }
}

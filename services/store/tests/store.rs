//! The store against a real etcd member.

use std::time::Duration;

use otherix_proto::otherix::store::v1::ClusterSettings;
use otherix_store::{Expect, Store, StoreError};
use otherix_testkit::TestEtcd;

async fn store(etcd: &TestEtcd) -> Store {
    Store::connect(&[etcd.endpoint()], Duration::from_secs(5)).await.unwrap()
}

fn settings(name: &str) -> ClusterSettings {
    ClusterSettings { default_pool_name: name.into(), ..Default::default() }
}

#[tokio::test]
async fn create_guards_and_cas() {
    let etcd = TestEtcd::start().await;
    let s = store(&etcd).await;
    assert!(s.get::<ClusterSettings>("things/a").await.unwrap().is_none());

    let rev = s.put("things/a", &settings("one"), Expect::Absent, &[("uniq/things/one", "a")]).await.unwrap();
    let got = s.get::<ClusterSettings>("things/a").await.unwrap().unwrap();
    assert_eq!(got.value.default_pool_name, "one");
    assert_eq!(got.mod_revision, rev);

    // A second record claiming the same unique name loses, and writes nothing.
    let err = s.put("things/b", &settings("one"), Expect::Absent, &[("uniq/things/one", "b")]).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { ref key } if key == "uniq/things/one"), "{err}");
    assert!(s.get::<ClusterSettings>("things/b").await.unwrap().is_none());

    // CAS: a stale revision conflicts, the current one wins.
    s.put("things/a", &settings("two"), Expect::Revision(rev), &[]).await.unwrap();
    let err = s.put("things/a", &settings("three"), Expect::Revision(rev), &[]).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");

    let listed = s.list::<ClusterSettings>("things/").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, "things/a");

    let cur = s.get::<ClusterSettings>("things/a").await.unwrap().unwrap();
    s.delete("things/a", cur.mod_revision, &["uniq/things/one"]).await.unwrap();
    assert!(s.get::<ClusterSettings>("things/a").await.unwrap().is_none());
    s.put("things/c", &settings("one"), Expect::Absent, &[("uniq/things/one", "c")]).await.unwrap();
}

#[tokio::test]
async fn concurrent_updates_all_land() {
    let etcd = TestEtcd::start().await;
    let s = store(&etcd).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.update::<ClusterSettings, StoreError, _>("counter", |cur| {
                let mut next = cur.cloned().unwrap_or_default();
                next.default_pool_name.push_str(&i.to_string());
                Ok(Some(next))
            })
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let v = s.get::<ClusterSettings>("counter").await.unwrap().unwrap();
    let mut digits: Vec<char> = v.value.default_pool_name.chars().collect();
    digits.sort_unstable();
    assert_eq!(digits.into_iter().collect::<String>(), "01234567");
}

#[tokio::test]
async fn undecodable_values_are_errors_not_panics() {
    let etcd = TestEtcd::start().await;
    let s = store(&etcd).await;
    let mut c = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    c.put("/otherix/bad", vec![0xff, 0xff, 0xff], None).await.unwrap();
    let err = s.get::<ClusterSettings>("bad").await.unwrap_err();
    assert!(matches!(err, StoreError::Decode { .. }), "{err}");
}

#[tokio::test]
async fn health_reports_no_alarms_and_fails_when_etcd_is_gone() {
    let etcd = TestEtcd::start().await;
    let s = Store::connect(&[etcd.endpoint()], Duration::from_secs(1)).await.unwrap();
    assert_eq!(s.health().await.unwrap().alarms, Vec::<String>::new());
    drop(etcd);
    assert!(matches!(s.health().await, Err(StoreError::Unavailable(_))));
}

//! The watch-fed cache and the store's watch, lease, claim and paging
//! primitives against a real etcd member.

use std::time::Duration;

use otherix_proto::otherix::store::v1::ClusterSettings;
use otherix_store::{Change, Expect, Store, StoreError};
use otherix_testkit::TestEtcd;
use tokio_util::sync::CancellationToken;

async fn store(etcd: &TestEtcd) -> Store {
    Store::connect(&[etcd.endpoint()], Duration::from_secs(5)).await.unwrap()
}

fn rec(name: &str) -> ClusterSettings {
    ClusterSettings { default_pool_name: name.into(), ..Default::default() }
}

fn index(s: &ClusterSettings) -> Option<String> {
    (!s.default_pool_name.is_empty()).then(|| s.default_pool_name.clone())
}

#[tokio::test]
async fn cache_lists_watches_and_reads_its_writes() {
    let etcd = TestEtcd::start().await;
    let s = store(&etcd).await;
    s.put("things/a", &rec("one"), Expect::Absent, &[]).await.unwrap();
    let cancel = CancellationToken::new();
    let cache = s.cache::<ClusterSettings>("things/", Some(index), Duration::from_secs(5), cancel.clone());
    let mut changes = cache.subscribe();
    cache.ready().await.unwrap();
    assert_eq!(cache.get("things/a").unwrap().unwrap().value.default_pool_name, "one");
    assert_eq!(cache.relists(), 1);

    // Read-your-writes: after waiting for the write's revision the cache has it.
    let rev = s.put("things/b", &rec("two"), Expect::Absent, &[]).await.unwrap();
    cache.wait_for(rev).await.unwrap();
    let b = cache.get("things/b").unwrap().unwrap();
    assert_eq!((b.value.default_pool_name.as_str(), b.mod_revision), ("two", rev));
    assert_eq!(cache.get_by_index("two").unwrap().unwrap().mod_revision, rev);
    // A write outside the prefix: the barrier still completes (progress notify).
    let other = s.put("elsewhere/x", &rec("x"), Expect::Absent, &[]).await.unwrap();
    cache.wait_for(other).await.unwrap();
    assert!(cache.revision() >= other);
    assert!(cache.get("elsewhere/x").unwrap().is_none());

    // Deletes and index updates.
    let cur = cache.get("things/a").unwrap().unwrap();
    s.delete("things/a", cur.mod_revision, &[]).await.unwrap();
    let rev = s.current_revision().await.unwrap();
    cache.wait_for(rev).await.unwrap();
    assert!(cache.get("things/a").unwrap().is_none());
    assert!(cache.get_by_index("one").unwrap().is_none());
    let mut seen = Vec::new();
    while let Ok(c) = changes.try_recv() {
        seen.push(c);
    }
    assert!(seen.contains(&Change::Put("things/b".into())), "{seen:?}");
    assert!(seen.contains(&Change::Delete("things/a".into())), "{seen:?}");

    // Paging from memory.
    for i in 0..5 {
        s.put(&format!("things/p{i}"), &rec(&format!("p{i}")), Expect::Absent, &[]).await.unwrap();
    }
    cache.wait_for(s.current_revision().await.unwrap()).await.unwrap();
    let p1 = cache.page("things/p", 2, None).unwrap();
    assert_eq!(p1.total, 5);
    assert_eq!(p1.items.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["things/p0", "things/p1"]);
    let p3 = cache.page("things/p", 2, Some("things/p3")).unwrap();
    assert_eq!(p3.items.len(), 1);
    assert_eq!(p3.next, None);
    cancel.cancel();
}

#[tokio::test]
async fn cache_resumes_after_etcd_restarts_and_refuses_when_stale() {
    let etcd = TestEtcd::start().await;
    let s = store(&etcd).await;
    let cancel = CancellationToken::new();
    let cache = s.cache::<ClusterSettings>("things/", None, Duration::from_millis(300), cancel.clone());
    cache.ready().await.unwrap();
    let before = s.put("things/a", &rec("one"), Expect::Absent, &[]).await.unwrap();
    cache.wait_for(before).await.unwrap();

    // kill -9 etcd: the member supervisor restarts it on the same data.
    let pid = etcd.pid().unwrap();
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    // Writes after the restart arrive through the resumed watch.
    let mut rev = 0;
    for _ in 0..100 {
        match s.put("things/b", &rec("two"), Expect::Absent, &[]).await {
            Ok(r) => {
                rev = r;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(rev > before, "etcd did not come back");
    cache.wait_for(rev).await.unwrap();
    assert_eq!(cache.get("things/b").unwrap().unwrap().value.default_pool_name, "two");
    assert_eq!(cache.get("things/a").unwrap().unwrap().mod_revision, before);
    assert_eq!(cache.relists(), 1, "a resumed watch needs no relist");

    // etcd gone for good: once the watch has been down past the staleness
    // bound, reads are refused rather than served from old data.
    drop(etcd);
    let mut refused = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if matches!(cache.get("things/a"), Err(StoreError::Stale { .. })) {
            refused = true;
            break;
        }
    }
    assert!(refused, "a cache without its watch kept serving");
    cancel.cancel();
}

#[tokio::test]
async fn leases_claims_and_pages() {
    let etcd = TestEtcd::start().await;
    let s = store(&etcd).await;

    // A claim: exactly one of several racing claimants wins.
    let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    let other = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    let wins = futures::future::join_all((0..8).map(|i| {
        let s = s.clone();
        let l = if i == 0 { lease } else { other };
        async move { s.claim("claims/job-1", format!("w{i}").into_bytes(), l).await.unwrap() }
    }))
    .await;
    assert_eq!(wins.iter().filter(|w| **w).count(), 1);
    // The owner releases; a non-owner cannot.
    let owner = String::from_utf8(s.get_raw("claims/job-1").await.unwrap().unwrap()).unwrap();
    assert!(!s.release("claims/job-1", b"nobody").await.unwrap());
    assert!(s.release("claims/job-1", owner.as_bytes()).await.unwrap());

    // A claim dies with its lease unless kept alive.
    assert!(s.claim("claims/job-2", b"me".to_vec(), lease).await.unwrap());
    let keep = CancellationToken::new();
    let keeper = {
        let (s, keep) = (s.clone(), keep.clone());
        tokio::spawn(async move { s.keep_lease_alive(lease, Duration::from_secs(2), keep).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.get_raw("claims/job-2").await.unwrap().is_some(), "kept-alive claim vanished");
    keep.cancel();
    keeper.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(s.get_raw("claims/job-2").await.unwrap().is_none(), "claim outlived its lease");
    // Revoking a lease deletes its keys at once.
    s.put_leased("claims/job-3", b"x".to_vec(), other).await.unwrap();
    s.revoke_lease(other).await.unwrap();
    assert!(s.get_raw("claims/job-3").await.unwrap().is_none());

    // Paginated listing with continuation and total, from etcd.
    for i in 0..7 {
        s.put(&format!("pages/{i:02}"), &rec("x"), Expect::Absent, &[]).await.unwrap();
    }
    s.put("pages0", &rec("sibling"), Expect::Absent, &[]).await.unwrap();
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let p = s.list_page::<ClusterSettings>("pages/", 3, after.as_deref()).await.unwrap();
        assert_eq!(p.total, 7);
        keys.extend(p.items.into_iter().map(|(k, _)| k));
        match p.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(keys, (0..7).map(|i| format!("pages/{i:02}")).collect::<Vec<_>>());
}

//! What the agent refuses before a VM gets anywhere near QEMU: image fetches
//! to metadata, loopback and link-local addresses (directly, by name and by
//! redirect), `file://` outside `images.file_dir` (a symlink escaping it, a
//! FIFO), a disk larger than the pool's free space, and memory beyond what the
//! host has left once the VMs it holds are counted, at create and at start. One
//! test starts a QEMU (and powers it off); the others never reach QEMU.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{assert_failed, create_req, env_with, finish, new_id, spec};
use otherix_agent_testkit::{Route, TestDir};
use otherix_proto::otherix::agent::v1::{ImageFormat, TaskState};

fn message(t: &otherix_proto::otherix::agent::v1::Task) -> String {
    t.error.as_ref().map(|e| e.message.clone()).unwrap_or_default()
}

#[tokio::test]
async fn metadata_address_and_a_redirect_to_it_are_refused() {
    let mut routes = HashMap::new();
    routes.insert(
        "/redir/meta.qcow2".to_string(),
        Route::Redirect("http://169.254.169.254/latest/meta-data/x.qcow2".into()),
    );
    routes.insert("/redir/v6.qcow2".to_string(), Route::Redirect("http://[fd00:ec2::254]/x.qcow2".into()));
    routes.insert("/redir/loop.qcow2".to_string(), Route::Redirect("http://127.0.0.2:1/x.qcow2".into()));
    let env = env_with("adm-meta", routes, |_| {}).await;

    // Directly: refused by the policy, before any connection.
    let t = env
        .rt
        .create_vm(create_req("meta-1", &new_id(), spec("m1", "http://169.254.169.254/latest/x.qcow2")))
        .await
        .unwrap();
    let t = finish(&env.rt, t).await;
    assert_failed(&t, "download_failed");
    assert!(message(&t).contains("169.254.169.254 is metadata"), "{t:?}");

    // Through a redirect from the (allowed) test server: the server was asked, the redirect refused.
    for (i, (path, want)) in [
        ("/redir/meta.qcow2", "169.254.169.254 is metadata"),
        ("/redir/v6.qcow2", "fd00:ec2::254 is metadata"),
        ("/redir/loop.qcow2", "127.0.0.2 is loopback"),
    ]
    .into_iter()
    .enumerate()
    {
        let t = env.rt.create_vm(create_req(&format!("r{i}"), &new_id(), spec("m2", &env.http.url(path)))).await;
        let t = finish(&env.rt, t.unwrap()).await;
        assert_failed(&t, "download_failed");
        assert_eq!(env.http.hits(path), 1, "the redirecting server was not asked for {path}");
        assert!(message(&t).contains(want) && message(&t).contains("redirect"), "{path}: {t:?}");
    }
}

#[tokio::test]
async fn loopback_needs_an_allow_entry_also_by_name() {
    let env = env_with("adm-loop", HashMap::new(), |c| c.images.fetch_allow.clear()).await;
    let port = env.http.base_url.rsplit(':').next().unwrap().to_string();
    for (i, host) in ["127.0.0.1", "localhost"].iter().enumerate() {
        let url = format!("http://{host}:{port}/images/test.qcow2");
        let t = env.rt.create_vm(create_req(&format!("l{i}"), &new_id(), spec("l", &url))).await.unwrap();
        let t = finish(&env.rt, t).await;
        assert_failed(&t, "download_failed");
        assert!(message(&t).contains("is loopback"), "{host}: {t:?}");
    }
    assert_eq!(env.http.hits("/images/test.qcow2"), 0, "a refused fetch reached the server");
}

#[tokio::test]
async fn file_urls_stay_inside_the_file_dir() {
    let dir = TestDir::new("adm-file");
    let allowed = dir.path.join("allowed");
    let outside = dir.path.join("outside");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    // A raw-looking file (a whole number of sectors) outside, and ways to reach it.
    std::fs::write(outside.join("secret.raw"), vec![0u8; 4096]).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.raw"), allowed.join("escape.raw")).unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("sub")).unwrap();
    let fifo = allowed.join("fifo.raw");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // A regular file inside: passes the policy, then fails the format check.
    std::fs::write(allowed.join("inside.raw"), b"not a sector multiple").unwrap();
    let root = allowed.clone();
    let env = env_with("adm-file", HashMap::new(), move |c| c.images.file_dir = Some(root)).await;
    let raw = |name: &str, url: String| {
        let mut s = spec(name, &url);
        s.image.as_mut().unwrap().format = ImageFormat::Raw as i32;
        s
    };
    for (i, (url, code, want)) in [
        (format!("file://{}", outside.join("secret.raw").display()), "download_failed", "outside images.file_dir"),
        (format!("file://{}", allowed.join("escape.raw").display()), "download_failed", "outside images.file_dir"),
        (format!("file://{}", allowed.join("sub/secret.raw").display()), "download_failed", "outside images.file_dir"),
        (format!("file://{}", fifo.display()), "download_failed", "not a regular file"),
        ("file:///proc/self/environ".to_string(), "download_failed", "outside images.file_dir"),
        ("file:///dev/zero".to_string(), "download_failed", "outside images.file_dir"),
        (format!("file://{}", allowed.join("inside.raw").display()), "unsupported_format", "512-byte sectors"),
    ]
    .into_iter()
    .enumerate()
    {
        let t = env.rt.create_vm(create_req(&format!("f{i}"), &new_id(), raw("f", url.clone()))).await.unwrap();
        let t = finish(&env.rt, t).await;
        assert_failed(&t, code);
        assert!(message(&t).contains(want), "{url}: {t:?}");
    }
}

#[tokio::test]
async fn a_disk_larger_than_the_pool_is_refused_before_the_download() {
    let env = env_with("adm-disk", HashMap::new(), |_| {}).await;
    let free = env.rt.scan_pool("default").await.unwrap().free_bytes;
    let mut s = spec("big", &env.http.url("/images/test.qcow2"));
    s.disk_gib = u32::try_from(free / (1 << 30) + 1).unwrap();
    let t = env.rt.create_vm(create_req("d1", &new_id(), s)).await.unwrap();
    let t = finish(&env.rt, t).await;
    assert_failed(&t, "insufficient_resources");
    assert!(message(&t).contains("of disk requested"), "{t:?}");
    assert_eq!(env.http.hits("/images/test.qcow2"), 0, "the image was fetched for a disk that cannot fit");
    assert!(env.rt.list_vms().await.is_empty());
}

#[tokio::test]
async fn memory_is_admitted_against_what_other_vms_hold() {
    let image = otherix_agent_testkit::test_image();
    let mut routes = HashMap::new();
    // The first VM's create stays in its download for the whole test.
    routes.insert("/images/slow.qcow2".to_string(), Route::Slow(image.qcow2(), Duration::from_secs(30)));
    let env = env_with("adm-mem", routes, |_| {}).await;
    let host = env.rt.host_limits().memory_mib;
    // Alone, each fits the host.
    let mut first = spec("first", &env.http.url("/images/slow.qcow2"));
    first.memory_mib = host - 200;
    let first_id = new_id();
    env.rt.create_vm(create_req("mem-1", &first_id, first)).await.unwrap();
    otherix_agent_testkit::wait_for("the first create to hold its memory", Duration::from_secs(20), || async {
        let t = env.rt.get_task("mem-1", Duration::ZERO).await.ok()?;
        (t.progress.as_ref()?.step == "image").then_some(())
    })
    .await;
    let second = spec("second", &env.http.url("/images/test.qcow2"));
    let t = env.rt.create_vm(create_req("mem-2", &new_id(), second)).await.unwrap();
    let t = finish(&env.rt, t).await;
    assert_failed(&t, "insufficient_resources");
    assert!(message(&t).contains("256 MiB of memory requested, 200 MiB available"), "{t:?}");
    assert_eq!(env.http.hits("/images/test.qcow2"), 0);
    // A VM that fits what is left is admitted (and then fails on its missing image).
    let mut small = spec("small", &env.http.url("/images/missing.qcow2"));
    small.memory_mib = 128;
    let t = env.rt.create_vm(create_req("mem-3", &new_id(), small)).await.unwrap();
    let t = finish(&env.rt, t).await;
    assert_failed(&t, "download_failed");
    assert_eq!(env.http.hits("/images/missing.qcow2"), 1);
    let first = env.rt.get_task("mem-1", Duration::ZERO).await.unwrap();
    assert_eq!(first.state, TaskState::Running as i32, "the first create ended early: {first:?}");
}

#[tokio::test]
async fn starting_a_stopped_vm_is_admitted_against_what_others_hold() {
    let _slot = otherix_agent_testkit::vm_slots(1);
    let image = otherix_agent_testkit::test_image();
    let mut routes = HashMap::new();
    routes.insert("/images/slow.qcow2".to_string(), Route::Slow(image.qcow2(), Duration::from_secs(30)));
    let env = env_with("adm-start", routes, |_| {}).await;
    let host = env.rt.host_limits().memory_mib;
    // A small VM runs, then is powered off: it holds no memory.
    let a = new_id();
    let mut small = spec("small", &env.http.url("/images/test.qcow2"));
    small.memory_mib = 256;
    let t = env.rt.create_vm(create_req("s-1", &a, small)).await.unwrap();
    common::assert_ok(&finish(&env.rt, t).await);
    let t = env.rt.poweroff_vm("s-2", &a).await.unwrap();
    common::assert_ok(&finish(&env.rt, t).await);
    // A big create takes nearly all of the host's memory while it downloads.
    let mut big = spec("big", &env.http.url("/images/slow.qcow2"));
    big.memory_mib = host - 200;
    env.rt.create_vm(create_req("s-3", &new_id(), big)).await.unwrap();
    otherix_agent_testkit::wait_for("the big create to hold its memory", Duration::from_secs(20), || async {
        let t = env.rt.get_task("s-3", Duration::ZERO).await.ok()?;
        (t.progress.as_ref()?.step == "image").then_some(())
    })
    .await;
    // Starting the small VM again would exceed what is left.
    let t = env.rt.start_vm("s-4", &a).await.unwrap();
    let t = finish(&env.rt, t).await;
    assert_failed(&t, "insufficient_resources");
    assert!(message(&t).contains("256 MiB of memory requested, 200 MiB available"), "{t:?}");
    assert!(common::qemu_pids(&a).is_empty(), "a QEMU was started for a refused start");
}

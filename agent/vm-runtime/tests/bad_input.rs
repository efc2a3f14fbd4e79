//! Bad input gets a clear error code and leaves nothing behind: no VM record,
//! no disk, no VM dir, no partial download, no QEMU. Also: concurrent creates
//! of one image share one download.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use otherix_agent_testkit::Route;
use otherix_proto::otherix::agent::v1::{ImageFormat, TaskState};

fn big_qcow2(dir: &std::path::Path) -> std::path::PathBuf {
    // A 2 GiB virtual disk in a tiny file: larger than a 1 GiB disk request.
    let p = dir.join("big.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("2G")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    p
}

async fn check_refused(
    env: &Env,
    task: &str,
    mutate: impl FnOnce(&mut otherix_proto::otherix::agent::v1::VmSpec),
    code: &str,
) {
    let id = new_id();
    let mut s = spec("bad-vm", &env.http.url("/images/test.qcow2"));
    mutate(&mut s);
    let t = finish(&env.rt, env.rt.create_vm(create_req(task, &id, s)).await.unwrap()).await;
    assert_failed(&t, code);
    let msg = &t.error.as_ref().unwrap().message;
    assert!(!msg.is_empty());
    assert_eq!(env.rt.get_vm(&id).await.unwrap_err().code(), "vm_not_found", "{task}");
    assert!(env.rt.list_vms().await.is_empty(), "{task}");
    assert!(qemu_pids(&id).is_empty(), "{task}");
    assert!(leftovers(env).is_empty(), "{task}: {:?}", leftovers(env));
    // The outcome is kept: GetTask and a repeat answer the same.
    assert_eq!(env.rt.get_task(task, Duration::ZERO).await.unwrap(), t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_leaves_nothing_behind() {
    let fixtures = otherix_agent_testkit::TestDir::new("fix");
    let big = big_qcow2(&fixtures.path);
    let mut routes = HashMap::new();
    routes.insert("/page.qcow2".to_string(), Route::Bytes(b"<html><body>Not an image</body></html>\n".to_vec()));
    routes.insert("/page.raw".to_string(), Route::Bytes(b"<html><body>Not an image</body></html>\n".to_vec()));
    routes.insert("/gone.qcow2".to_string(), Route::Status(404));
    routes.insert("/big.qcow2".to_string(), Route::File(big));
    let env = env("bad", routes).await;

    // Unreachable URL: nothing listens on port 1.
    check_refused(
        &env,
        "b-unreachable",
        |s| s.image.as_mut().unwrap().url = "http://127.0.0.1:1/x.qcow2".into(),
        "download_failed",
    )
    .await;
    // A URL that answers 404.
    let gone = env.http.url("/gone.qcow2");
    check_refused(&env, "b-404", |s| s.image.as_mut().unwrap().url = gone, "download_failed").await;
    // Wrong sha256 pin.
    check_refused(&env, "b-sha", |s| s.image.as_mut().unwrap().sha256 = "0".repeat(64), "checksum_mismatch").await;
    // Not a disk image, declared qcow2 and declared raw.
    let page = env.http.url("/page.qcow2");
    check_refused(&env, "b-notimage", |s| s.image.as_mut().unwrap().url = page, "qcow2_header_invalid").await;
    let page_raw = env.http.url("/page.raw");
    check_refused(
        &env,
        "b-notimage-raw",
        |s| {
            let i = s.image.as_mut().unwrap();
            i.url = page_raw;
            i.format = ImageFormat::Raw as i32;
        },
        "unsupported_format",
    )
    .await;
    // Path-traversing basenames.
    for (n, url) in [
        "http://127.0.0.1:9/images/..%2f..%2fetc%2fpasswd",
        "http://127.0.0.1:9/images/%2e%2e",
        "http://127.0.0.1:9/images/..",
        "http://127.0.0.1:9/",
    ]
    .iter()
    .enumerate()
    {
        let url = url.to_string();
        check_refused(&env, &format!("b-traversal-{n}"), |s| s.image.as_mut().unwrap().url = url, "validation_failed")
            .await;
    }
    // A scheme the config does not allow.
    check_refused(
        &env,
        "b-scheme",
        |s| s.image.as_mut().unwrap().url = "https://example.invalid/a.qcow2".into(),
        "validation_failed",
    )
    .await;
    // A disk smaller than the image.
    let big_url = env.http.url("/big.qcow2");
    check_refused(
        &env,
        "b-small-disk",
        |s| {
            s.image.as_mut().unwrap().url = big_url;
            s.disk_gib = 1;
        },
        "disk_too_small",
    )
    .await;
    // More memory / cpus than the host has.
    check_refused(&env, "b-memory", |s| s.memory_mib = 1 << 30, "insufficient_resources").await;
    check_refused(&env, "b-cpus", |s| s.vcpus = 255, "insufficient_resources").await;
    // Bad names and unknown pools.
    check_refused(&env, "b-name", |s| s.name = "Not_A_Label".into(), "validation_failed").await;
    check_refused(&env, "b-pool", |s| s.pool = "nowhere".into(), "pool_not_found").await;

    // Malformed ids fail the call itself.
    let e = env.rt.create_vm(create_req("b-id", "not-a-uuid", spec("x", "http://h/a.qcow2"))).await.unwrap_err();
    assert_eq!(e.code(), "validation_failed");
    let e = env.rt.create_vm(create_req("../etc", &new_id(), spec("x", "http://h/a.qcow2"))).await.unwrap_err();
    assert_eq!(e.code(), "validation_failed");
    // A task id reused for another operation is refused.
    let e = env.rt.delete_vm("b-sha", &new_id()).await.unwrap_err();
    assert_eq!(e.code(), "conflict");

    // Only verified images entered the cache: not the one with the wrong pin,
    // not the HTML page; the 2 GiB image passed every check before the disk size did.
    let pools = env.rt.list_pools().await;
    assert_eq!(pools.len(), 1);
    let cached: Vec<_> = pools[0].images.iter().map(|i| i.name.clone()).collect();
    assert_eq!(cached, vec!["big.qcow2".to_string()], "only verified images enter the cache");
    assert!(pools[0].capacity_bytes > 0 && pools[0].free_bytes > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_share_one_download() {
    let fixtures = otherix_agent_testkit::TestDir::new("fix2");
    let big = big_qcow2(&fixtures.path);
    let sha = otherix_agent_testkit::sha256_file(&big);
    let mut routes = HashMap::new();
    routes.insert("/shared/big.qcow2".to_string(), Route::File(big.clone()));
    let env = env("coalesce", routes).await;
    let url = env.http.url("/shared/big.qcow2");
    // Both fail after the download (disk too small), so no VM boots here.
    let mut tasks = Vec::new();
    for n in 0..4 {
        let mut s = spec("co-vm", &url);
        s.disk_gib = 1;
        s.image.as_mut().unwrap().sha256 = sha.to_uppercase();
        tasks.push(env.rt.create_vm(create_req(&format!("c-{n}"), &new_id(), s)).await.unwrap());
    }
    for t in tasks {
        let t = finish(&env.rt, t).await;
        assert_failed(&t, "disk_too_small");
    }
    assert_eq!(env.http.hits("/shared/big.qcow2"), 1, "downloads were not coalesced");
    let pool = env.rt.scan_pool("default").await.unwrap();
    assert_eq!(pool.images.len(), 1);
    let img = &pool.images[0];
    assert_eq!((img.name.as_str(), img.sha256.as_str(), img.virtual_size_bytes), ("big.qcow2", sha.as_str(), 2 << 30));
    assert_eq!(img.size_bytes, std::fs::metadata(&big).unwrap().len());
    assert!(pool.downloads.is_empty());
    assert_eq!(env.rt.get_task("c-0", Duration::ZERO).await.unwrap().state, TaskState::Failed as i32);
    assert_eq!(env.rt.scan_pool("nowhere").await.unwrap_err().code(), "pool_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_does_not_fail_a_concurrent_request_without_one() {
    let fixtures = otherix_agent_testkit::TestDir::new("fix3");
    let big = big_qcow2(&fixtures.path);
    let mut routes = HashMap::new();
    routes.insert("/pin/big.qcow2".to_string(), Route::Slow(big, Duration::from_millis(20)));
    let env = env("pins", routes).await;
    let url = env.http.url("/pin/big.qcow2");
    let mut wrong = spec("pin-vm", &url);
    wrong.disk_gib = 1;
    wrong.image.as_mut().unwrap().sha256 = "0".repeat(64);
    let mut none = spec("pin-vm", &url);
    none.disk_gib = 1;
    let tw = env.rt.create_vm(create_req("pin-wrong", &new_id(), wrong)).await.unwrap();
    let tn = env.rt.create_vm(create_req("pin-none", &new_id(), none)).await.unwrap();
    assert_failed(&finish(&env.rt, tw).await, "checksum_mismatch");
    // The unpinned request gets past the download and fails only on its own disk size.
    assert_failed(&finish(&env.rt, tn).await, "disk_too_small");
    assert_eq!(env.http.hits("/pin/big.qcow2"), 2);
    assert_eq!(env.rt.scan_pool("default").await.unwrap().images.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_progress_is_recorded() {
    let image = otherix_agent_testkit::test_image();
    let size = std::fs::metadata(image.qcow2()).unwrap().len();
    let mut routes = HashMap::new();
    // About 3 MB/s: the 16 MiB image takes a few seconds.
    routes.insert("/slow/slow.qcow2".to_string(), Route::Slow(image.qcow2(), Duration::from_millis(20)));
    let env = env("progress", routes).await;
    let mut s = spec("slow-vm", &env.http.url("/slow/slow.qcow2"));
    // A pin the image does not match: the task fails once the download ends, so no VM boots.
    s.image.as_mut().unwrap().sha256 = "f".repeat(64);
    let t = env.rt.create_vm(create_req("p-1", &new_id(), s)).await.unwrap();
    let seen = otherix_agent_testkit::wait_for("download progress", Duration::from_secs(60), || async {
        let t = env.rt.get_task("p-1", Duration::ZERO).await.unwrap();
        let p = t.progress.clone().unwrap_or_default();
        let pool = env.rt.scan_pool("default").await.unwrap();
        (p.step == "image" && p.bytes_done > 0 && p.bytes_done < size && !pool.downloads.is_empty())
            .then(|| (p, pool.downloads[0].clone()))
    })
    .await;
    assert_eq!(seen.0.bytes_total, size);
    assert_eq!(seen.1.name, "slow.qcow2");
    assert_eq!(seen.1.bytes_total, size);
    assert!(seen.1.bytes_done > 0);
    // The wrong pin fails the task once the download completes.
    assert_failed(&finish(&env.rt, t).await, "checksum_mismatch");
    assert!(env.rt.scan_pool("default").await.unwrap().downloads.is_empty());
    assert!(leftovers(&env).is_empty(), "{:?}", leftovers(&env));
}

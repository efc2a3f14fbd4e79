//! Every lifecycle verb on one real VM (TCG), checked through QMP on the
//! operator socket and the guest's own serial output.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use otherix_agent_testkit::{BOOT_MARKER, vm_slots};
use otherix_proto::otherix::agent::v1::VmPhase;
use otherix_vm_runtime::console::Session;

/// Reads the session until `needle` appears (60 s at most); returns what was read.
async fn expect(s: &mut Session, needle: &str) -> String {
    let mut seen = String::new();
    let res = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(b) = s.recv().await {
            seen.push_str(&String::from_utf8_lossy(&b));
            if seen.contains(needle) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(res, Ok(true), "never saw {needle:?}; console said {seen:?}");
    seen
}

/// Logs in as root on a fresh prompt (Enter first, so the prompt is this boot's).
async fn login(s: &mut Session) {
    s.write(b"\n").await.unwrap();
    expect(s, "login:").await;
    s.write(b"root\n").await.unwrap();
    expect(s, "#").await;
}

async fn phase(env: &Env, id: &str) -> VmPhase {
    VmPhase::try_from(env.rt.get_vm(id).await.unwrap().phase).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_verbs_on_a_real_vm() {
    let _slot = vm_slots(1);
    let env = env("life", HashMap::new()).await;
    let id = new_id();
    let url = env.http.url("/images/test.qcow2");

    // Create from the HTTP server: running, boot marker, hostname from the seed.
    let t = env.rt.create_vm(create_req("t-create", &id, spec("life-vm", &url))).await.unwrap();
    let done = finish(&env.rt, t).await;
    assert_ok(&done);
    assert_eq!(qmp_status(&env.rt, &id).await, "running");
    let vm = env.rt.get_vm(&id).await.unwrap();
    assert_eq!(vm.phase, VmPhase::Running as i32);
    assert_eq!(vm.qmp_status, "running");
    let first_pid = vm.pid;
    assert!(first_pid > 0);
    let l = wait_log(&env.rt, &id, BOOT_MARKER, 1).await;
    // Spawned paused and attached before `cont`: the bootloader's first line is there.
    assert!(l.trim_start().starts_with("SYSLINUX"), "{l}");
    assert!(l.contains("otherix-test-image: local-hostname=life-vm"), "{l}");
    assert!(l.contains("otherix-message: hello from the test"), "{l}");
    assert!(std::path::Path::new(&vm.disk_path).is_file());

    // The same task id again: the same task, no second QEMU.
    let again = env.rt.create_vm(create_req("t-create", &id, spec("life-vm", &url))).await.unwrap();
    assert_eq!(again, done);
    assert_eq!(qemu_pids(&id), vec![first_pid]);
    assert_eq!(env.http.hits("/images/test.qcow2"), 1);

    // Console: one interactive session; log in and get an answer from the guest.
    wait_log(&env.rt, &id, "life-vm login:", 1).await;
    let mut con = env.rt.open_console(&id).unwrap();
    assert_eq!(env.rt.open_console(&id).unwrap_err().code(), "console_in_use");
    login(&mut con).await;
    con.write(b"echo hello-$((6*7))-done\n").await.unwrap();
    expect(&mut con, "hello-42-done").await;

    // Pause: QMP says paused and typed input gets no answer until resume.
    assert_ok(&finish(&env.rt, env.rt.pause_vm("t-pause", &id).await.unwrap()).await);
    assert_eq!(qmp_status(&env.rt, &id).await, "paused");
    assert_eq!(phase(&env, &id).await, VmPhase::Paused);
    con.write(b"echo paused-$((40+2))-done\n").await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_secs(2), expect(&mut con, "paused-42-done")).await;
    assert!(quiet.is_err(), "a paused guest answered");
    assert_ok(&finish(&env.rt, env.rt.resume_vm("t-resume", &id).await.unwrap()).await);
    assert_eq!(qmp_status(&env.rt, &id).await, "running");
    assert_eq!(phase(&env, &id).await, VmPhase::Running);
    expect(&mut con, "paused-42-done").await;

    // Reset: the guest boots again in the same process; two RESET events count once.
    let watcher = ops_qmp(&env.rt, &id).await;
    let mut events = watcher.events();
    assert_ok(&finish(&env.rt, env.rt.reset_vm("t-reset", &id).await.unwrap()).await);
    wait_log(&env.rt, &id, BOOT_MARKER, 2).await;
    let vm = env.rt.get_vm(&id).await.unwrap();
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push((ev.name, ev.data, ev.timestamp_us));
    }
    // The ops monitor takes one client at a time.
    drop(events);
    drop(watcher);
    assert!(seen.len() >= 2, "{seen:?}");
    assert_eq!(vm.reset_count, 1, "events {seen:?}");
    assert_eq!(vm.pid, first_pid);
    assert_eq!(qmp_status(&env.rt, &id).await, "running");
    drop(con);

    // Stop: ACPI power-down; the guest's own power-button handler runs.
    assert_ok(&finish(&env.rt, env.rt.stop_vm("t-stop", &id, 0).await.unwrap()).await);
    let vm = env.rt.get_vm(&id).await.unwrap();
    assert_eq!(vm.phase, VmPhase::Stopped as i32);
    assert_eq!(vm.reason, "stopped");
    assert!(qemu_pids(&id).is_empty());
    assert!(log(&env.rt, &id).await.contains("ACPI power button -> poweroff"));

    // Start: a new process boots.
    assert_ok(&finish(&env.rt, env.rt.start_vm("t-start", &id).await.unwrap()).await);
    let vm = env.rt.get_vm(&id).await.unwrap();
    assert_eq!(vm.phase, VmPhase::Running as i32);
    assert_ne!(vm.pid, first_pid);
    let second_pid = vm.pid;
    wait_log(&env.rt, &id, BOOT_MARKER, 3).await;
    // Starting a running VM is a no-op.
    assert_ok(&finish(&env.rt, env.rt.start_vm("t-start-again", &id).await.unwrap()).await);
    assert_eq!(qemu_pids(&id), vec![second_pid]);

    // Stop timeout: with the guest's ACPI daemon gone, stop fails and the VM keeps running.
    // Prompts so far: first boot, the reset, this start.
    wait_log(&env.rt, &id, "life-vm login:", 3).await;
    let mut con = env.rt.open_console(&id).unwrap();
    login(&mut con).await;
    con.write(b"killall acpid; echo acpid-$((1+1))-gone\n").await.unwrap();
    expect(&mut con, "acpid-2-gone").await;
    drop(con);
    let failed = finish(&env.rt, env.rt.stop_vm("t-stop-timeout", &id, 3).await.unwrap()).await;
    assert_failed(&failed, "stop_timeout");
    assert_eq!(qmp_status(&env.rt, &id).await, "running");
    assert_eq!(phase(&env, &id).await, VmPhase::Running);
    assert_eq!(qemu_pids(&id), vec![second_pid]);

    // Reboot: graceful stop, then a new process. The guest ignores ACPI now, so reboot fails the same way.
    let failed = finish(&env.rt, env.rt.reboot_vm("t-reboot-refused", &id, 2).await.unwrap()).await;
    assert_failed(&failed, "stop_timeout");

    // Poweroff: quit, the process is gone at once.
    assert_ok(&finish(&env.rt, env.rt.poweroff_vm("t-poweroff", &id).await.unwrap()).await);
    let vm = env.rt.get_vm(&id).await.unwrap();
    assert_eq!((vm.phase, vm.reason.as_str(), vm.pid), (VmPhase::Stopped as i32, "powered_off", 0));
    assert!(qemu_pids(&id).is_empty());

    // Reboot of a fresh boot (ACPI works again): a new pid and a new boot.
    assert_ok(&finish(&env.rt, env.rt.start_vm("t-start-2", &id).await.unwrap()).await);
    let before = env.rt.get_vm(&id).await.unwrap().pid;
    wait_log(&env.rt, &id, BOOT_MARKER, 4).await;
    assert_ok(&finish(&env.rt, env.rt.reboot_vm("t-reboot", &id, 0).await.unwrap()).await);
    let vm = env.rt.get_vm(&id).await.unwrap();
    assert_eq!(vm.phase, VmPhase::Running as i32);
    assert_ne!(vm.pid, before);
    wait_log(&env.rt, &id, BOOT_MARKER, 5).await;

    // Delete: everything goes; twice: the second new task finds nothing.
    let disk = vm.disk_path.clone();
    assert_ok(&finish(&env.rt, env.rt.delete_vm("t-delete", &id).await.unwrap()).await);
    assert!(qemu_pids(&id).is_empty());
    assert!(!std::path::Path::new(&disk).exists());
    assert!(leftovers(&env).is_empty(), "{:?}", leftovers(&env));
    assert_eq!(env.rt.get_vm(&id).await.unwrap_err().code(), "vm_not_found");
    assert_failed(&finish(&env.rt, env.rt.delete_vm("t-delete-2", &id).await.unwrap()).await, "vm_not_found");
    // Repeating the first delete answers its outcome.
    assert_ok(&env.rt.delete_vm("t-delete", &id).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_initiated_poweroff_shows_as_stopped() {
    let _slot = vm_slots(1);
    let env = env("guestoff", HashMap::new()).await;
    let id = new_id();
    // A raw image this time, through file:// (enabled in the test config).
    let mut s = spec("guest-off", &format!("file://{}", env.image.raw().display()));
    s.image.as_mut().unwrap().format = otherix_proto::otherix::agent::v1::ImageFormat::Raw as i32;
    s.disk_gib = 1;
    s.cloud_init.as_mut().unwrap().network_config = "version: 2\nethernets:\n  eth0:\n    dhcp4: false\n".into();
    assert_ok(&finish(&env.rt, env.rt.create_vm(create_req("g-create", &id, s)).await.unwrap()).await);
    let vm = env.rt.get_vm(&id).await.unwrap();
    assert_eq!(vm.disk_size_bytes, 1 << 30);
    let l = wait_log(&env.rt, &id, "guest-off login:", 1).await;
    assert!(l.contains("network-config present (4 lines)"), "{l}");
    let mut con = env.rt.open_console(&id).unwrap();
    login(&mut con).await;
    con.write(b"poweroff\n").await.unwrap();
    otherix_agent_testkit::wait_for("guest power-off", Duration::from_secs(60), || async {
        let vm = env.rt.get_vm(&id).await.unwrap();
        (vm.phase == VmPhase::Stopped as i32).then_some(vm)
    })
    .await;
    let vm = env.rt.get_vm(&id).await.unwrap();
    assert_eq!(vm.reason, "guest_shutdown");
    assert!(qemu_pids(&id).is_empty());
    assert_ok(&finish(&env.rt, env.rt.delete_vm("g-delete", &id).await.unwrap()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_init_disabled_gives_no_seed() {
    let _slot = vm_slots(1);
    let env = env("noseed", HashMap::new()).await;
    let id = new_id();
    let mut s = spec("no-seed", &env.http.url("/images/test.qcow2"));
    s.cloud_init = Some(otherix_proto::otherix::agent::v1::CloudInit { disabled: true, ..Default::default() });
    assert_ok(&finish(&env.rt, env.rt.create_vm(create_req("n-create", &id, s)).await.unwrap()).await);
    let l = wait_log(&env.rt, &id, BOOT_MARKER, 1).await;
    assert!(l.contains("no cidata seed found"), "{l}");
    assert!(!env.rt.vm_dir(&id).unwrap().join("seed.iso").exists());
    assert_ok(&finish(&env.rt, env.rt.delete_vm("n-delete", &id).await.unwrap()).await);
    assert!(leftovers(&env).is_empty(), "{:?}", leftovers(&env));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_from_outside_shows_as_crashed() {
    let _slot = vm_slots(1);
    let env = env("crash", HashMap::new()).await;
    let id = new_id();
    let s = spec("crash-vm", &env.http.url("/images/test.qcow2"));
    assert_ok(&finish(&env.rt, env.rt.create_vm(create_req("x-create", &id, s)).await.unwrap()).await);
    let pid = env.rt.get_vm(&id).await.unwrap().pid;
    std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let vm = otherix_agent_testkit::wait_for("crash detection", Duration::from_secs(30), || async {
        let vm = env.rt.get_vm(&id).await.unwrap();
        (vm.phase == VmPhase::Failed as i32).then_some(vm)
    })
    .await;
    assert_eq!((vm.reason.as_str(), vm.pid), ("crashed", 0));
    assert!(vm.message.contains("signal: 9"), "{}", vm.message);
    // A crashed VM starts again.
    assert_ok(&finish(&env.rt, env.rt.start_vm("x-start", &id).await.unwrap()).await);
    assert_eq!(env.rt.get_vm(&id).await.unwrap().phase, VmPhase::Running as i32);
    assert_ok(&finish(&env.rt, env.rt.delete_vm("x-delete", &id).await.unwrap()).await);
}

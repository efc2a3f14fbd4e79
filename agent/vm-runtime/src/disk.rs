//! A VM's own disk and its NoCloud seed.
//!
//! The disk is a full copy of the cached image, converted to qcow2 with
//! `qemu-img convert`, not a qcow2 overlay on the cached image. Why: the VM
//! then never depends on the cache, so a cached image can be evicted or
//! replaced (a re-fetch after a pin change) without breaking VMs, a disk can
//! move between hosts as one file, and the disk carries no backing-file
//! reference for anyone to tamper with. The cost is the copy at create time
//! (sparse, so proportional to the data in the image) and the disk space.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;

use crate::AgentError;
use crate::config::QemuConfig;

/// One GiB.
pub const GIB: u64 = 1 << 30;

/// The disk size a VM gets: the image's virtual size when `disk_gib` is 0,
/// else `disk_gib`, which must not be smaller than the image.
pub fn disk_size(disk_gib: u32, image_virtual_size: u64) -> Result<u64, AgentError> {
    if disk_gib == 0 {
        return Ok(image_virtual_size);
    }
    let requested = u64::from(disk_gib) * GIB;
    if requested < image_virtual_size {
        return Err(AgentError::DiskTooSmall { requested, image: image_virtual_size });
    }
    Ok(requested)
}

async fn run(cmd: &mut Command, what: &str, timeout: Duration) -> Result<(), AgentError> {
    // kill_on_drop: a run past its timeout is killed when the future is dropped.
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(r) => {
            r.map_err(|e| AgentError::CreateFailed { what: format!("{what}: cannot run"), source: Some(Arc::new(e)) })?
        }
        Err(_) => {
            return Err(AgentError::CreateFailed {
                what: format!("{what}: killed after {} s", timeout.as_secs()),
                source: None,
            });
        }
    };
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(AgentError::CreateFailed { what: format!("{what}: {} {}", out.status, stderr.trim()), source: None })
    }
}

/// `qemu-img <args>` under `prlimit`: an address-space and a CPU-time limit,
/// because it parses images that come from users. The wall-clock limit is
/// applied by [`run`].
pub fn qemu_img_command<I, S>(q: &QemuConfig, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(&q.prlimit_binary);
    // glibc reserves 64 MiB of address space per malloc arena (up to 8 per core): without
    // a cap the address-space limit would track the core count, not the work.
    cmd.env("MALLOC_ARENA_MAX", "2");
    cmd.arg(format!("--as={}", q.img_max_memory_mib.saturating_mul(1 << 20)))
        .arg(format!("--cpu={}", q.img_max_cpu_secs))
        .arg("--")
        .arg(&q.img_binary)
        .args(args);
    cmd
}

/// Makes `dest` (qcow2, `size` bytes) from the cached image `src`; the file
/// appears under its final name only when complete.
pub async fn make_disk(q: &QemuConfig, src: &Path, src_format: &str, dest: &Path, size: u64) -> Result<(), AgentError> {
    let partial = dest.with_extension("qcow2.partial");
    let _ = tokio::fs::remove_file(&partial).await;
    let timeout = Duration::from_secs(q.img_timeout_secs);
    let res = async {
        run(
            qemu_img_command(q, ["convert", "-q", "-f", src_format, "-O", "qcow2", "-o", "compat=1.1"])
                .arg(src)
                .arg(&partial),
            "qemu-img convert",
            timeout,
        )
        .await?;
        run(
            qemu_img_command(q, ["resize", "-q", "-f", "qcow2"]).arg(&partial).arg(size.to_string()),
            "qemu-img resize",
            timeout,
        )
        .await?;
        tokio::fs::rename(&partial, dest).await.map_err(|e| AgentError::io("move disk into place", e))
    }
    .await;
    if res.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    res
}

/// The NoCloud `meta-data` document: the VM id as instance-id, the VM name
/// (a validated DNS label, so no YAML quoting issues) as local-hostname.
pub fn meta_data(vm_id: &uuid::Uuid, name: &str) -> String {
    format!("instance-id: {vm_id}\nlocal-hostname: {name}\n")
}

/// Builds the seed ISO (volume label `cidata`) at `dest` with genisoimage.
pub async fn make_seed(
    genisoimage: &Path,
    work: &Path,
    dest: &Path,
    meta_data: &str,
    user_data: &str,
    network_config: &str,
) -> Result<(), AgentError> {
    let dir = work.join("seed-files");
    let _ = tokio::fs::remove_dir_all(&dir).await;
    tokio::fs::create_dir_all(&dir).await.map_err(|e| AgentError::io("create seed dir", e))?;
    let user_data = if user_data.is_empty() { "#cloud-config\n" } else { user_data };
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, body) in [("meta-data", meta_data), ("user-data", user_data), ("network-config", network_config)] {
        if name == "network-config" && body.is_empty() {
            continue;
        }
        let p = dir.join(name);
        tokio::fs::write(&p, body).await.map_err(|e| AgentError::io("write seed file", e))?;
        files.push(p);
    }
    let partial = dest.with_extension("iso.partial");
    let res = run(
        Command::new(genisoimage)
            .args(["-quiet", "-output"])
            .arg(&partial)
            .args(["-volid", "cidata", "-joliet", "-rock"])
            .args(&files),
        "genisoimage",
        Duration::from_secs(120),
    )
    .await;
    let res = match res {
        Ok(()) => tokio::fs::rename(&partial, dest).await.map_err(|e| AgentError::io("move seed into place", e)),
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_dir_all(&dir).await;
    if res.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(disk_size(0, 18 << 20).unwrap(), 18 << 20);
        assert_eq!(disk_size(2, 18 << 20).unwrap(), 2 * GIB);
        assert_eq!(disk_size(1, GIB).unwrap(), GIB);
        assert_eq!(disk_size(1, GIB + 1).unwrap_err().code(), "disk_too_small");
    }

    fn small_qcow2(dir: &Path) -> PathBuf {
        let img = dir.join("src.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("64M")
            .status()
            .expect("qemu-img create");
        assert!(st.success());
        img
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("otx-disk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn qemu_img_runs_under_its_limits() {
        let d = tmpdir("limits");
        let src = small_qcow2(&d);
        let ok = QemuConfig::default();
        make_disk(&ok, &src, "qcow2", &d.join("ok.qcow2"), 1 << 30).await.unwrap();
        assert!(d.join("ok.qcow2").is_file());
        // 16 MiB of address space is too little for qemu-img to even load: the limit is applied.
        let tight = QemuConfig { img_max_memory_mib: 16, ..QemuConfig::default() };
        let err = make_disk(&tight, &src, "qcow2", &d.join("no.qcow2"), 1 << 30).await.unwrap_err();
        assert_eq!(err.code(), "vm_create_failed", "{err}");
        assert!(!d.join("no.qcow2").exists() && !d.join("no.qcow2.partial").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_hanging_qemu_img_is_killed_at_the_timeout() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmpdir("hang");
        let fake = d.join("qemu-img");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let q = QemuConfig { img_binary: fake, img_timeout_secs: 1, ..QemuConfig::default() };
        let started = std::time::Instant::now();
        let err = make_disk(&q, &d.join("src"), "qcow2", &d.join("out.qcow2"), 1 << 30).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert!(err.to_string().contains("killed after 1 s"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn meta_data_document() {
        let u = uuid::Uuid::parse_str("6f1c1a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b").unwrap();
        assert_eq!(
            meta_data(&u, "web-1"),
            "instance-id: 6f1c1a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b\nlocal-hostname: web-1\n"
        );
    }
}

//! A VM's own disk and its NoCloud seed.
//!
//! The disk is a full copy of the cached image, converted to qcow2 with
//! `qemu-img convert`, not a qcow2 overlay on the cached image. Why: the VM
//! then never depends on the cache, so a cached image can be evicted or
//! replaced (a re-fetch after a pin change) without breaking VMs, a disk can
//! move between hosts as one file, and the disk carries no backing-file
//! reference for anyone to tamper with. The cost is the copy at create time
//! (sparse, so proportional to the data in the image) and the disk space.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::AgentError;

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

async fn run(cmd: &mut Command, what: &str) -> Result<(), AgentError> {
    let out = cmd.output().await.map_err(|e| AgentError::CreateFailed(format!("{what}: cannot run: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(AgentError::CreateFailed(format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// Makes `dest` (qcow2, `size` bytes) from the cached image `src`; the file
/// appears under its final name only when complete.
pub async fn make_disk(
    qemu_img: &Path,
    src: &Path,
    src_format: &str,
    dest: &Path,
    size: u64,
) -> Result<(), AgentError> {
    let partial = dest.with_extension("qcow2.partial");
    let _ = tokio::fs::remove_file(&partial).await;
    let res = async {
        run(
            Command::new(qemu_img)
                .args(["convert", "-q", "-f", src_format, "-O", "qcow2", "-o", "compat=1.1"])
                .arg(src)
                .arg(&partial),
            "qemu-img convert",
        )
        .await?;
        run(
            Command::new(qemu_img).args(["resize", "-q", "-f", "qcow2"]).arg(&partial).arg(size.to_string()),
            "qemu-img resize",
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

    #[test]
    fn meta_data_document() {
        let u = uuid::Uuid::parse_str("6f1c1a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b").unwrap();
        assert_eq!(
            meta_data(&u, "web-1"),
            "instance-id: 6f1c1a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b\nlocal-hostname: web-1\n"
        );
    }
}

//! QEMU: accelerator choice, host limits, the command line, and spawning a
//! process in its own session so the agent's death never takes VMs down.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use otherix_proto::otherix::agent::v1::Accelerator;

use crate::AgentError;
use crate::config::{AccelSetting, QemuConfig};
use crate::state::vm_files;

/// Whether `/proc/cpuinfo` text shows hardware virtualisation (vmx or svm).
pub fn cpu_flags_have_virt(cpuinfo: &str) -> bool {
    cpuinfo.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.trim() == "flags" && v.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    })
}

/// Whether KVM can run guests here: `/dev/kvm` opens read-write and the CPU
/// shows vmx/svm. The flag check matters: nested "PVM" hosts expose a
/// /dev/kvm that initialises but cannot run ordinary guests.
pub fn kvm_usable() -> bool {
    let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    dev && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| cpu_flags_have_virt(&c))
}

/// Resolves the configured accelerator.
pub fn choose_accel(setting: AccelSetting) -> Accelerator {
    match setting {
        AccelSetting::Kvm => Accelerator::Kvm,
        AccelSetting::Tcg => Accelerator::Tcg,
        AccelSetting::Auto => {
            if kvm_usable() {
                Accelerator::Kvm
            } else {
                Accelerator::Tcg
            }
        }
    }
}

/// What the host offers VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// CPUs available to the agent.
    pub cpus: u32,
    /// Total memory in MiB.
    pub memory_mib: u64,
}

/// Parses `MemTotal` (kB) out of `/proc/meminfo` text, in MiB.
pub fn meminfo_total_mib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb / 1024)
    })
}

/// Reads the host's limits.
pub fn host_limits() -> HostLimits {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory_mib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| meminfo_total_mib(&m)).unwrap_or(0);
    HostLimits { cpus, memory_mib }
}

/// Everything that goes on one VM's QEMU command line.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The VM name (`-name`).
    pub name: String,
    /// The VM id (`-uuid`): how a re-adopting agent recognises the process.
    pub uuid: uuid::Uuid,
    /// The accelerator.
    pub accel: Accelerator,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// The VM's dir: sockets, pidfile, serial log.
    pub run_dir: PathBuf,
    /// The boot disk (qcow2).
    pub disk: PathBuf,
    /// The NoCloud seed, if any.
    pub seed: Option<PathBuf>,
}

/// Escapes a value for QEMU's `key=value,...` option syntax (commas double).
fn opt_value(p: &Path) -> Result<String, AgentError> {
    let s = p.to_str().ok_or_else(|| AgentError::Validation(format!("path {} is not UTF-8", p.display())))?;
    Ok(s.replace(',', ",,"))
}

/// Builds the QEMU arguments (without the binary). Starts paused (`-S`): the
/// agent connects QMP and the serial socket, then sends `cont`, so no boot
/// output is lost.
pub fn command_line(l: &Launch, q: &QemuConfig) -> Result<Vec<OsString>, AgentError> {
    let d = |f: &str| opt_value(&l.run_dir.join(f));
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("guest={},debug-threads=on", l.name),
        "-uuid".into(),
        l.uuid.to_string(),
        "-machine".into(),
        q.machine.clone(),
    ];
    match l.accel {
        Accelerator::Kvm => a.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]),
        _ => {
            let mut tcg = "tcg".to_string();
            if let Some(mb) = q.tcg_tb_size_mib {
                tcg.push_str(&format!(",tb-size={mb}"));
            }
            a.extend(["-accel".into(), tcg]);
        }
    }
    a.extend([
        "-smp".into(),
        l.vcpus.to_string(),
        "-m".into(),
        format!("{}M", l.memory_mib),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-S".into(),
        "-pidfile".into(),
        d(vm_files::PIDFILE)?,
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", d(vm_files::QMP)?),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", d(vm_files::QMP_OPS)?),
        "-chardev".into(),
        format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            d(vm_files::SERIAL)?,
            d(vm_files::CONSOLE_LOG)?
        ),
        "-serial".into(),
        "chardev:serial0".into(),
        "-drive".into(),
        format!(
            "file={},if=virtio,format=qcow2,id=disk0,node-name=disk0-fmt,cache={}",
            opt_value(&l.disk)?,
            q.disk_cache
        ),
    ]);
    if let Some(seed) = &l.seed {
        a.extend(["-drive".into(), format!("file={},if=virtio,format=raw,readonly=on,id=seed0", opt_value(seed)?)]);
    }
    a.extend(["-nic".into(), "none".into()]);
    Ok(a.into_iter().map(OsString::from).collect())
}

/// Whether `/proc/<pid>/cmdline` is a QEMU carrying `-uuid <uuid>`: the check
/// before trusting a pidfile or signalling a pid that might have been reused.
pub fn pid_runs_vm(pid: i32, uuid: &uuid::Uuid) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    cmdline_has_uuid(&raw, uuid)
}

/// Whether a NUL-separated command line has `-uuid` followed by `uuid`.
pub fn cmdline_has_uuid(raw: &[u8], uuid: &uuid::Uuid) -> bool {
    let want = uuid.to_string();
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    args.windows(2).any(|w| w[0] == b"-uuid" && w[1] == want.as_bytes())
}

/// Spawns QEMU in its own session (setsid), stdin/stdout on /dev/null and
/// stderr into `stderr_path`, so neither the agent's exit nor a signal to its
/// process group or systemd unit (`KillMode=process`) reaches the VM. `stderr`
/// is the open file QEMU's stderr goes to.
pub fn spawn(binary: &Path, args: &[OsString], stderr: std::fs::File) -> Result<tokio::process::Child, AgentError> {
    // util-linux setsid(1) instead of a pre_exec hook (no unsafe code): the
    // child is not a process-group leader, so setsid execs QEMU in place and
    // the pid stays QEMU's.
    let mut cmd = tokio::process::Command::new("setsid");
    cmd.arg("--")
        .arg(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(false);
    cmd.spawn().map_err(|e| AgentError::QemuSpawnFailed {
        message: format!("cannot execute {}", binary.display()),
        source: Some(std::sync::Arc::new(e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(seed: bool) -> Launch {
        Launch {
            name: "web-1".into(),
            uuid: uuid::Uuid::parse_str("6f1c1a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b").unwrap(),
            accel: Accelerator::Tcg,
            vcpus: 2,
            memory_mib: 256,
            run_dir: PathBuf::from("/var/lib/otherix/vms/6f1c"),
            disk: PathBuf::from("/pool/a,b/disks/6f1c.qcow2"),
            seed: seed.then(|| PathBuf::from("/var/lib/otherix/vms/6f1c/seed.iso")),
        }
    }

    fn joined(l: &Launch, q: &QemuConfig) -> String {
        command_line(l, q).unwrap().iter().map(|a| a.to_string_lossy().to_string()).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn command_line_has_the_safety_and_identity_options() {
        let s = joined(&launch(true), &QemuConfig::default());
        for want in [
            "-name guest=web-1,debug-threads=on",
            "-uuid 6f1c1a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
            "-accel tcg -smp 2 -m 256M",
            "-nodefaults -no-user-config -display none -sandbox on,",
            " -S ",
            "-pidfile /var/lib/otherix/vms/6f1c/qemu.pid",
            "-qmp unix:/var/lib/otherix/vms/6f1c/qmp.sock,server=on,wait=off",
            "logfile=/var/lib/otherix/vms/6f1c/console.log,logappend=on",
            "-serial chardev:serial0",
            "file=/pool/a,,b/disks/6f1c.qcow2,if=virtio,format=qcow2,",
            "file=/var/lib/otherix/vms/6f1c/seed.iso,if=virtio,format=raw,readonly=on",
            "-nic none",
        ] {
            assert!(s.contains(want), "missing {want:?} in {s}");
        }
        assert!(!s.contains("-cpu host"));
    }

    #[test]
    fn kvm_uses_host_cpu_and_no_seed_without_cloud_init() {
        let mut l = launch(false);
        l.accel = Accelerator::Kvm;
        let q = QemuConfig { tcg_tb_size_mib: Some(32), ..QemuConfig::default() };
        let s = joined(&l, &q);
        assert!(s.contains("-accel kvm -cpu host"));
        assert!(!s.contains("seed"));
        assert!(!s.contains("tb-size"));
        let s = joined(&launch(false), &q);
        assert!(s.contains("-accel tcg,tb-size=32"));
    }

    #[test]
    fn cpu_flags() {
        assert!(cpu_flags_have_virt("processor\t: 0\nflags\t\t: fpu vme svm sse\n"));
        assert!(cpu_flags_have_virt("flags : fpu vmx\n"));
        assert!(!cpu_flags_have_virt("flags\t\t: fpu vme sse svm_lock\nvmx flags\t: ept\n"));
        assert!(!cpu_flags_have_virt(""));
    }

    #[test]
    fn meminfo() {
        assert_eq!(meminfo_total_mib("MemTotal:       24576000 kB\nMemFree: 1 kB\n"), Some(24000));
        assert_eq!(meminfo_total_mib("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn uuid_in_cmdline() {
        let u = uuid::Uuid::parse_str("6f1c1a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b").unwrap();
        let raw = b"qemu-system-x86_64\x00-name\x00x\x00-uuid\x006f1c1a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b\x00-S\x00";
        assert!(cmdline_has_uuid(raw, &u));
        assert!(!cmdline_has_uuid(b"sleep\x006f1c1a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b\x00", &u));
        assert!(!cmdline_has_uuid(b"", &u));
        assert!(!pid_runs_vm(std::process::id() as i32, &u));
    }
}

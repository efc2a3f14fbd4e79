//! What the heartbeat reports about the host: CPU, memory, system disk, kernel, QEMU and the
//! accelerator, with the capacity caps from the agent config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use otherix_proto::otherix::agent::v1::{Capabilities, Resources};
use serde::{Deserialize, Serialize};

use crate::transport::normalize_architecture;

/// Capacity caps from the agent config (`capacity.*`): what is kept for the host, and upper
/// bounds so that two agents on one machine can report different capacity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapacityConfig {
    /// CPUs kept for the host (`capacity.reserved_cpus`).
    pub reserved_cpus: u32,
    /// Memory kept for the host, bytes (`capacity.reserved_memory_bytes`).
    pub reserved_memory_bytes: u64,
    /// At most this many CPUs are offered (`capacity.max_cpus`).
    pub max_cpus: Option<u32>,
    /// At most this much memory is offered, bytes (`capacity.max_memory_bytes`).
    pub max_memory_bytes: Option<u64>,
}

/// Where [`HostFacts::gather`] looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactsConfig {
    /// The agent's state dir: the system disk is the filesystem holding it.
    pub state_dir: PathBuf,
    /// The caps.
    pub capacity: CapacityConfig,
    /// The QEMU binary asked for its version; `None` = `qemu-system-x86_64` on amd64,
    /// `qemu-system-aarch64` on arm64 (from `PATH`).
    pub qemu_binary: Option<PathBuf>,
    /// `/proc` (tests point it elsewhere).
    pub proc_dir: PathBuf,
    /// `/dev/kvm`.
    pub kvm_device: PathBuf,
}

impl FactsConfig {
    /// Defaults for the real host, with the given state dir and no caps.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        FactsConfig {
            state_dir: state_dir.into(),
            capacity: CapacityConfig::default(),
            qemu_binary: None,
            proc_dir: PathBuf::from("/proc"),
            kvm_device: PathBuf::from("/dev/kvm"),
        }
    }
}

/// A snapshot of the host, caps applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// `amd64` or `arm64`.
    pub architecture: String,
    /// The CPU model name (`model name` in /proc/cpuinfo).
    pub cpu_model: String,
    /// Logical CPUs of the host.
    pub host_cpus: u32,
    /// CPUs offered to VMs: host CPUs minus the reservation, at most `max_cpus`.
    pub cpu_cores: u32,
    /// MemTotal of the host, bytes.
    pub memory_total_bytes: u64,
    /// Memory offered to VMs: MemTotal minus the reservation, at most `max_memory_bytes`.
    pub memory_bytes: u64,
    /// Memory free now for VMs: MemAvailable minus the reservation, at most `memory_bytes`.
    pub memory_available_bytes: u64,
    /// Size of the filesystem holding the state dir.
    pub system_disk_total_bytes: u64,
    /// Bytes available to the agent on it.
    pub system_disk_free_bytes: u64,
    /// The kernel release (uname -r).
    pub kernel_version: String,
    /// QEMU's version, empty when QEMU is not installed.
    pub qemu_version: String,
    /// `kvm` when /dev/kvm opens read-write and the CPU has virtualisation extensions,
    /// else `tcg`.
    pub accelerator: String,
    /// Whether the CPU flags show vmx or svm.
    pub cpu_virt_flags: bool,
}

/// What /proc/cpuinfo says: logical CPUs, model name, and whether vmx/svm is there.
pub(crate) fn parse_cpuinfo(text: &str) -> (u32, String, bool) {
    let mut cpus = 0u32;
    let mut model = String::new();
    let mut virt = false;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "processor" => cpus += 1,
            "model name" | "Model" | "cpu model" if model.is_empty() => model = v.to_string(),
            "flags" | "Features" if !virt => virt = v.split_whitespace().any(|f| f == "vmx" || f == "svm"),
            _ => {}
        }
    }
    (cpus, model, virt)
}

/// MemTotal and MemAvailable from /proc/meminfo, in bytes.
pub(crate) fn parse_meminfo(text: &str) -> (u64, u64) {
    let mut total = 0;
    let mut available = None;
    let mut free = 0;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let kb = v.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        match k.trim() {
            "MemTotal" => total = kb.saturating_mul(1024),
            "MemAvailable" => available = Some(kb.saturating_mul(1024)),
            "MemFree" => free = kb.saturating_mul(1024),
            _ => {}
        }
    }
    (total, available.unwrap_or(free))
}

/// The version in `qemu-system-x86_64 --version` output: `QEMU emulator version 7.2.22 (...)`.
pub(crate) fn parse_qemu_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.contains("version"))?;
    let rest = &line[line.find("version")? + "version".len()..];
    let v = rest.split_whitespace().next()?;
    v.chars().next().filter(char::is_ascii_digit).map(|_| v.trim_end_matches(',').to_string())
}

fn qemu_version(binary: &Path) -> String {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().ok().and_then(|c| c.get(binary).cloned()) {
        return v;
    }
    let v = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| parse_qemu_version(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default();
    if v.is_empty() {
        tracing::debug!(binary = %binary.display(), "QEMU version unknown (not installed?)");
    }
    if let Ok(mut c) = cache.lock() {
        c.insert(binary.to_path_buf(), v.clone());
    }
    v
}

/// statvfs of `dir`, or of its nearest existing ancestor: (total, available) bytes.
fn disk(dir: &Path) -> (u64, u64) {
    let mut p = Some(dir);
    while let Some(d) = p {
        if let Ok(st) = rustix::fs::statvfs(d) {
            return (st.f_blocks.saturating_mul(st.f_frsize), st.f_bavail.saturating_mul(st.f_frsize));
        }
        p = d.parent();
    }
    (0, 0)
}

/// `kvm` when the device opens read-write and (on x86) the CPU flags have vmx/svm.
fn accelerator(kvm_device: &Path, virt_flags: bool, architecture: &str) -> &'static str {
    let needs_flags = architecture == "amd64";
    let opens = std::fs::OpenOptions::new().read(true).write(true).open(kvm_device).is_ok();
    if opens && (virt_flags || !needs_flags) { "kvm" } else { "tcg" }
}

impl HostFacts {
    /// Reads the host. Never fails: what cannot be read is reported empty or zero (and
    /// without QEMU the version is empty).
    pub fn gather(config: &FactsConfig) -> HostFacts {
        let architecture = normalize_architecture(std::env::consts::ARCH).unwrap_or(std::env::consts::ARCH).to_string();
        let cpuinfo = std::fs::read_to_string(config.proc_dir.join("cpuinfo")).unwrap_or_default();
        let (mut host_cpus, cpu_model, cpu_virt_flags) = parse_cpuinfo(&cpuinfo);
        if host_cpus == 0 {
            host_cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        }
        let meminfo = std::fs::read_to_string(config.proc_dir.join("meminfo")).unwrap_or_default();
        let (mem_total, mem_available) = parse_meminfo(&meminfo);
        let (system_disk_total_bytes, system_disk_free_bytes) = disk(&config.state_dir);
        let kernel_version = rustix::system::uname().release().to_string_lossy().into_owned();
        let qemu_binary = config.qemu_binary.clone().unwrap_or_else(|| {
            PathBuf::from(if architecture == "arm64" { "qemu-system-aarch64" } else { "qemu-system-x86_64" })
        });
        let qemu_version = qemu_version(&qemu_binary);
        let accelerator = accelerator(&config.kvm_device, cpu_virt_flags, &architecture).to_string();
        let mut facts = HostFacts {
            architecture,
            cpu_model,
            host_cpus,
            memory_total_bytes: mem_total,
            system_disk_total_bytes,
            system_disk_free_bytes,
            kernel_version,
            qemu_version,
            accelerator,
            cpu_virt_flags,
            ..HostFacts::default()
        };
        facts.apply_caps(&config.capacity, mem_available);
        facts
    }

    /// Computes the offered CPUs and memory from the host's and the caps.
    pub(crate) fn apply_caps(&mut self, caps: &CapacityConfig, host_mem_available: u64) {
        let mut cpus = self.host_cpus.saturating_sub(caps.reserved_cpus);
        if let Some(max) = caps.max_cpus {
            cpus = cpus.min(max);
        }
        let mut mem = self.memory_total_bytes.saturating_sub(caps.reserved_memory_bytes);
        if let Some(max) = caps.max_memory_bytes {
            mem = mem.min(max);
        }
        self.cpu_cores = cpus;
        self.memory_bytes = mem;
        self.memory_available_bytes = host_mem_available.saturating_sub(caps.reserved_memory_bytes).min(mem);
    }

    /// The heartbeat's `Capabilities`.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            cpu_cores: self.cpu_cores,
            memory_bytes: self.memory_bytes,
            accelerator: self.accelerator.clone(),
            qemu_version: self.qemu_version.clone(),
            cpu_model: self.cpu_model.clone(),
            kernel_version: self.kernel_version.clone(),
        }
    }

    /// The heartbeat's `Resources`. `cpu_available` is the offered CPUs: this crate does not
    /// know what VMs hold (a provider that does subtracts it).
    pub fn resources(&self) -> Resources {
        Resources {
            cpu_available: self.cpu_cores,
            memory_available_bytes: self.memory_available_bytes,
            memory_total_bytes: self.memory_total_bytes,
            system_disk_total_bytes: self.system_disk_total_bytes,
            system_disk_free_bytes: self.system_disk_free_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n\
flags\t\t: fpu vme de pse vmx sse\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t\t: fpu vmx\n";

    #[test]
    fn cpuinfo() {
        assert_eq!(parse_cpuinfo(CPUINFO), (2, "Intel(R) Xeon(R) CPU @ 2.20GHz".to_string(), true));
        assert_eq!(parse_cpuinfo("processor : 0\nflags : fpu sse vmxx\n"), (1, String::new(), false));
        assert!(parse_cpuinfo("processor : 0\nflags : svm\n").2);
        assert_eq!(parse_cpuinfo(""), (0, String::new(), false));
    }

    #[test]
    fn meminfo() {
        let t = "MemTotal:       16318412 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(parse_meminfo(t), (16318412 * 1024, 12000000 * 1024));
        // Old kernels without MemAvailable: MemFree.
        assert_eq!(parse_meminfo("MemTotal: 10 kB\nMemFree: 4 kB\n"), (10240, 4096));
        assert_eq!(parse_meminfo("garbage"), (0, 0));
    }

    #[test]
    fn qemu_versions() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright (c)").as_deref(),
            Some("7.2.22")
        );
        assert_eq!(parse_qemu_version("QEMU emulator version 9.1.0\n").as_deref(), Some("9.1.0"));
        assert_eq!(parse_qemu_version("no such thing"), None);
        assert_eq!(parse_qemu_version("version x"), None);
    }

    #[test]
    fn caps() {
        let mut f = HostFacts { host_cpus: 8, memory_total_bytes: 16 << 30, ..HostFacts::default() };
        f.apply_caps(&CapacityConfig::default(), 10 << 30);
        assert_eq!((f.cpu_cores, f.memory_bytes, f.memory_available_bytes), (8, 16 << 30, 10 << 30));
        let caps = CapacityConfig {
            reserved_cpus: 1,
            reserved_memory_bytes: 2 << 30,
            max_cpus: Some(4),
            max_memory_bytes: Some(4 << 30),
        };
        f.apply_caps(&caps, 10 << 30);
        assert_eq!((f.cpu_cores, f.memory_bytes, f.memory_available_bytes), (4, 4 << 30, 4 << 30));
        let caps = CapacityConfig { reserved_cpus: 20, reserved_memory_bytes: 20 << 30, ..CapacityConfig::default() };
        f.apply_caps(&caps, 10 << 30);
        assert_eq!((f.cpu_cores, f.memory_bytes, f.memory_available_bytes), (0, 0, 0));
    }

    #[test]
    fn gather_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = FactsConfig::new(dir.path().join("not/yet/created"));
        cfg.qemu_binary = Some(PathBuf::from("/nonexistent/qemu-system-x86_64"));
        cfg.capacity.max_cpus = Some(1);
        let f = HostFacts::gather(&cfg);
        assert!(f.host_cpus >= 1);
        assert_eq!(f.cpu_cores, 1);
        assert!(f.memory_total_bytes > 0 && f.memory_bytes <= f.memory_total_bytes);
        assert!(f.system_disk_total_bytes > 0, "statvfs of the nearest existing ancestor");
        assert!(!f.kernel_version.is_empty());
        assert_eq!(f.qemu_version, "");
        assert!(f.accelerator == "kvm" || f.accelerator == "tcg");
        // No KVM device: tcg.
        cfg.kvm_device = dir.path().join("kvm");
        assert_eq!(HostFacts::gather(&cfg).accelerator, "tcg");
        assert_eq!(f.capabilities().cpu_cores, 1);
        assert_eq!(f.resources().memory_total_bytes, f.memory_total_bytes);
    }
}

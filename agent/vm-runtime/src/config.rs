//! The runtime's configuration (the agent's YAML config embeds it).

use std::path::PathBuf;

use serde::Deserialize;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelSetting {
    /// KVM when `/dev/kvm` opens read-write and the CPU flags show vmx/svm, else TCG.
    #[default]
    Auto,
    /// Always KVM (QEMU fails to start where KVM is unusable).
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

/// A storage pool declared to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The pool name (a lowercase RFC 1123 label).
    pub name: String,
    /// An absolute directory; created on demand.
    pub path: PathBuf,
}

/// QEMU settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// The QEMU binary; found on PATH when it has no slash.
    pub binary: PathBuf,
    /// The `qemu-img` binary.
    pub img_binary: PathBuf,
    /// The `genisoimage` binary that builds NoCloud seeds.
    pub genisoimage_binary: PathBuf,
    /// Accelerator choice.
    pub accel: AccelSetting,
    /// Machine type passed to `-machine`.
    pub machine: String,
    /// Disk cache mode (`writeback`, `none` for O_DIRECT-capable storage, ...).
    pub disk_cache: String,
    /// TCG translation-cache size in MiB (smaller = less RSS); unset = QEMU's default.
    pub tcg_tb_size_mib: Option<u32>,
    /// Seconds a graceful stop waits for the guest by default.
    pub stop_timeout_secs: u64,
    /// Seconds a poweroff waits after QMP quit before SIGKILL.
    pub kill_grace_secs: u64,
    /// Seconds to wait for QEMU's QMP socket after spawning.
    pub start_timeout_secs: u64,
    /// util-linux `prlimit`, which puts the limits below on every `qemu-img` run.
    pub prlimit_binary: PathBuf,
    /// Address-space limit of a `qemu-img` run, in MiB.
    pub img_max_memory_mib: u64,
    /// CPU-time limit of a `qemu-img` run, in seconds.
    pub img_max_cpu_secs: u64,
    /// Wall-clock limit of a `qemu-img` run, in seconds; it is killed after that.
    pub img_timeout_secs: u64,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            img_binary: PathBuf::from("qemu-img"),
            genisoimage_binary: PathBuf::from("genisoimage"),
            accel: AccelSetting::Auto,
            machine: "pc".into(),
            disk_cache: "writeback".into(),
            tcg_tb_size_mib: None,
            stop_timeout_secs: 60,
            kill_grace_secs: 10,
            start_timeout_secs: 30,
            prlimit_binary: PathBuf::from("prlimit"),
            img_max_memory_mib: 2048,
            img_max_cpu_secs: 600,
            img_timeout_secs: 1800,
        }
    }
}

/// Image cache settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// URL schemes the agent fetches: `https`, `http` (dev/test), `file` (tests only).
    pub allowed_schemes: Vec<String>,
    /// Largest image file accepted, in bytes.
    pub max_image_bytes: u64,
    /// Byte budget of each pool's cache; least recently used images beyond it are evicted.
    pub cache_max_bytes: u64,
    /// Seconds to establish a connection.
    pub connect_timeout_secs: u64,
    /// Seconds without receiving a byte before a download fails.
    pub read_timeout_secs: u64,
    /// Address blocks (`10.8.0.0/16`, `127.0.0.1`) and host names (`mirror.internal`,
    /// `*.images.example.com`) image fetches may reach although the default policy refuses
    /// them (loopback, link-local, private). Metadata addresses need an address entry.
    pub fetch_allow: Vec<String>,
    /// Address blocks and host names image fetches never reach; wins over `fetch_allow`.
    pub fetch_deny: Vec<String>,
    /// Whether private networks (RFC 1918, 100.64.0.0/10, fc00::/7) may be fetched from
    /// without a `fetch_allow` entry. Default false.
    pub allow_private_networks: bool,
    /// Redirects followed per fetch; each is checked against the policy.
    pub max_redirects: usize,
    /// The only directory `file://` images may come from (regular files only, symlinks
    /// resolved first). Required when `allowed_schemes` has `file`.
    pub file_dir: Option<PathBuf>,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig {
            allowed_schemes: vec!["https".into()],
            max_image_bytes: 64 << 30,
            cache_max_bytes: 200 << 30,
            connect_timeout_secs: 15,
            read_timeout_secs: 60,
            fetch_allow: Vec::new(),
            fetch_deny: Vec::new(),
            allow_private_networks: false,
            max_redirects: 5,
            file_dir: None,
        }
    }
}

/// Console settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Bytes of recent serial output kept in memory per VM for log readers.
    pub ring_buffer_bytes: usize,
    /// Size at which the serial log file is rotated (one old generation kept).
    pub log_max_bytes: u64,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig { ring_buffer_bytes: 256 << 10, log_max_bytes: 8 << 20 }
    }
}

/// Everything the runtime needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Where per-VM and per-task records, sockets, seeds and logs live.
    pub state_dir: PathBuf,
    /// Storage pools.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// QEMU settings.
    #[serde(default)]
    pub qemu: QemuConfig,
    /// Image cache settings.
    #[serde(default)]
    pub images: ImagesConfig,
    /// Console settings.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Hours finished task records are kept.
    #[serde(default = "default_task_retention")]
    pub task_retention_hours: u64,
}

fn default_task_retention() -> u64 {
    168
}

impl RuntimeConfig {
    /// A config with defaults and the given state dir.
    pub fn new(state_dir: PathBuf) -> Self {
        RuntimeConfig {
            state_dir,
            pools: Vec::new(),
            qemu: QemuConfig::default(),
            images: ImagesConfig::default(),
            console: ConsoleConfig::default(),
            task_retention_hours: default_task_retention(),
        }
    }
}

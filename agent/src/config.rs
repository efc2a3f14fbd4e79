//! The agent's YAML configuration (`otherix-agent serve --config <file>`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use otherix_vm_runtime::RuntimeConfig;
use serde::Deserialize;

/// Where the agent listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// A unix socket path for the agent API (created with mode 0600). The
    /// mTLS TCP listener for the control plane is added beside it by the
    /// enrolment work; both serve the same service.
    pub unix_socket: PathBuf,
}

/// Log output.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (default, for people) or `json` (for log collectors).
    pub format: LogFormat,
    /// A tracing filter such as `info` or `otherix=debug`; `RUST_LOG` wins when set.
    pub level: Option<String>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole agent config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Listeners.
    pub server: ServerConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The VM runtime: state dir, pools, QEMU, images, console.
    pub runtime: RuntimeConfig,
}

impl AgentConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    /// Parses config text.
    pub fn parse(text: &str) -> anyhow::Result<AgentConfig> {
        let cfg: AgentConfig = yaml_serde::from_str(text)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use otherix_vm_runtime::config::AccelSetting;

    #[test]
    fn parses_a_full_config() {
        let cfg = AgentConfig::parse(
            "server:\n  unix_socket: /run/otherix/agent.sock\nlog:\n  format: json\nruntime:\n  state_dir: /var/lib/otherix\n  pools:\n    - name: default\n      path: /var/lib/otherix/pools/default\n  qemu:\n    accel: tcg\n    stop_timeout_secs: 30\n  images:\n    allowed_schemes: [https, http]\n",
        )
        .unwrap();
        assert_eq!(cfg.log.format, LogFormat::Json);
        assert_eq!(cfg.runtime.qemu.accel, AccelSetting::Tcg);
        assert_eq!(cfg.runtime.qemu.stop_timeout_secs, 30);
        assert_eq!(cfg.runtime.qemu.kill_grace_secs, 10);
        assert_eq!(cfg.runtime.pools[0].name, "default");
        assert_eq!(cfg.runtime.images.allowed_schemes, vec!["https", "http"]);
    }

    #[test]
    fn defaults_and_typos() {
        let cfg = AgentConfig::parse("server: {unix_socket: /s}\nruntime: {state_dir: /x}\n").unwrap();
        assert_eq!(cfg.runtime.images.allowed_schemes, vec!["https"]);
        assert_eq!(cfg.runtime.qemu.accel, AccelSetting::Auto);
        assert!(
            AgentConfig::parse("server: {unix_socket: /s}\nruntime: {state_dir: /x, qemu: {acel: kvm}}\n").is_err()
        );
        assert!(
            AgentConfig::parse("server: {unix_socket: /s}\nruntime: {state_dir: /x, qemu: {accel: hvf}}\n").is_err()
        );
    }
}

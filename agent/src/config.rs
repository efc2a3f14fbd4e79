//! The agent's YAML configuration (`otherix-agent serve --config <file>`), with
//! `OTHERIX_<SECTION>__<KEY>` environment overrides for the `bootstrap`, `tls`,
//! `heartbeat`, `capacity` and `storage` sections (the seed's `bootstrap.env`).
//! Every key is documented in `docs/agent.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use otherix_agent_enrolment::{CapacityConfig, TokenSource};
use otherix_vm_runtime::RuntimeConfig;
use serde::Deserialize;
use serde_json::Value;

/// The default state dir (`runtime.state_dir`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/otherix";
/// The default mTLS listen address (`server.listen`).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9443";
/// The default heartbeat interval in seconds (`heartbeat.interval_seconds`).
pub const DEFAULT_HEARTBEAT_SECONDS: u32 = 30;
/// The prefix of environment overrides.
pub use otherix_config::ENV_PREFIX;
/// The sections environment variables may override. `server`, `log` and `runtime` are left
/// out: `OTHERIX_SERVER__LISTEN` is the control plane's, and the agent must not pick it up
/// on a machine that runs both.
pub const ENV_SECTIONS: &[&str] = &["bootstrap", "tls", "heartbeat", "capacity", "storage"];
/// Sections whose overrides are always strings (never read as YAML numbers or booleans).
const STRING_SECTIONS: &[&str] = &["bootstrap", "tls", "storage"];

/// How the agent enrols with the control plane (`bootstrap.*`). Used by
/// `otherix-agent bootstrap`, and by `serve` when it finds no cert material; `cp_url` is
/// also where the heartbeat goes.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BootstrapConfig {
    /// The control plane's agent listener, `https://host:8443`. Unset: the agent runs
    /// standalone (local socket only, no heartbeat).
    pub cp_url: Option<String>,
    /// The join token itself; meant for `OTHERIX_BOOTSTRAP__TOKEN`, never written to a file.
    pub token: Option<String>,
    /// A file holding the join token (mode 0600).
    pub token_path: Option<PathBuf>,
    /// The name of an environment variable holding the join token.
    pub token_env: Option<String>,
    /// The pinned cluster CA fingerprint, `sha256:<hex>` (prefix and colons optional).
    pub ca_fingerprint: Option<String>,
    /// This node's name; default: the host name.
    pub node_name: Option<String>,
    /// Where the control plane reaches this agent, `host:port`; default: the host name and
    /// the port of `server.listen`.
    pub advertised_endpoint: Option<String>,
}

impl std::fmt::Debug for BootstrapConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapConfig")
            .field("cp_url", &self.cp_url)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .field("token_path", &self.token_path)
            .field("token_env", &self.token_env)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("node_name", &self.node_name)
            .field("advertised_endpoint", &self.advertised_endpoint)
            .finish()
    }
}

impl BootstrapConfig {
    /// Where the join token comes from; `None` when no token is configured. More than one
    /// source is a configuration error.
    pub fn token_source(&self) -> anyhow::Result<Option<TokenSource>> {
        let mut sources = Vec::new();
        if let Some(t) = self.token.as_ref().filter(|t| !t.trim().is_empty()) {
            sources.push(TokenSource::Value(t.clone()));
        }
        if let Some(p) = self.token_path.as_ref().filter(|p| !p.as_os_str().is_empty()) {
            sources.push(TokenSource::File(p.clone()));
        }
        if let Some(n) = self.token_env.as_ref().filter(|n| !n.is_empty()) {
            sources.push(TokenSource::Env(n.clone()));
        }
        if sources.len() > 1 {
            bail!("set only one of bootstrap.token, bootstrap.token_path and bootstrap.token_env");
        }
        Ok(sources.pop())
    }
}

/// The agent's cert material (`tls.*`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Where `agent.key` (0600), `agent.crt` and `ca.crt` live; default `<state_dir>/certs`.
    pub cert_dir: Option<PathBuf>,
}

/// Where the agent listens (`server.*`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The mTLS gRPC listener for the control plane (client certificate required, only a
    /// control-plane replica accepted).
    pub listen: String,
    /// An optional local admin socket (mode 0600) serving the same API without TLS.
    pub unix_socket: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: DEFAULT_LISTEN.into(), unix_socket: None }
    }
}

impl ServerConfig {
    /// The parsed listen address.
    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listen.parse().with_context(|| format!("server.listen: {:?} is not an address:port", self.listen))
    }
}

/// The heartbeat (`heartbeat.*`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatSettings {
    /// Seconds between reports until the control plane sets its own interval.
    pub interval_seconds: u32,
}

impl Default for HeartbeatSettings {
    fn default() -> Self {
        HeartbeatSettings { interval_seconds: DEFAULT_HEARTBEAT_SECONDS }
    }
}

/// Storage (`storage.*`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Where pools the control plane declares without a path go (`<pool_root>/<name>`);
    /// default `<state_dir>/pools`.
    pub pool_root: Option<PathBuf>,
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

fn default_runtime() -> RuntimeConfig {
    RuntimeConfig::new(PathBuf::from(DEFAULT_STATE_DIR))
}

/// The whole agent config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Enrolment inputs and the control plane's URL.
    #[serde(default)]
    pub bootstrap: BootstrapConfig,
    /// The cert material.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Listeners.
    #[serde(default)]
    pub server: ServerConfig,
    /// The heartbeat.
    #[serde(default)]
    pub heartbeat: HeartbeatSettings,
    /// Capacity caps: what is kept for the host, upper bounds.
    #[serde(default)]
    pub capacity: CapacityConfig,
    /// Where declared pools go.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The VM runtime: state dir, static pools, QEMU, images, console.
    #[serde(default = "default_runtime")]
    pub runtime: RuntimeConfig,
}

impl AgentConfig {
    /// Reads a config file and applies the process environment's overrides.
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let tree = read_tree(path)?;
        Self::from_tree(tree, std::env::vars()).with_context(|| format!("config {}", path.display()))
    }

    /// Parses config text (no environment overrides).
    pub fn parse(text: &str) -> anyhow::Result<AgentConfig> {
        Self::from_tree(parse_tree(text)?, std::iter::empty())
    }

    /// Builds a config from a YAML tree and environment overrides, then checks it.
    pub fn from_tree(mut tree: Value, env: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<AgentConfig> {
        apply_env(&mut tree, env)?;
        let cfg: AgentConfig = otherix_config::deserialize(tree)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that types alone do not.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.server.listen_addr()?;
        if self.heartbeat.interval_seconds == 0 || self.heartbeat.interval_seconds > 3600 {
            bail!("heartbeat.interval_seconds: must be between 1 and 3600");
        }
        self.bootstrap.token_source()?;
        for (key, p) in [("tls.cert_dir", &self.tls.cert_dir), ("storage.pool_root", &self.storage.pool_root)] {
            if let Some(p) = p
                && !p.is_absolute()
            {
                bail!("{key}: {} must be an absolute path", p.display());
            }
        }
        if self.bootstrap.cp_url.is_none() && self.server.unix_socket.is_none() {
            bail!("bootstrap.cp_url is not set and there is no server.unix_socket: nothing to serve");
        }
        Ok(())
    }

    /// The cert dir: `tls.cert_dir`, default `<state_dir>/certs`.
    pub fn cert_dir(&self) -> PathBuf {
        self.tls.cert_dir.clone().unwrap_or_else(|| self.runtime.state_dir.join("certs"))
    }

    /// The pool root: `storage.pool_root`, default `<state_dir>/pools`.
    pub fn pool_root(&self) -> PathBuf {
        self.storage.pool_root.clone().unwrap_or_else(|| self.runtime.state_dir.join("pools"))
    }
}

/// Reads a YAML file as a tree (an empty file is an empty mapping).
pub fn read_tree(path: &Path) -> anyhow::Result<Value> {
    Ok(otherix_config::read_tree(path)?)
}

/// Parses YAML text as a tree (an empty document is an empty mapping).
pub fn parse_tree(text: &str) -> anyhow::Result<Value> {
    otherix_config::parse_tree(text).map_err(|m| anyhow::anyhow!(m))
}

/// Sets `section.key` (creating the section) in a tree.
pub fn set_key(tree: &mut Value, path: &[&str], value: Value) -> anyhow::Result<()> {
    Ok(otherix_config::set_key(tree, path, value)?)
}

/// Applies `OTHERIX_<SECTION>__<KEY>=value` overrides for [`ENV_SECTIONS`]; other
/// `OTHERIX_` variables are not the agent's and are left alone.
pub fn apply_env(tree: &mut Value, env: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<()> {
    Ok(otherix_config::Overlay::new(ENV_SECTIONS.iter().copied())
        .with_string_sections(STRING_SECTIONS)
        .apply(tree, env)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use otherix_vm_runtime::config::AccelSetting;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

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
        let cfg = AgentConfig::parse(
            "server: {unix_socket: /s}\nruntime:\n  state_dir: /x\n  images:\n    fetch_allow: [10.8.0.0/16, mirror.internal]\n    fetch_deny: ['*.example.org']\n    allow_private_networks: true\n    max_redirects: 2\n    file_dir: /srv/images\n  qemu:\n    img_max_memory_mib: 1024\n    img_max_cpu_secs: 60\n    img_timeout_secs: 120\n",
        )
        .unwrap();
        let images = &cfg.runtime.images;
        assert_eq!(images.fetch_allow, vec!["10.8.0.0/16", "mirror.internal"]);
        assert_eq!(images.fetch_deny, vec!["*.example.org"]);
        assert!(images.allow_private_networks);
        assert_eq!(images.max_redirects, 2);
        assert_eq!(images.file_dir.as_deref(), Some(Path::new("/srv/images")));
        assert_eq!(cfg.runtime.qemu.img_max_memory_mib, 1024);
        assert_eq!(cfg.runtime.qemu.img_timeout_secs, 120);
        assert_eq!(cfg.server.listen, "0.0.0.0:9443");
        assert_eq!(cfg.heartbeat.interval_seconds, 30);
    }

    #[test]
    fn enrolment_keys_and_defaults() {
        let cfg = AgentConfig::parse(
            "bootstrap:\n  cp_url: https://cp:8443\n  token_path: /etc/otherix/bootstrap-token\n  ca_fingerprint: sha256:ab\n  node_name: n1\n  advertised_endpoint: 10.0.0.5:9443\nserver:\n  listen: 127.0.0.1:9555\nheartbeat:\n  interval_seconds: 15\ncapacity:\n  reserved_cpus: 1\n  max_memory_bytes: 1073741824\n",
        )
        .unwrap();
        assert_eq!(cfg.cert_dir(), PathBuf::from("/var/lib/otherix/certs"));
        assert_eq!(cfg.pool_root(), PathBuf::from("/var/lib/otherix/pools"));
        assert_eq!(cfg.capacity.max_memory_bytes, Some(1 << 30));
        assert_eq!(cfg.heartbeat.interval_seconds, 15);
        assert_eq!(
            cfg.bootstrap.token_source().unwrap(),
            Some(TokenSource::File("/etc/otherix/bootstrap-token".into()))
        );
        assert!(!format!("{cfg:?}").contains("token: Some(\""));
    }

    #[test]
    fn env_overrides() {
        let tree = parse_tree("bootstrap: {cp_url: https://a:1}\nserver: {unix_socket: /s}\n").unwrap();
        let cfg = AgentConfig::from_tree(
            tree,
            env(&[
                ("OTHERIX_BOOTSTRAP__CP_URL", "https://b:2"),
                ("OTHERIX_BOOTSTRAP__NODE_NAME", "123"),
                ("OTHERIX_BOOTSTRAP__TOKEN", "otx_join_x"),
                ("OTHERIX_HEARTBEAT__INTERVAL_SECONDS", "5"),
                ("OTHERIX_CAPACITY__MAX_CPUS", "1"),
                ("OTHERIX_TLS__CERT_DIR", "/c"),
                ("OTHERIX_SERVER__LISTEN", "not-the-agents"),
                ("OTHERIX_BOOTSTRAP_ADMIN_EMAIL", "not-config"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.bootstrap.cp_url.as_deref(), Some("https://b:2"));
        assert_eq!(cfg.bootstrap.node_name.as_deref(), Some("123"));
        assert_eq!(cfg.heartbeat.interval_seconds, 5);
        assert_eq!(cfg.capacity.max_cpus, Some(1));
        assert_eq!(cfg.cert_dir(), PathBuf::from("/c"));
        assert_eq!(cfg.server.listen, DEFAULT_LISTEN);
        assert_eq!(cfg.bootstrap.token_source().unwrap(), Some(TokenSource::Value("otx_join_x".into())));
        // Typos are refused, also from the environment.
        let tree = parse_tree("server: {unix_socket: /s}\n").unwrap();
        let err = AgentConfig::from_tree(tree, env(&[("OTHERIX_BOOTSTRAP__CP_ULR", "x")])).unwrap_err();
        assert!(err.to_string().contains("cp_ulr"), "{err}");
    }

    #[test]
    fn defaults_and_typos() {
        let cfg = AgentConfig::parse("server: {unix_socket: /s}\nruntime: {state_dir: /x}\n").unwrap();
        assert_eq!(cfg.runtime.images.allowed_schemes, vec!["https"]);
        // By default fetches reach neither private networks nor a file dir.
        assert!(cfg.runtime.images.fetch_allow.is_empty() && !cfg.runtime.images.allow_private_networks);
        assert!(cfg.runtime.images.file_dir.is_none());
        assert_eq!(cfg.runtime.qemu.accel, AccelSetting::Auto);
        assert_eq!(cfg.cert_dir(), PathBuf::from("/x/certs"));
        assert!(
            AgentConfig::parse("server: {unix_socket: /s}\nruntime: {state_dir: /x, qemu: {acel: kvm}}\n").is_err()
        );
        assert!(
            AgentConfig::parse("server: {unix_socket: /s}\nruntime: {state_dir: /x, qemu: {accel: hvf}}\n").is_err()
        );
        // Nothing to serve.
        assert!(AgentConfig::parse("runtime: {state_dir: /x}\n").is_err());
        // Two token sources.
        let err = AgentConfig::parse("bootstrap: {cp_url: https://a:1, token_path: /t, token_env: T}\n").unwrap_err();
        assert!(err.to_string().contains("only one"), "{err}");
        assert!(AgentConfig::parse("bootstrap: {cp_url: https://a:1}\nserver: {listen: nope}\n").is_err());
        assert!(AgentConfig::parse("bootstrap: {cp_url: https://a:1}\nheartbeat: {interval_seconds: 0}\n").is_err());
        assert!(AgentConfig::parse("bootstrap: {cp_url: https://a:1}\ntls: {cert_dir: rel}\n").is_err());
    }
}

//! The control plane's configuration: a YAML file (`--config`) with
//! `OTHERIX_` environment overrides, `__` separating nested keys
//! (`OTHERIX_SERVER__LISTEN=0.0.0.0:8080`). Every key is documented in
//! `deploy/config/api.example.yaml`. An invalid config names the offending key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use otherix_config::ConfigError;

fn key_err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::key(key, message)
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where runtime state lives (the embedded etcd data, pidfiles).
    pub state_dir: PathBuf,
    /// The user-facing listener.
    pub server: ServerConfig,
    /// The store.
    pub etcd: EtcdConfig,
    /// Logging.
    pub logger: LoggerConfig,
    /// Storage pool defaults.
    pub storage_pools: StoragePoolsConfig,
    /// Sessions, tokens and login limits.
    pub auth: AuthConfig,
    /// The agent listener: enrolment and heartbeats.
    pub agent_server: AgentServerConfig,
    /// The replica's server certificate, issued by the cluster CA.
    pub cp_cert: CpCertConfig,
    /// Node liveness and pressure.
    pub nodes: NodesConfig,
}

/// The agent listener (TLS; client certificates for heartbeats).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentServerConfig {
    /// Serve it at all.
    pub enabled: bool,
    /// Address to listen on.
    pub listen: String,
}

/// The replica's server certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpCertConfig {
    /// Names and addresses added to localhost, 127.0.0.1, the hostname and the listen addresses.
    pub additional_sans: Vec<String>,
    /// Validity of a newly issued certificate, in days.
    pub validity_days: u32,
}

/// Node liveness and pressure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodesConfig {
    /// How often agents report, in seconds (sent to them with each answer).
    pub heartbeat_interval_seconds: u32,
    /// A ready node without a report for this long becomes unreachable.
    pub stale_threshold_seconds: u32,
    /// An unreachable node becomes gone after this much more time.
    pub gone_grace_seconds: u32,
    /// Memory or system disk below this percentage free counts as pressure.
    pub pressure_threshold_percent: u32,
    /// Consecutive reports under pressure before the condition is set.
    pub pressure_consecutive_required: u32,
}

impl Default for AgentServerConfig {
    fn default() -> Self {
        AgentServerConfig { enabled: true, listen: "0.0.0.0:8443".into() }
    }
}

impl Default for CpCertConfig {
    fn default() -> Self {
        CpCertConfig { additional_sans: Vec::new(), validity_days: 365 }
    }
}

impl Default for NodesConfig {
    fn default() -> Self {
        NodesConfig {
            heartbeat_interval_seconds: 30,
            stale_threshold_seconds: 90,
            gone_grace_seconds: 300,
            pressure_threshold_percent: 10,
            pressure_consecutive_required: 3,
        }
    }
}

/// Sessions, tokens and login limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Lifetime of access tokens (JWT), in seconds.
    pub access_token_ttl_seconds: u64,
    /// Lifetime of a session's refresh token, in seconds; each refresh renews it.
    pub refresh_token_ttl_seconds: u64,
    /// Failed-login limits.
    pub login_rate_limit: LoginRateLimitConfig,
    /// Live (neither revoked nor expired) API tokens one user may hold.
    pub max_api_tokens_per_user: u32,
}

/// Failed-login limits (per replica).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoginRateLimitConfig {
    /// Failures per account within the window before attempts are refused;
    /// a source address may fail five times as often.
    pub max_failures: u32,
    /// The window, in seconds.
    pub window_seconds: u64,
    /// How many accounts and addresses are tracked at most.
    pub max_keys: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            access_token_ttl_seconds: 15 * 60,
            refresh_token_ttl_seconds: 30 * 24 * 3600,
            login_rate_limit: LoginRateLimitConfig::default(),
            max_api_tokens_per_user: 50,
        }
    }
}

impl Default for LoginRateLimitConfig {
    fn default() -> Self {
        LoginRateLimitConfig { max_failures: 10, window_seconds: 15 * 60, max_keys: 10_000 }
    }
}

/// The listener serving gRPC, grpc-web, REST and health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: String,
    /// TLS; absent serves plaintext (h2c for gRPC).
    pub tls: Option<TlsConfig>,
    /// Largest REST body and gRPC message accepted, in bytes.
    pub max_request_bytes: usize,
    /// Time limit of one REST call, in seconds.
    pub request_timeout_seconds: u64,
    /// How long shutdown waits for calls in flight, in seconds.
    pub shutdown_grace_seconds: u64,
    /// Cross-origin access for browser clients (grpc-web and REST).
    pub cors: CorsConfig,
}

/// Which web origins may call the API from a browser.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Allowed origins, `scheme://host[:port]`; the port may be `*` and the
    /// host may start with `*.`. Empty (the default) allows none.
    pub allowed_origins: Vec<String>,
}

/// A certificate and key in PEM files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain.
    pub cert_file: PathBuf,
    /// The private key.
    pub key_file: PathBuf,
}

/// The store: the control plane's own etcd member, or an external cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// External cluster endpoints; when set, no member is started.
    pub endpoints: Vec<String>,
    /// The etcd binary of the embedded member.
    pub binary: PathBuf,
    /// The member's name.
    pub name: String,
    /// The member's data dir; empty means `<state_dir>/etcd`.
    pub data_dir: PathBuf,
    /// The directory (mode 0700) holding the member's Unix sockets; empty
    /// means `<state_dir>/run/etcd`. The member opens no TCP port.
    pub socket_dir: PathBuf,
    /// Backend quota; past it etcd raises a NOSPACE alarm that `/readyz` shows.
    pub quota_backend_bytes: u64,
    /// Periodic auto-compaction retention, e.g. `1h`.
    pub auto_compaction_retention: String,
    /// Raft heartbeat interval in milliseconds.
    pub heartbeat_interval_ms: u32,
    /// Raft election timeout in milliseconds.
    pub election_timeout_ms: u32,
    /// Time limit of one store request, in seconds.
    pub request_timeout_seconds: u64,
    /// How long to wait for the member to become healthy, in seconds.
    pub start_timeout_seconds: u64,
    /// TLS towards an external cluster.
    pub tls: EtcdTlsConfig,
    /// etcd user of an external cluster with authentication on; empty: none.
    pub username: String,
    /// File holding that user's password (mode 0600 or stricter).
    pub password_file: PathBuf,
    /// Encryption of secrets stored in etcd (the cluster CA key, the signing keys).
    pub encryption: EtcdEncryptionConfig,
}

/// TLS towards an external etcd cluster (every endpoint `https://`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdTlsConfig {
    /// The CA that signed etcd's server certificates; required with `https://` endpoints.
    pub ca_file: PathBuf,
    /// Client certificate, for etcd's `--client-cert-auth`; empty: none.
    pub cert_file: PathBuf,
    /// The client certificate's private key.
    pub key_file: PathBuf,
}

/// The key that seals secrets stored in etcd, held outside etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdEncryptionConfig {
    /// The current key: 32 random bytes, mode 0600. Empty means
    /// `<state_dir>/secrets/etcd-encryption.key`, created on first start.
    pub key_file: PathBuf,
    /// Earlier keys, still read during a rotation; secrets sealed with them
    /// are sealed again with the current key at start.
    pub previous_key_files: Vec<PathBuf>,
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggerConfig {
    /// Filter, e.g. `info` or `otherix_api=debug,info`.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Text,
    /// JSON lines.
    Json,
}

/// Storage pool defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoragePoolsConfig {
    /// The pool made the cluster default on first boot; empty seeds nothing.
    pub default_pool_name: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("/var/lib/otherix/api"),
            server: ServerConfig::default(),
            etcd: EtcdConfig::default(),
            logger: LoggerConfig::default(),
            storage_pools: StoragePoolsConfig::default(),
            auth: AuthConfig::default(),
            agent_server: AgentServerConfig::default(),
            cp_cert: CpCertConfig::default(),
            nodes: NodesConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            tls: None,
            max_request_bytes: 1024 * 1024,
            request_timeout_seconds: 30,
            shutdown_grace_seconds: 10,
            cors: CorsConfig::default(),
        }
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            binary: PathBuf::from("etcd"),
            name: "otherix-api".into(),
            data_dir: PathBuf::new(),
            socket_dir: PathBuf::new(),
            quota_backend_bytes: 2 * 1024 * 1024 * 1024,
            auto_compaction_retention: "1h".into(),
            heartbeat_interval_ms: 100,
            election_timeout_ms: 1000,
            request_timeout_seconds: 5,
            start_timeout_seconds: 30,
            tls: EtcdTlsConfig::default(),
            username: String::new(),
            password_file: PathBuf::new(),
            encryption: EtcdEncryptionConfig::default(),
        }
    }
}

impl Default for LoggerConfig {
    fn default() -> Self {
        LoggerConfig { level: "info".into(), format: LogFormat::Text }
    }
}

impl Default for StoragePoolsConfig {
    fn default() -> Self {
        StoragePoolsConfig { default_pool_name: "default".into() }
    }
}

/// The prefix of environment overrides.
pub use otherix_config::ENV_PREFIX;

impl Config {
    /// Loads `path` (or the defaults when `None`) and applies overrides from `env`.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut tree = match path {
            Some(p) => otherix_config::read_tree(p)?,
            None => Value::Object(Map::new()),
        };
        otherix_config::Overlay::of_defaults(&Config::default()).apply(&mut tree, env)?;
        let config: Config = otherix_config::deserialize(tree)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if let Some(tls) = &self.server.tls {
            for (key, file) in [("server.tls.cert_file", &tls.cert_file), ("server.tls.key_file", &tls.key_file)] {
                if !file.is_file() {
                    return Err(key_err(key, format!("{} is not a readable file", file.display())));
                }
            }
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.server.max_request_bytes) {
            return Err(key_err("server.max_request_bytes", "must be between 1024 and 67108864"));
        }
        if let Err(e) = otherix_gateway::cors::Cors::new(&self.server.cors.allowed_origins) {
            return Err(key_err("server.cors.allowed_origins", e.to_string()));
        }
        if self.server.request_timeout_seconds == 0 {
            return Err(key_err("server.request_timeout_seconds", "must be at least 1"));
        }
        for (i, e) in self.etcd.endpoints.iter().enumerate() {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() < 10 {
                return Err(key_err(&format!("etcd.endpoints[{i}]"), format!("{e:?} is not an http(s) URL")));
            }
        }
        self.validate_etcd_access()?;
        if self.etcd.endpoints.is_empty() {
            if self.etcd.name.is_empty() || !self.etcd.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(key_err("etcd.name", "must be letters, digits and '-'"));
            }
            if self.etcd.quota_backend_bytes < 64 * 1024 * 1024 {
                return Err(key_err("etcd.quota_backend_bytes", "must be at least 64 MiB"));
            }
            if self.etcd.heartbeat_interval_ms == 0
                || self.etcd.election_timeout_ms < 5 * self.etcd.heartbeat_interval_ms
            {
                return Err(key_err("etcd.election_timeout_ms", "must be at least five heartbeat intervals"));
            }
        }
        if self.etcd.request_timeout_seconds == 0 {
            return Err(key_err("etcd.request_timeout_seconds", "must be at least 1"));
        }
        if tracing_subscriber_filter_ok(&self.logger.level).is_err() {
            return Err(key_err("logger.level", format!("{:?} is not a log filter", self.logger.level)));
        }
        if !(60..=24 * 3600).contains(&self.auth.access_token_ttl_seconds) {
            return Err(key_err("auth.access_token_ttl_seconds", "must be between 60 and 86400"));
        }
        if self.auth.refresh_token_ttl_seconds < self.auth.access_token_ttl_seconds {
            return Err(key_err("auth.refresh_token_ttl_seconds", "must be at least the access token lifetime"));
        }
        if self.auth.login_rate_limit.max_failures == 0 || self.auth.login_rate_limit.window_seconds == 0 {
            return Err(key_err("auth.login_rate_limit", "max_failures and window_seconds must be at least 1"));
        }
        if self.auth.max_api_tokens_per_user == 0 {
            return Err(key_err("auth.max_api_tokens_per_user", "must be at least 1"));
        }
        if self.agent_server.enabled {
            self.agent_listen_addr()?;
        }
        if self.cp_cert.validity_days == 0 {
            return Err(key_err("cp_cert.validity_days", "must be at least 1"));
        }
        let n = &self.nodes;
        if n.heartbeat_interval_seconds == 0 || n.stale_threshold_seconds < 2 * n.heartbeat_interval_seconds {
            return Err(key_err("nodes.stale_threshold_seconds", "must be at least two heartbeat intervals"));
        }
        if n.pressure_threshold_percent > 100 || n.pressure_consecutive_required == 0 {
            return Err(key_err(
                "nodes.pressure_threshold_percent",
                "a percentage, with at least one consecutive report",
            ));
        }
        let pool = &self.storage_pools.default_pool_name;
        if !pool.is_empty() && !crate::names::is_label(pool) {
            return Err(key_err(
                "storage_pools.default_pool_name",
                format!("{pool:?} is not a lowercase RFC 1123 label"),
            ));
        }
        Ok(())
    }

    /// The parsed listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server
            .listen
            .parse()
            .map_err(|_| key_err("server.listen", format!("{:?} is not an address:port", self.server.listen)))
    }

    /// The parsed agent listener address.
    pub fn agent_listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.agent_server.listen.parse().map_err(|_| {
            key_err("agent_server.listen", format!("{:?} is not an address:port", self.agent_server.listen))
        })
    }

    /// The embedded member's data dir.
    pub fn etcd_data_dir(&self) -> PathBuf {
        if self.etcd.data_dir.as_os_str().is_empty() { self.state_dir.join("etcd") } else { self.etcd.data_dir.clone() }
    }

    /// The embedded member's socket directory.
    pub fn etcd_socket_dir(&self) -> PathBuf {
        if self.etcd.socket_dir.as_os_str().is_empty() {
            self.state_dir.join("run").join("etcd")
        } else {
            self.etcd.socket_dir.clone()
        }
    }

    /// The file holding the current secrets-at-rest key.
    pub fn etcd_encryption_key_file(&self) -> PathBuf {
        let k = &self.etcd.encryption.key_file;
        if k.as_os_str().is_empty() { self.state_dir.join("secrets").join("etcd-encryption.key") } else { k.clone() }
    }

    /// TLS, credentials and endpoints of an external cluster: consistent, and
    /// the files there.
    fn validate_etcd_access(&self) -> Result<(), ConfigError> {
        let e = &self.etcd;
        let external = !e.endpoints.is_empty();
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        let only_external = "applies to an external etcd only (set etcd.endpoints)";
        for (key, file) in [
            ("etcd.tls.ca_file", &e.tls.ca_file),
            ("etcd.tls.cert_file", &e.tls.cert_file),
            ("etcd.tls.key_file", &e.tls.key_file),
        ] {
            if set(file) {
                if !external {
                    return Err(key_err(key, only_external));
                }
                if !file.is_file() {
                    return Err(key_err(key, format!("{} is not a readable file", file.display())));
                }
            }
        }
        if set(&e.tls.cert_file) != set(&e.tls.key_file) {
            return Err(key_err("etcd.tls.key_file", "cert_file and key_file go together"));
        }
        if set(&e.tls.key_file) {
            secret_file_mode("etcd.tls.key_file", &e.tls.key_file)?;
        }
        let tls = set(&e.tls.ca_file);
        if set(&e.tls.cert_file) && !tls {
            return Err(key_err("etcd.tls.ca_file", "a client certificate needs the CA of etcd's server certificates"));
        }
        for (i, url) in e.endpoints.iter().enumerate() {
            let https = url.starts_with("https://");
            if https != tls {
                let msg = if https {
                    "an https:// endpoint needs etcd.tls.ca_file"
                } else {
                    "with etcd.tls.ca_file set every endpoint must be https://"
                };
                return Err(key_err(&format!("etcd.endpoints[{i}]"), msg));
            }
        }
        if e.username.is_empty() == set(&e.password_file) {
            return Err(key_err("etcd.password_file", "username and password_file go together"));
        }
        if !e.username.is_empty() {
            if !external {
                return Err(key_err("etcd.username", only_external));
            }
            if !e.password_file.is_file() {
                return Err(key_err(
                    "etcd.password_file",
                    format!("{} is not a readable file", e.password_file.display()),
                ));
            }
            secret_file_mode("etcd.password_file", &e.password_file)?;
        }
        Ok(())
    }
}

/// Refuses a secret file that other users can read or write.
fn secret_file_mode(key: &str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let mode =
        std::fs::metadata(path).map_err(|e| key_err(key, format!("{}: {e}", path.display())))?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(key_err(
            key,
            format!("{} is accessible to other users (mode {:o}); chmod 600 it", path.display(), mode & 0o777),
        ));
    }
    Ok(())
}

fn tracing_subscriber_filter_ok(level: &str) -> Result<(), ()> {
    // A log filter is a comma-separated list of `target=level` or `level`.
    let ok = level.split(',').filter(|d| !d.is_empty()).all(|directive| {
        let lvl = directive.rsplit('=').next().unwrap_or("");
        matches!(lvl.to_ascii_lowercase().as_str(), "trace" | "debug" | "info" | "warn" | "error" | "off")
            || (!directive.contains('=')
                && directive.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'))
    });
    if ok && !level.is_empty() { Ok(()) } else { Err(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!(c.server.max_request_bytes, 1024 * 1024);
        assert_eq!(c.storage_pools.default_pool_name, "default");
    }

    #[test]
    fn yaml_and_env_overrides_nest_with_double_underscore() {
        let f = file("server:\n  listen: 127.0.0.1:9000\netcd:\n  request_timeout_seconds: 7\n");
        let c = Config::load(
            Some(f.path()),
            env(&[
                ("OTHERIX_SERVER__LISTEN", "127.0.0.1:9100"),
                ("OTHERIX_ETCD__ENDPOINTS", "[http://10.0.0.1:2379, http://10.0.0.2:2379]"),
                ("OTHERIX_LOGGER__FORMAT", "json"),
                ("OTHERIX_API_TOKEN", "not-config"),
                ("OTHERIX_BOOTSTRAP_ADMIN_EMAIL", "admin@example.com"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9100");
        assert_eq!(c.etcd.request_timeout_seconds, 7);
        assert_eq!(c.etcd.endpoints.len(), 2);
        assert_eq!(c.logger.format, LogFormat::Json);
    }

    #[test]
    fn errors_name_the_offending_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("server:\n  listne: x\n", &[], "server"),
            ("server:\n  listen: nowhere\n", &[], "server.listen"),
            ("etcd:\n  request_timeout_seconds: lots\n", &[], "etcd.request_timeout_seconds"),
            ("etcd:\n  client_port: 2379\n", &[], "etcd"),
            ("etcd:\n  username: otherix\n", &[], "etcd.password_file"),
            ("etcd:\n  tls:\n    ca_file: /nonexistent.pem\n", &[], "etcd.tls.ca_file"),
            ("", &[("OTHERIX_ETCD__ENDPOINTS", "[https://10.0.0.1:2379]")], "etcd.endpoints[0]"),
            ("logger:\n  format: xml\n", &[], "logger.format"),
            ("", &[("OTHERIX_SERVER__MAX_REQUEST_BYTES", "12")], "server.max_request_bytes"),
            ("", &[("OTHERIX_ETCD__ENDPOINTS", "[ftp://x]")], "etcd.endpoints[0]"),
            ("", &[("OTHERIX_SERVER__CORS__ALLOWED_ORIGINS", "[localhost:3000]")], "server.cors.allowed_origins"),
            ("", &[("OTHERIX_STORAGE_POOLS__DEFAULT_POOL_NAME", "Bad_Name")], "storage_pools.default_pool_name"),
            ("", &[("OTHERIX_SERVER__NOPE", "1")], "server"),
            (
                "server:\n  tls:\n    cert_file: /nonexistent.crt\n    key_file: /nonexistent.key\n",
                &[],
                "server.tls.cert_file",
            ),
        ];
        for (yaml, vars, key) in cases {
            let f = file(yaml);
            let err = Config::load(Some(f.path()), env(vars)).unwrap_err();
            let ConfigError::Key { key: got, message } = &err else { panic!("{yaml:?}: {err}") };
            assert!(got.starts_with(key), "{yaml:?} {vars:?}: named {got:?} ({message}), want {key:?}");
        }
    }

    fn key_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Object(m) = v {
            for (k, child) in m {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                out.push(path.clone());
                key_paths(child, &path, out);
            }
        }
    }

    #[test]
    fn the_example_config_documents_every_key() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/config/api.example.yaml"))
                .unwrap();
        let example: Value = yaml_serde::from_str(&text).unwrap();
        let parsed: Config = otherix_config::deserialize(example.clone()).unwrap();
        assert!(parsed.server.tls.is_some());
        let (mut documented, mut known) = (Vec::new(), Vec::new());
        key_paths(&example, "", &mut documented);
        key_paths(&serde_json::to_value(Config::default()).unwrap(), "", &mut known);
        known.extend(["server.tls.cert_file".to_owned(), "server.tls.key_file".to_owned()]);
        documented.sort();
        known.sort();
        assert_eq!(documented, known);
    }

    #[test]
    fn the_dev_config_is_valid() {
        let dev = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../dev/config/api.yaml"));
        let c = Config::load(Some(dev), Vec::new()).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.etcd_data_dir(), PathBuf::from(".local/etcd"));
    }

    #[test]
    fn external_etcd_tls_and_credentials_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = |name: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, "x").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p.display().to_string()
        };
        let (ca, cert, key, pw) = (f("ca.pem", 0o644), f("c.pem", 0o644), f("c.key", 0o600), f("pw", 0o600));
        let loose = f("loose", 0o644);
        let base = format!(
            "etcd:\n  endpoints: [https://10.0.0.1:2379]\n  tls:\n    ca_file: {ca}\n    cert_file: {cert}\n    key_file: {key}\n  username: otherix\n  password_file: {pw}\n"
        );
        let c = Config::load(Some(file(&base).path()), Vec::new()).unwrap();
        assert_eq!(c.etcd.username, "otherix");
        // The password is not in the config, so not in its Debug either.
        assert!(!format!("{c:?}").contains("hunter"));
        let cases: &[(String, &str)] = &[
            (base.replace(&pw, &loose), "etcd.password_file"),
            (base.replace(&key, &loose), "etcd.tls.key_file"),
            (base.replace(&format!("    key_file: {key}\n"), ""), "etcd.tls.key_file"),
            (base.replace("https://", "http://"), "etcd.endpoints[0]"),
            (base.replace("  endpoints: [https://10.0.0.1:2379]\n", ""), "etcd.tls.ca_file"),
        ];
        for (yaml, want) in cases {
            let err = Config::load(Some(file(yaml).path()), Vec::new()).unwrap_err();
            let ConfigError::Key { key: got, message } = &err else { panic!("{yaml}: {err}") };
            assert_eq!(got, want, "{yaml}: {message}");
        }
    }

    #[test]
    fn yaml_syntax_errors_are_reported() {
        let f = file("server: [unclosed\n");
        assert!(matches!(Config::load(Some(f.path()), Vec::new()), Err(ConfigError::Syntax { .. })));
    }
}

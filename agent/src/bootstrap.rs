//! `otherix-agent bootstrap`'s config: flags over `OTHERIX_BOOTSTRAP__*` (and the other
//! overridable sections) over an existing config file, and the agent config it writes for
//! `serve`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Map, Value};
use tracing::{info, warn};

use crate::config::{AgentConfig, DEFAULT_STATE_DIR, apply_env, read_tree, set_key};

/// Mode of the written agent config.
pub const CONFIG_MODE: u32 = 0o600;

/// The bootstrap command line: every field overrides the environment and the file.
#[derive(Debug, Clone, Default)]
pub struct BootstrapFlags {
    /// `--cp-url`.
    pub cp_url: Option<String>,
    /// `--token`: never written to the config.
    pub token: Option<String>,
    /// `--token-path`.
    pub token_path: Option<PathBuf>,
    /// `--token-env`.
    pub token_env: Option<String>,
    /// `--ca-fingerprint`.
    pub ca_fingerprint: Option<String>,
    /// `--node-name`.
    pub node_name: Option<String>,
    /// `--advertised-endpoint`.
    pub advertised_endpoint: Option<String>,
    /// `--cert-dir`.
    pub cert_dir: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--pool-root`.
    pub pool_root: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<String>,
}

/// Paths go into the written config as absolute paths, so `serve` runs with
/// it from any working directory.
fn path_value(p: &Path) -> Value {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    Value::String(abs.display().to_string())
}

fn get<'a>(tree: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(tree, |node, seg| node.get(seg)).filter(|v| !v.is_null())
}

/// This host's name as a node name: the first label of the host name, lowercased.
pub fn default_node_name() -> String {
    let uname = rustix::system::uname();
    let host = uname.nodename().to_string_lossy();
    host.split('.').next().unwrap_or_default().to_ascii_lowercase()
}

/// The advertised endpoint when none is given: the listen address when it names a host,
/// else this host's name with the listen port.
pub fn default_advertised_endpoint(listen: &std::net::SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        let uname = rustix::system::uname();
        format!("{}:{}", uname.nodename().to_string_lossy(), listen.port())
    } else {
        listen.to_string()
    }
}

/// Builds the effective config for `bootstrap`: the file at `config_path` when it exists,
/// then `env`, then `flags`, with the node name and advertised endpoint defaulted. Returns the
/// config and the tree to write as the agent config (without a literal token).
pub fn bootstrap_config(
    config_path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    flags: &BootstrapFlags,
) -> anyhow::Result<(AgentConfig, Value)> {
    let mut tree = if config_path.exists() { read_tree(config_path)? } else { Value::Object(Map::new()) };
    apply_env(&mut tree, env)?;
    let token_flag = flags.token.is_some() || flags.token_path.is_some() || flags.token_env.is_some();
    if token_flag && let Some(b) = tree.get_mut("bootstrap").and_then(Value::as_object_mut) {
        // One token source: the flag's.
        for k in ["token", "token_path", "token_env"] {
            b.remove(k);
        }
    }
    let s = |v: &Option<String>| v.as_ref().map(|s| Value::String(s.clone()));
    let p = |v: &Option<PathBuf>| v.as_deref().map(path_value);
    let sets: [(&[&str], Option<Value>); 11] = [
        (&["bootstrap", "cp_url"], s(&flags.cp_url)),
        (&["bootstrap", "token"], s(&flags.token)),
        (&["bootstrap", "token_path"], p(&flags.token_path)),
        (&["bootstrap", "token_env"], s(&flags.token_env)),
        (&["bootstrap", "ca_fingerprint"], s(&flags.ca_fingerprint)),
        (&["bootstrap", "node_name"], s(&flags.node_name)),
        (&["bootstrap", "advertised_endpoint"], s(&flags.advertised_endpoint)),
        (&["tls", "cert_dir"], p(&flags.cert_dir)),
        (&["runtime", "state_dir"], p(&flags.state_dir)),
        (&["storage", "pool_root"], p(&flags.pool_root)),
        (&["server", "listen"], s(&flags.listen)),
    ];
    for (path, value) in sets {
        if let Some(v) = value {
            set_key(&mut tree, path, v)?;
        }
    }
    if get(&tree, &["bootstrap", "cp_url"]).is_none() {
        bail!("bootstrap: no control plane URL: pass --cp-url or set OTHERIX_BOOTSTRAP__CP_URL");
    }
    if get(&tree, &["runtime", "state_dir"]).is_none() {
        set_key(&mut tree, &["runtime", "state_dir"], Value::String(DEFAULT_STATE_DIR.into()))?;
    }
    let cfg = AgentConfig::from_tree(tree.clone(), std::iter::empty())?;
    if cfg.bootstrap.node_name.is_none() {
        set_key(&mut tree, &["bootstrap", "node_name"], Value::String(default_node_name()))?;
    }
    if cfg.bootstrap.advertised_endpoint.is_none() {
        let ep = default_advertised_endpoint(&cfg.server.listen_addr()?);
        set_key(&mut tree, &["bootstrap", "advertised_endpoint"], Value::String(ep))?;
    }
    let cfg = AgentConfig::from_tree(tree.clone(), std::iter::empty())?;
    if let Some(b) = tree.get_mut("bootstrap").and_then(Value::as_object_mut) {
        b.remove("token");
    }
    Ok((cfg, tree))
}

/// The agent config text for a tree.
pub fn render_config(tree: &Value) -> anyhow::Result<String> {
    let body = yaml_serde::to_string(tree).context("render the agent config")?;
    Ok(format!(
        "# The otherix-agent config, written by `otherix-agent bootstrap`.\n\
         # Run: otherix-agent serve --config <this file>. Keys: docs/agent.md.\n{body}"
    ))
}

/// Writes the agent config atomically (mode 0600) unless the file exists and `force` is off.
/// Returns whether it was written. Blocking.
pub fn write_agent_config(path: &Path, tree: &Value, force: bool) -> anyhow::Result<bool> {
    let text = render_config(tree)?;
    // What is written must be what `serve` accepts.
    AgentConfig::from_tree(crate::config::parse_tree(&text)?, std::iter::empty())
        .context("the generated agent config does not load")?;
    if path.exists() && !force {
        let same = read_tree(path).is_ok_and(|existing| &existing == tree);
        if same {
            info!(path = %path.display(), "agent config exists; left as is");
        } else {
            warn!(path = %path.display(), "agent config exists and differs from these bootstrap settings; left as is (--force rewrites it)");
        }
        return Ok(false);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    otherix_files::write_file_atomic(path, text.as_bytes(), CONFIG_MODE)
        .with_context(|| format!("write the agent config {}", path.display()))?;
    info!(path = %path.display(), "agent config written");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn flags_over_env_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(
            &path,
            "bootstrap:\n  cp_url: https://file:1\n  token_path: /file-token\ncapacity:\n  max_cpus: 1\n",
        )
        .unwrap();
        let flags = BootstrapFlags {
            token: Some("otx_join_secret".into()),
            node_name: Some("n1".into()),
            listen: Some("127.0.0.1:9555".into()),
            state_dir: Some(dir.path().join("state")),
            ..Default::default()
        };
        let (cfg, tree) = bootstrap_config(
            &path,
            env(&[("OTHERIX_BOOTSTRAP__CP_URL", "https://env:2"), ("OTHERIX_BOOTSTRAP__CA_FINGERPRINT", "sha256:ab")]),
            &flags,
        )
        .unwrap();
        assert_eq!(cfg.bootstrap.cp_url.as_deref(), Some("https://env:2"));
        assert_eq!(cfg.bootstrap.node_name.as_deref(), Some("n1"));
        assert_eq!(cfg.bootstrap.advertised_endpoint.as_deref(), Some("127.0.0.1:9555"));
        assert_eq!(cfg.capacity.max_cpus, Some(1));
        // The flag's token replaced the file's token path, and is never written.
        assert_eq!(
            cfg.bootstrap.token_source().unwrap(),
            Some(otherix_agent_enrolment::TokenSource::Value("otx_join_secret".into()))
        );
        let text = render_config(&tree).unwrap();
        assert!(!text.contains("otx_join_secret") && !text.contains("token_path"), "{text}");
        // Written only when absent, unless forced; what is written loads as is.
        assert!(!write_agent_config(&path, &tree, false).unwrap());
        assert!(write_agent_config(&path, &tree, true).unwrap());
        let written = AgentConfig::load(&path).unwrap();
        assert_eq!(written.server.listen, "127.0.0.1:9555");
        assert_eq!(written.cert_dir(), dir.path().join("state/certs"));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn needs_a_control_plane() {
        let dir = tempfile::tempdir().unwrap();
        let err = bootstrap_config(&dir.path().join("none.yaml"), env(&[]), &BootstrapFlags::default()).unwrap_err();
        assert!(err.to_string().contains("--cp-url"), "{err}");
        let (cfg, _) = bootstrap_config(
            &dir.path().join("none.yaml"),
            env(&[]),
            &BootstrapFlags { cp_url: Some("https://cp:8443".into()), ..Default::default() },
        )
        .unwrap();
        assert_eq!(cfg.cert_dir(), PathBuf::from("/var/lib/otherix/certs"));
        assert!(cfg.bootstrap.advertised_endpoint.unwrap().ends_with(":9443"));
        assert!(!cfg.bootstrap.node_name.unwrap().is_empty());
    }
}

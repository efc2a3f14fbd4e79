//! How this replica reaches etcd: the embedded member's Unix socket, or an
//! external cluster with the TLS files and credentials the config names.

use std::time::Duration;

use otherix_etcd_member::{ClientEndpoint, Member};
use otherix_store::{ConnectConfig, Credentials, TlsMaterial};

use crate::config::{Config, ConfigError};

fn read(key: &str, path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::key(key, format!("cannot read {}: {e}", path.display())))
}

/// The store's connect options: the member's endpoint when one runs,
/// otherwise `etcd.endpoints` with `etcd.tls` and `etcd.username`.
pub fn connect_config(config: &Config, member: Option<&Member>) -> Result<ConnectConfig, ConfigError> {
    let e = &config.etcd;
    let timeout = Duration::from_secs(e.request_timeout_seconds);
    if let Some(m) = member {
        return Ok(match m.client_endpoint() {
            ClientEndpoint::Unix(socket) => ConnectConfig::unix(socket, timeout),
            ClientEndpoint::Http(url) => ConnectConfig::urls(&[url], timeout),
        });
    }
    let mut cc = ConnectConfig::urls(&e.endpoints, timeout);
    if !e.tls.ca_file.as_os_str().is_empty() {
        let client = if e.tls.cert_file.as_os_str().is_empty() {
            None
        } else {
            Some((read("etcd.tls.cert_file", &e.tls.cert_file)?, read("etcd.tls.key_file", &e.tls.key_file)?))
        };
        cc.tls = Some(TlsMaterial { ca_pem: read("etcd.tls.ca_file", &e.tls.ca_file)?, client, domain: None });
    }
    if !e.username.is_empty() {
        let raw = read("etcd.password_file", &e.password_file)?;
        let password = String::from_utf8(raw)
            .map_err(|_| ConfigError::key("etcd.password_file", "the password is not UTF-8"))?
            .trim_end_matches(['\r', '\n'])
            .to_owned();
        if password.is_empty() {
            return Err(ConfigError::key("etcd.password_file", "the file is empty"));
        }
        cc.credentials = Some(Credentials { user: e.username.clone(), password });
    }
    Ok(cc)
}

//! How the store reaches etcd: the embedded member's Unix socket, or an
//! external cluster over http(s) with optional TLS client certificates and
//! etcd user/password authentication.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// Where etcd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `http://` or `https://` URLs of an external cluster (or a test member).
    Urls(Vec<String>),
    /// The Unix socket of the control plane's own member.
    Unix(PathBuf),
}

/// TLS towards an external cluster, as PEM bytes.
#[derive(Clone, Default)]
pub struct TlsMaterial {
    /// The CA that signed etcd's server certificates.
    pub ca_pem: Vec<u8>,
    /// The client certificate and its private key, for `--client-cert-auth`.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to check in etcd's certificate when it differs from the URL's host.
    pub domain: Option<String>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("client_certificate", &self.client.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

/// An etcd user and its password.
#[derive(Clone)]
pub struct Credentials {
    /// The etcd user.
    pub user: String,
    /// Its password (never in `Debug`).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"<redacted>").finish()
    }
}

/// Everything [`crate::Store::connect_with`] needs.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// Where etcd is.
    pub target: Target,
    /// TLS (only with `https://` URLs).
    pub tls: Option<TlsMaterial>,
    /// etcd authentication; the token is renewed when it expires.
    pub credentials: Option<Credentials>,
    /// Time limit of one request.
    pub request_timeout: Duration,
    /// Time limit of opening a connection.
    pub connect_timeout: Duration,
}

impl ConnectConfig {
    /// Plain URLs, no TLS, no authentication.
    pub fn urls(endpoints: &[String], request_timeout: Duration) -> ConnectConfig {
        ConnectConfig {
            target: Target::Urls(endpoints.to_vec()),
            tls: None,
            credentials: None,
            request_timeout,
            connect_timeout: Duration::from_secs(3),
        }
    }

    /// The embedded member's Unix socket.
    pub fn unix(socket: PathBuf, request_timeout: Duration) -> ConnectConfig {
        ConnectConfig { target: Target::Unix(socket), ..ConnectConfig::urls(&[], request_timeout) }
    }
}

const KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));

/// Builds the etcd client. Without credentials nothing is sent before the
/// first request; with them, etcd-client authenticates at once.
pub(crate) async fn client(cfg: &ConnectConfig) -> Result<Client, etcd_client::Error> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(cfg.connect_timeout)
        .with_timeout(cfg.request_timeout)
        .with_keep_alive(KEEP_ALIVE.0, KEEP_ALIVE.1);
    if let Some(c) = &cfg.credentials {
        // etcd's simple tokens expire (5 min by default): renew on demand.
        opts = opts.with_user(c.user.clone(), c.password.clone()).with_auto_token_refresh(true);
    }
    if let Some(t) = &cfg.tls {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(&t.ca_pem));
        if let Some((cert, key)) = &t.client {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &t.domain {
            tls = tls.domain_name(d.clone());
        }
        opts = opts.with_tls(tls);
    }
    match &cfg.target {
        Target::Urls(urls) => Client::connect(urls, Some(opts)).await,
        Target::Unix(path) => {
            // The URL only fills the HTTP/2 :authority; the connector decides where to go.
            let endpoint = tonic::transport::Endpoint::from_static("http://localhost")
                .connect_timeout(cfg.connect_timeout)
                .timeout(cfg.request_timeout)
                .http2_keep_alive_interval(KEEP_ALIVE.0)
                .keep_alive_timeout(KEEP_ALIVE.1);
            let path = path.clone();
            let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                }
            }));
            Client::from_channel(etcd_client::Channel::Tonic(channel), Some(opts)).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug() {
        let c = Credentials { user: "otherix".into(), password: "hunter2-very-secret".into() };
        let t = TlsMaterial {
            ca_pem: b"ca".to_vec(),
            client: Some((b"cert".to_vec(), b"-----BEGIN PRIVATE KEY----- secret".to_vec())),
            domain: None,
        };
        let cfg =
            ConnectConfig { tls: Some(t), credentials: Some(c), ..ConnectConfig::urls(&[], Duration::from_secs(1)) };
        let shown = format!("{cfg:?}");
        assert!(shown.contains("otherix"), "{shown}");
        assert!(!shown.contains("hunter2") && !shown.contains("PRIVATE KEY"), "{shown}");
    }
}

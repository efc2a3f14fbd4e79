//! The errors of bootstrap and of loading the agent's certificate material.

use std::path::PathBuf;

use otherix_errors::ErrorCode;

/// Why bootstrap (or loading the cert material for `serve`) failed. The `Display` forms are
/// the log lines the seed's troubleshooting table names.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// An input is missing or malformed (URL, fingerprint, node name, token, architecture).
    #[error("bootstrap: invalid configuration: {0}")]
    Config(String),

    /// The CA the control plane served is not the one the operator pinned.
    #[error("bootstrap: CA fingerprint mismatch (expected {expected} got {got})")]
    FingerprintMismatch {
        /// The pinned fingerprint, `sha256:<hex>`.
        expected: String,
        /// The fingerprint of the CA the control plane served, `sha256:<hex>`.
        got: String,
    },

    /// Exactly one of the agent certificate and key exists.
    #[error(
        "partial bootstrap state: {present_kind} {} exists but {missing_kind} {} missing; \
         delete {}, {} and {}, mint a fresh join token and bootstrap again",
        present.display(), missing.display(), present.display(), missing.display(), ca.display()
    )]
    PartialState {
        /// `cert` or `key`: which one exists.
        present_kind: &'static str,
        /// The path that exists.
        present: PathBuf,
        /// `key` or `cert`: which one is missing.
        missing_kind: &'static str,
        /// The path that is missing.
        missing: PathBuf,
        /// The CA path (`ca.crt`), also to delete.
        ca: PathBuf,
    },

    /// The control plane could not be reached or spoke nonsense (`fetch /v1/ca: ...`,
    /// `join: ...`).
    #[error("bootstrap protocol: {0}")]
    Protocol(String),

    /// The server at `bootstrap.cp_url` presented a certificate from the cluster CA that is
    /// not the control plane's (a node's, for instance): the join token was not sent.
    #[error("bootstrap: the server at {cp} is {identity}; the join token was not sent to it")]
    NotControlPlane {
        /// The control plane URL.
        cp: String,
        /// What the certificate was instead.
        identity: otherix_pki::IdentityError,
    },

    /// The control plane refused the join with a documented code.
    #[error("bootstrap protocol: CSR submission rejected by CP: HTTP {http_status} {}{}", code.as_str(), fmt_message(message))]
    JoinRejected {
        /// The documented error code (`token_expired`, `token_exhausted`, `token_invalid`,
        /// `validation_failed`, `conflict`, ...).
        code: ErrorCode,
        /// The HTTP status the code maps to.
        http_status: u16,
        /// The control plane's message.
        message: String,
    },

    /// The certificate the control plane returned is not acceptable (does not chain to the
    /// pinned CA, names another node, does not match our key).
    #[error("bootstrap: the certificate returned by the control plane is unacceptable: {0}")]
    BadCertificate(String),

    /// The cert material on disk is unusable (unparseable, key does not match, does not chain).
    #[error(
        "agent cert material in {} is invalid: {reason}; bootstrap again with --force and a fresh join token",
        dir.display()
    )]
    InvalidMaterial {
        /// The cert directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A file system operation failed.
    #[error("bootstrap: {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },

    /// A PKI operation failed (key generation, certificate parsing).
    #[error("bootstrap: {0}")]
    Pki(#[from] otherix_pki::PkiError),

    /// Writing the cert material failed (directory, atomic write).
    #[error("bootstrap: writing the cert material")]
    File(#[from] otherix_files::FileError),
}

fn fmt_message(m: &str) -> String {
    if m.is_empty() { String::new() } else { format!(" ({m})") }
}

impl BootstrapError {
    /// The documented code when the control plane refused the join.
    pub fn rejection_code(&self) -> Option<ErrorCode> {
        match self {
            BootstrapError::JoinRejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Renders an error with its whole `source()` chain, `a: b: c`, skipping parts already said.
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    extend_chain(err.to_string(), err.source())
}

/// Appends the messages of `source` and its sources to `out`, skipping parts already said.
pub(crate) fn extend_chain(mut out: String, source: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut cur = source;
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// The identity refusal inside a failed TLS connection, if that is why it failed: a peer
/// certificate that chains to the CA but is not the identity the connection requires.
pub(crate) fn identity_refusal(err: &(dyn std::error::Error + 'static)) -> Option<otherix_pki::IdentityError> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|i| i.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) = tls
            && let Some(id) = other.0.downcast_ref::<otherix_pki::IdentityError>()
        {
            return Some(id.clone());
        }
        cur = e.source();
    }
    None
}

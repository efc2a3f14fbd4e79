//! Error types of the PKI crate.

use std::path::PathBuf;

/// Errors from CA handling, certificate issuing, the disk cache and rustls configuration.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Key generation failed.
    #[error("key generation failed: {0}")]
    KeyGen(String),
    /// Building or signing a certificate failed.
    #[error("certificate signing failed: {0}")]
    Sign(String),
    /// The PEM input could not be decoded or holds no object of the expected kind.
    #[error("invalid PEM: {0}")]
    Pem(String),
    /// The certificate could not be parsed.
    #[error("invalid certificate: {0}")]
    Certificate(String),
    /// The private key could not be parsed or is of an unsupported type.
    #[error("invalid private key: {0}")]
    Key(String),
    /// The private key does not belong to the certificate.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// The certificate is not a CA certificate (basic constraints, key usage).
    #[error("not a CA certificate: {0}")]
    NotCa(&'static str),
    /// A subject alternative name is neither an IP address nor a valid DNS name.
    #[error("invalid subject alternative name {name:?}: {reason}")]
    InvalidSan {
        /// The name as given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A node name failed validation.
    #[error(transparent)]
    InvalidNodeName(#[from] NodeNameError),
    /// A file system operation failed.
    #[error("{}", path.display())]
    Io {
        /// The path the operation was on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An atomic file write failed.
    #[error(transparent)]
    File(#[from] otherix_files::FileError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
}

/// Why a peer's certificate (already parsed, chain checked separately) is not the identity a
/// connection requires. Carried inside the rustls error of the refused handshake.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The peer had to be the control plane.
    #[error(
        "not the control plane: {found} lacks the control-plane identity ({uri})",
        uri = crate::names::CP_IDENTITY_URI
    )]
    NotControlPlane {
        /// What the certificate is instead.
        found: String,
    },
    /// The peer had to be a node.
    #[error("not a node: {found}")]
    NotNode {
        /// What the certificate is instead.
        found: String,
    },
    /// The peer had to be one particular node.
    #[error("the certificate names node {found:?}, not {expected:?}")]
    WrongNode {
        /// The node that was meant.
        expected: String,
        /// The node the certificate names.
        found: String,
    },
}

// rustls renders the cause of a refused certificate with `Debug`: make that the message.
impl std::fmt::Debug for IdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A node name that is not 1..63 of `[a-z0-9-]` without a leading or trailing `-`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node name {name:?}: {reason}")]
pub struct NodeNameError {
    /// The name as given (truncated to 80 characters).
    pub name: String,
    /// Why it was refused.
    pub reason: &'static str,
}

/// Errors from signing an agent CSR; each names why the request was refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// The node name failed validation.
    #[error("invalid node name {name:?}: {reason}")]
    InvalidNodeName {
        /// The name as given (truncated to 80 characters).
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The CSR PEM is larger than the accepted maximum.
    #[error("CSR too large: {0} bytes (max {max})", max = crate::agent::MAX_CSR_PEM_BYTES)]
    TooLarge(usize),
    /// The input holds no PEM `CERTIFICATE REQUEST` block.
    #[error("invalid CSR PEM: {0}")]
    Pem(String),
    /// The CSR DER could not be parsed.
    #[error("malformed CSR: {0}")]
    Malformed(String),
    /// The CSR is not signed by the key it carries.
    #[error("CSR signature does not verify: {0}")]
    BadSignature(String),
    /// The CSR's key type is not on the allow-list (ECDSA P-256/P-384, Ed25519, RSA 2048..8192).
    #[error("unsupported CSR key type: {0} (allowed: ECDSA P-256, ECDSA P-384, Ed25519, RSA 2048..8192 bits)")]
    UnsupportedKeyType(String),
    /// The CSR asks for CA powers (basic constraints CA, keyCertSign/cRLSign, name constraints).
    #[error("CSR requests CA capabilities: {0}")]
    CaRequested(&'static str),
    /// Signing the certificate failed.
    #[error("certificate signing failed: {0}")]
    Sign(String),
}

impl From<NodeNameError> for CsrError {
    fn from(e: NodeNameError) -> Self {
        CsrError::InvalidNodeName { name: e.name, reason: e.reason }
    }
}

/// Errors from checking a leaf certificate against a CA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The leaf certificate could not be decoded or parsed.
    #[error("invalid leaf certificate: {0}")]
    Leaf(String),
    /// The CA certificate could not be decoded or parsed.
    #[error("invalid CA certificate: {0}")]
    Ca(String),
    /// The CA certificate is not a CA.
    #[error("the trust anchor is not a CA certificate")]
    NotCa,
    /// The leaf's issuer name is not the CA's subject name.
    #[error("the certificate was not issued by this CA (issuer name differs)")]
    IssuerMismatch,
    /// The leaf's signature does not verify with the CA's key.
    #[error("the certificate's signature does not verify against this CA")]
    BadSignature,
    /// The leaf is outside its validity period.
    #[error("the certificate is not valid now (valid from {not_before} to {not_after}, unix seconds)")]
    NotValidNow {
        /// notBefore as unix seconds.
        not_before: i64,
        /// notAfter as unix seconds.
        not_after: i64,
    },
    /// The CA is outside its validity period.
    #[error("the CA certificate is not valid now")]
    CaNotValidNow,
}

/// A fingerprint string that is not a sha256 digest in hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    /// Nothing after the optional `sha256:` prefix.
    #[error("empty fingerprint")]
    Empty,
    /// A character that is not a hex digit or `:`.
    #[error("invalid character {0:?} in fingerprint (expected hex digits, optionally separated by ':')")]
    InvalidCharacter(char),
    /// `:` separators that are not exactly between byte pairs.
    #[error("misplaced ':' in fingerprint (separators must be between every byte pair, or absent)")]
    Separator,
    /// Not 32 bytes.
    #[error("fingerprint has {got} hex digits, a sha256 fingerprint has 64")]
    Length {
        /// Hex digits found.
        got: usize,
    },
}

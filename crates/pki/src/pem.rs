//! PEM and X.509 decoding helpers shared by the modules.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::time::ASN1Time;

/// Largest PEM input accepted for a certificate, key or CSR (hostile-input guard).
pub(crate) const MAX_PEM_BYTES: usize = 256 * 1024;

/// Encodes DER as PEM with the given label, 64-character lines, trailing newline.
pub(crate) fn encode_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so any chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Every `CERTIFICATE` block in `pem`, in order; an error when there is none.
pub(crate) fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    if pem.len() > MAX_PEM_BYTES {
        return Err(format!("PEM input too large ({} bytes)", pem.len()));
    }
    let certs =
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// The first `CERTIFICATE` block in `pem`.
pub(crate) fn first_cert_from_pem(pem: &str) -> Result<CertificateDer<'static>, String> {
    certs_from_pem(pem).map(|mut v| v.swap_remove(0))
}

/// The private key (PKCS#8, SEC1 or PKCS#1) in `pem`.
pub(crate) fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    if pem.len() > MAX_PEM_BYTES {
        return Err(format!("PEM input too large ({} bytes)", pem.len()));
    }
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())
}

/// Parses one DER certificate, refusing trailing bytes.
pub(crate) fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    let (rem, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    if !rem.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    Ok(cert)
}

/// Converts an ASN.1 time to `SystemTime`.
pub(crate) fn asn1_to_system(t: ASN1Time) -> SystemTime {
    let ts = t.timestamp();
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

/// Lower-case hex of a DER INTEGER's bytes without leading zero bytes.
pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let s = crate::fingerprint::to_hex(&raw[start..]);
    if s.is_empty() { "00".into() } else { s }
}

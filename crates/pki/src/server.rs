//! Control-plane replica server certificates and their disk cache.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::KeyPair;
use time::OffsetDateTime;

use crate::ca::{BACKDATE, ClusterCa, LeafSpec, add_validity, now_utc};
use crate::error::PkiError;
use crate::names::{CP_IDENTITY_URI, San, parse_sans};
use crate::pem::first_cert_from_pem;
use crate::verify::{cert_info, is_control_plane_cert_der, key_matches_cert, verify_chain};
use otherix_files::{ensure_dir, write_file_atomic};

/// Common name of control-plane replica certificates.
pub const CP_COMMON_NAME: &str = "otherix-cp-replica";

/// File name of the cached replica certificate.
pub const CP_CERT_FILE: &str = "cp-cert.crt";

/// File name of the cached replica private key.
pub const CP_KEY_FILE: &str = "cp-cert.key";

/// A cached certificate is reissued when it has this much validity left or less.
pub const REISSUE_BEFORE_EXPIRY: Duration = Duration::from_secs(30 * 24 * 3600);

/// A freshly issued or reused leaf certificate with its private key.
#[derive(Clone)]
pub struct IssuedCert {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The leaf's private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Serial number, lower-case hex.
    pub serial_hex: String,
    /// sha256 of the certificate DER, lower-case hex.
    pub fingerprint_sha256: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial_hex", &self.serial_hex)
            .field("fingerprint_sha256", &self.fingerprint_sha256)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

/// The result of [`load_or_issue_server_cert`]: the certificate and whether it came from disk.
#[derive(Debug, Clone)]
pub struct CachedServerCert {
    /// The certificate and key in use.
    pub cert: IssuedCert,
    /// True when the files in the directory were reused, false when a new cert was issued.
    pub reused: bool,
    /// Why the cached certificate was not reused (`None` when reused or when there was none).
    pub reissued_because: Option<&'static str>,
}

/// The SANs a replica cert needs: localhost, 127.0.0.1, the hostname, the non-wildcard listen
/// IPs and the additional SANs, canonicalised and deduplicated (an invalid hostname is
/// skipped; invalid additional SANs are kept so that issuing reports them).
pub fn default_server_sans(hostname: &str, listen_addrs: &[SocketAddr], additional: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: String| {
        let canon = San::parse(&s).map(|c| c.to_string()).unwrap_or(s);
        if !canon.trim().is_empty() && !out.contains(&canon) {
            out.push(canon);
        }
    };
    push("localhost".into());
    push("127.0.0.1".into());
    // A hostname that is not a valid DNS name (e.g. with '_') is skipped rather than
    // making every boot fail; listen addresses and additional SANs still apply.
    if San::parse(hostname).is_ok() {
        push(hostname.trim().to_string());
    }
    for a in listen_addrs {
        if !a.ip().is_unspecified() {
            push(a.ip().to_string());
        }
    }
    for s in additional {
        push(s.trim().to_string());
    }
    out
}

fn invalid_san((name, reason): (String, &'static str)) -> PkiError {
    PkiError::InvalidSan { name, reason }
}

impl ClusterCa {
    /// Issues a replica server cert: new ECDSA P-384 key, CN `otherix-cp-replica`,
    /// EKU serverAuth + clientAuth, SANs as IPs or DNS names (invalid names refused), plus the
    /// control-plane identity URI SAN ([`crate::CP_IDENTITY_URI`]) that agents require.
    pub fn issue_server_cert(&self, sans: &[String], validity: Duration) -> Result<IssuedCert, PkiError> {
        let now = now_utc();
        self.issue_server_cert_between(sans, now - BACKDATE, add_validity(now, validity))
    }

    pub(crate) fn issue_server_cert_between(
        &self,
        sans: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, PkiError> {
        let mut sans = parse_sans(sans).map_err(invalid_san)?;
        if sans.is_empty() {
            return Err(PkiError::InvalidSan {
                name: String::new(),
                reason: "a server certificate needs at least one SAN",
            });
        }
        sans.push(San::Uri(CP_IDENTITY_URI.to_string()));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(|e| PkiError::KeyGen(e.to_string()))?;
        let spec = LeafSpec { common_name: CP_COMMON_NAME.to_string(), sans, server_auth: true, not_before, not_after };
        let leaf = self.issue_leaf(&key, &spec).map_err(PkiError::Sign)?;
        Ok(IssuedCert {
            cert_pem: leaf.cert_pem,
            key_pem: key.serialize_pem(),
            serial_hex: leaf.serial_hex,
            fingerprint_sha256: leaf.fingerprint_sha256,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
        })
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, PkiError> {
    match std::fs::read(path) {
        Ok(b) => Ok(String::from_utf8(b).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Io { path: path.to_path_buf(), source }),
    }
}

/// Why a cached cert cannot be reused, or `None` when it can.
fn reuse_problem(ca: &ClusterCa, cert_pem: &str, key_pem: &str, wanted: &[San]) -> Option<&'static str> {
    if verify_chain(cert_pem, ca.cert_pem()).is_err() {
        return Some("not signed by the current CA or not valid now");
    }
    if !matches!(key_matches_cert(cert_pem, key_pem), Ok(true)) {
        return Some("key does not match the certificate");
    }
    let Ok(info) = cert_info(cert_pem) else {
        return Some("unparseable certificate");
    };
    // Certificates from before the control-plane identity existed are replaced, or agents
    // (which require it) would refuse this replica.
    if !first_cert_from_pem(cert_pem).is_ok_and(|der| is_control_plane_cert_der(&der)) {
        return Some("lacks the control-plane identity");
    }
    let have: Vec<San> = info.sans.iter().filter_map(|s| San::parse(s).ok()).collect();
    if wanted.iter().any(|w| !have.contains(w)) {
        return Some("does not cover every wanted SAN");
    }
    let left = info.not_after.duration_since(SystemTime::now()).unwrap_or_default();
    if left <= REISSUE_BEFORE_EXPIRY {
        return Some("expires within 30 days");
    }
    None
}

/// Reuses `cp-cert.crt`/`cp-cert.key` in `dir` when the cert chains to `ca`, carries the
/// control-plane identity, covers every SAN in `sans` and has more than 30 days left; otherwise issues a new one and writes both
/// atomically (key 0600, dir 0700).
pub fn load_or_issue_server_cert(
    dir: &Path,
    ca: &ClusterCa,
    sans: &[String],
    validity: Duration,
) -> Result<CachedServerCert, PkiError> {
    let wanted = parse_sans(sans).map_err(invalid_san)?;
    ensure_dir(dir, 0o700)?;
    let cert_path = dir.join(CP_CERT_FILE);
    let key_path = dir.join(CP_KEY_FILE);
    let cached = (read_optional(&cert_path)?, read_optional(&key_path)?);
    let problem = match &cached {
        (Some(cert_pem), Some(key_pem)) => reuse_problem(ca, cert_pem, key_pem, &wanted),
        _ => None,
    };
    if let (Some(cert_pem), Some(key_pem)) = cached
        && problem.is_none()
    {
        // Tighten the key's mode in case it was loosened by hand.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| PkiError::Io { path: key_path.clone(), source })?;
        let info = cert_info(&cert_pem)?;
        return Ok(CachedServerCert {
            cert: IssuedCert {
                cert_pem,
                key_pem,
                serial_hex: info.serial_hex,
                fingerprint_sha256: info.fingerprint_sha256,
                not_before: info.not_before,
                not_after: info.not_after,
            },
            reused: true,
            reissued_because: None,
        });
    }
    let cert = ca.issue_server_cert(sans, validity)?;
    // Key first: a crash between the renames leaves a mismatched pair, which is reissued.
    write_file_atomic(&key_path, cert.key_pem.as_bytes(), 0o600)?;
    write_file_atomic(&cert_path, cert.cert_pem.as_bytes(), 0o644)?;
    Ok(CachedServerCert { cert, reused: false, reissued_because: problem })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn default_sans() {
        let listen: Vec<SocketAddr> = vec![
            "0.0.0.0:8443".parse().unwrap(),
            "[::]:8443".parse().unwrap(),
            "10.0.0.5:8443".parse().unwrap(),
            "127.0.0.1:9000".parse().unwrap(),
            "[fd00::1]:8443".parse().unwrap(),
        ];
        let sans = default_server_sans("CP-1", &listen, &s(&["cp.example.com", "10.0.0.5", "LOCALHOST", " "]));
        assert_eq!(sans, s(&["localhost", "127.0.0.1", "cp-1", "10.0.0.5", "fd00::1", "cp.example.com"]));
        assert_eq!(default_server_sans("", &[], &[]), s(&["localhost", "127.0.0.1"]));
        assert_eq!(default_server_sans("bad_host", &[], &s(&["bad name"])), s(&["localhost", "127.0.0.1", "bad name"]));
    }

    #[test]
    fn server_cert_profile() {
        let ca = ClusterCa::generate().unwrap();
        let c = ca
            .issue_server_cert(
                &s(&["localhost", "127.0.0.1", "cp-1.example.com", "::1"]),
                Duration::from_secs(365 * 86400),
            )
            .unwrap();
        verify_chain(&c.cert_pem, ca.cert_pem()).unwrap();
        assert!(key_matches_cert(&c.cert_pem, &c.key_pem).unwrap());
        let info = cert_info(&c.cert_pem).unwrap();
        assert_eq!(info.common_name.as_deref(), Some(CP_COMMON_NAME));
        assert_eq!(info.sans, s(&["localhost", "127.0.0.1", "cp-1.example.com", "::1"]));
        assert_eq!(info.serial_hex, c.serial_hex);
        assert_eq!(info.fingerprint_sha256, c.fingerprint_sha256);
        assert_eq!(info.not_after, c.not_after);
        assert!(!info.is_ca);
        let der = crate::pem::first_cert_from_pem(&c.cert_pem).unwrap();
        let x = crate::pem::parse_x509(&der).unwrap();
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(crate::cert_identity(&c.cert_pem), None);
        assert_eq!(info.uris, [CP_IDENTITY_URI]);
        assert!(is_control_plane_cert_der(&der));

        for bad in ["bad name", "-x.com", "a..b", ""] {
            assert!(
                matches!(
                    ca.issue_server_cert(&s(&["localhost", bad]), Duration::from_secs(60)),
                    Err(PkiError::InvalidSan { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cache_reuse_and_reissue() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        let ca = ClusterCa::generate().unwrap();
        let year = Duration::from_secs(365 * 86400);
        let sans = s(&["localhost", "127.0.0.1", "cp-1"]);

        let first = load_or_issue_server_cert(&dir, &ca, &sans, year).unwrap();
        assert!(!first.reused);
        assert_eq!(std::fs::metadata(dir.join(CP_KEY_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);

        // Same CA, same SANs: reused (a subset of SANs too, in any order or case).
        let second = load_or_issue_server_cert(&dir, &ca, &sans, year).unwrap();
        assert!(second.reused);
        assert_eq!(second.cert.fingerprint_sha256, first.cert.fingerprint_sha256);
        assert_eq!(second.cert.key_pem, first.cert.key_pem);
        let subset = load_or_issue_server_cert(&dir, &ca, &s(&["CP-1"]), year).unwrap();
        assert!(subset.reused);

        // A wanted SAN is missing: reissued, and the new one covers it.
        let more = s(&["localhost", "127.0.0.1", "cp-1", "10.1.2.3"]);
        let third = load_or_issue_server_cert(&dir, &ca, &more, year).unwrap();
        assert!(!third.reused);
        assert_ne!(third.cert.fingerprint_sha256, first.cert.fingerprint_sha256);
        assert!(load_or_issue_server_cert(&dir, &ca, &more, year).unwrap().reused);

        // Another CA: reissued.
        let other = ClusterCa::generate().unwrap();
        let fourth = load_or_issue_server_cert(&dir, &other, &more, year).unwrap();
        assert!(!fourth.reused);
        verify_chain(&fourth.cert.cert_pem, other.cert_pem()).unwrap();

        // Expired on disk: reissued.
        let now = now_utc();
        let expired = ca
            .issue_server_cert_between(&more, now - time::Duration::days(400), now - time::Duration::days(35))
            .unwrap();
        write_file_atomic(&dir.join(CP_CERT_FILE), expired.cert_pem.as_bytes(), 0o644).unwrap();
        write_file_atomic(&dir.join(CP_KEY_FILE), expired.key_pem.as_bytes(), 0o600).unwrap();
        let fifth = load_or_issue_server_cert(&dir, &ca, &more, year).unwrap();
        assert!(!fifth.reused);

        // Valid but only 10 days left: reissued.
        let short = ca.issue_server_cert(&more, Duration::from_secs(10 * 86400)).unwrap();
        write_file_atomic(&dir.join(CP_CERT_FILE), short.cert_pem.as_bytes(), 0o644).unwrap();
        write_file_atomic(&dir.join(CP_KEY_FILE), short.key_pem.as_bytes(), 0o600).unwrap();
        assert!(!load_or_issue_server_cert(&dir, &ca, &more, year).unwrap().reused);

        // Key replaced by another key: reissued. Garbage: reissued.
        let fresh = load_or_issue_server_cert(&dir, &ca, &more, year).unwrap();
        assert!(fresh.reused);
        write_file_atomic(&dir.join(CP_KEY_FILE), short.key_pem.as_bytes(), 0o600).unwrap();
        assert!(!load_or_issue_server_cert(&dir, &ca, &more, year).unwrap().reused);
        std::fs::write(dir.join(CP_CERT_FILE), b"\x00\xffgarbage").unwrap();
        assert!(!load_or_issue_server_cert(&dir, &ca, &more, year).unwrap().reused);
        std::fs::remove_file(dir.join(CP_KEY_FILE)).unwrap();
        assert!(!load_or_issue_server_cert(&dir, &ca, &more, year).unwrap().reused);
        // A replica cert from before the control-plane identity (same CA, SANs, long life):
        // reissued, and the new one carries the identity.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let now = now_utc();
        let spec = LeafSpec {
            common_name: CP_COMMON_NAME.to_string(),
            sans: parse_sans(&more).unwrap(),
            server_auth: true,
            not_before: now - BACKDATE,
            not_after: now + time::Duration::days(300),
        };
        let legacy = ca.issue_leaf(&key, &spec).unwrap();
        write_file_atomic(&dir.join(CP_CERT_FILE), legacy.cert_pem.as_bytes(), 0o644).unwrap();
        write_file_atomic(&dir.join(CP_KEY_FILE), key.serialize_pem().as_bytes(), 0o600).unwrap();
        assert_eq!(
            reuse_problem(&ca, &legacy.cert_pem, &key.serialize_pem(), &parse_sans(&more).unwrap()),
            Some("lacks the control-plane identity")
        );
        let renewed = load_or_issue_server_cert(&dir, &ca, &more, year).unwrap();
        assert!(!renewed.reused);
        assert_eq!(renewed.reissued_because, Some("lacks the control-plane identity"));
        assert_eq!(cert_info(&renewed.cert.cert_pem).unwrap().uris, [CP_IDENTITY_URI]);
        assert!(load_or_issue_server_cert(&dir, &ca, &more, year).unwrap().reused);

        // No temp files left behind.
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, [CP_CERT_FILE, CP_KEY_FILE]);
    }
}

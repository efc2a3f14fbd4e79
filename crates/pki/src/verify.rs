//! Chain verification, certificate identity and metadata.

use std::net::IpAddr;
use std::time::SystemTime;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::time::ASN1Time;

use crate::error::{PkiError, VerifyError};
use crate::fingerprint::{sha256, to_hex};
use crate::names::{AGENT_CN_PREFIX, AGENT_DNS_SUFFIX, CP_IDENTITY_URI, validate_node_name};
use crate::pem::{asn1_to_system, first_cert_from_pem, key_from_pem, parse_x509, serial_hex};
use crate::server::CP_COMMON_NAME;

/// Checks that `leaf_pem` (its first certificate) is signed by the CA in `ca_pem` and that
/// both are within their validity period now.
pub fn verify_chain(leaf_pem: &str, ca_pem: &str) -> Result<(), VerifyError> {
    let leaf_der = first_cert_from_pem(leaf_pem).map_err(VerifyError::Leaf)?;
    let ca_der = first_cert_from_pem(ca_pem).map_err(VerifyError::Ca)?;
    verify_chain_der_at(&leaf_der, &ca_der, ASN1Time::now())
}

/// Like [`verify_chain`], on DER input and at a given time.
pub(crate) fn verify_chain_der_at(leaf_der: &[u8], ca_der: &[u8], now: ASN1Time) -> Result<(), VerifyError> {
    let leaf = parse_x509(leaf_der).map_err(VerifyError::Leaf)?;
    let ca = parse_x509(ca_der).map_err(VerifyError::Ca)?;
    if !ca.is_ca() {
        return Err(VerifyError::NotCa);
    }
    if leaf.issuer().as_raw() != ca.subject().as_raw() {
        return Err(VerifyError::IssuerMismatch);
    }
    leaf.verify_signature(Some(ca.public_key())).map_err(|_| VerifyError::BadSignature)?;
    if !ca.validity().is_valid_at(now) {
        return Err(VerifyError::CaNotValidNow);
    }
    if !leaf.validity().is_valid_at(now) {
        return Err(VerifyError::NotValidNow {
            not_before: leaf.validity().not_before.timestamp(),
            not_after: leaf.validity().not_after.timestamp(),
        });
    }
    Ok(())
}

/// The node name of an agent certificate (`CN=node-<name>` and/or SAN
/// `node-<name>.agents.otherix.local`), or `None` when it names no node, names disagree, or
/// it also carries the control-plane identity (a certificate is one or the other).
/// Does not verify the chain: use it on certificates a verifier has already accepted.
pub fn cert_identity(cert_pem: &str) -> Option<String> {
    let der = first_cert_from_pem(cert_pem).ok()?;
    cert_identity_der(&der)
}

/// [`cert_identity`] on a DER certificate (e.g. from rustls `peer_certificates()`).
pub fn cert_identity_der(der: &[u8]) -> Option<String> {
    let cert = parse_x509(der).ok()?;
    identity_of(&cert)
}

fn node_from_cn(cn: &str) -> Option<String> {
    let name = cn.strip_prefix(AGENT_CN_PREFIX)?;
    validate_node_name(name).ok()?;
    Some(name.to_string())
}

fn node_from_dns(dns: &str) -> Option<String> {
    let host = dns.strip_suffix(AGENT_DNS_SUFFIX)?.strip_suffix('.')?.strip_prefix(AGENT_CN_PREFIX)?;
    validate_node_name(host).ok()?;
    Some(host.to_string())
}

/// The URI SANs of a certificate; `None` when the extension does not parse.
fn uri_sans(cert: &X509Certificate<'_>) -> Option<Vec<String>> {
    let ext = cert.subject_alternative_name().ok()?;
    Some(
        ext.map(|e| {
            e.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default(),
    )
}

/// Whether a certificate (DER) carries the control-plane identity: the URI SAN
/// [`CP_IDENTITY_URI`], `CN=otherix-cp-replica`, the serverAuth and clientAuth purposes, not
/// a CA, and no node name. Does not verify the chain: the verifiers of this crate do both.
pub fn is_control_plane_cert_der(der: &[u8]) -> bool {
    let Ok(cert) = parse_x509(der) else { return false };
    is_control_plane(&cert)
}

pub(crate) fn is_control_plane(cert: &X509Certificate<'_>) -> bool {
    if cert.is_ca() || identity_of(cert).is_some() {
        return false;
    }
    if !uri_sans(cert).is_some_and(|u| u.iter().any(|u| u == CP_IDENTITY_URI)) {
        return false;
    }
    let cn_ok = cert.subject().iter_common_name().map(|c| c.as_str().ok()).eq([Some(CP_COMMON_NAME)]);
    let eku_ok = matches!(cert.extended_key_usage(), Ok(Some(e)) if e.value.server_auth && e.value.client_auth);
    cn_ok && eku_ok
}

fn identity_of(cert: &X509Certificate<'_>) -> Option<String> {
    if uri_sans(cert)?.iter().any(|u| u == CP_IDENTITY_URI) {
        return None;
    }
    let cns: Vec<&str> = cert.subject().iter_common_name().map(|c| c.as_str().ok()).collect::<Option<Vec<_>>>()?;
    if cns.len() > 1 {
        return None;
    }
    let from_cn = cns.first().and_then(|cn| node_from_cn(cn));
    let san_ext = cert.subject_alternative_name().ok()?;
    let from_sans: Vec<String> = san_ext
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::DNSName(d) => node_from_dns(d),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match from_cn {
        Some(n) => from_sans.iter().all(|s| *s == n).then_some(n),
        None => {
            let first = from_sans.first()?;
            from_sans.iter().all(|s| s == first).then(|| first.clone())
        }
    }
}

/// Whether the private key in `key_pem` belongs to the (first) certificate in `cert_pem`.
pub fn key_matches_cert(cert_pem: &str, key_pem: &str) -> Result<bool, PkiError> {
    let der = first_cert_from_pem(cert_pem).map_err(PkiError::Pem)?;
    let cert = parse_x509(&der).map_err(PkiError::Certificate)?;
    // Validate the PEM shape first so that hostile input never reaches a key parser unchecked.
    key_from_pem(key_pem).map_err(PkiError::Key)?;
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| PkiError::Key(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// Metadata of a certificate, as the control plane records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject's first common name, if any.
    pub common_name: Option<String>,
    /// The subject as an RFC 4514-like string.
    pub subject: String,
    /// DNS and IP subject alternative names, in certificate order.
    pub sans: Vec<String>,
    /// URI subject alternative names (the control-plane identity), in certificate order.
    pub uris: Vec<String>,
    /// Serial number, lower-case hex.
    pub serial_hex: String,
    /// sha256 of the certificate DER, lower-case hex.
    pub fingerprint_sha256: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether basic constraints mark it as a CA.
    pub is_ca: bool,
}

/// Parses the (first) certificate in `cert_pem` into [`CertInfo`].
pub fn cert_info(cert_pem: &str) -> Result<CertInfo, PkiError> {
    let der = first_cert_from_pem(cert_pem).map_err(PkiError::Pem)?;
    let cert = parse_x509(&der).map_err(PkiError::Certificate)?;
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::DNSName(d) => Some(d.to_string()),
                GeneralName::IPAddress(b) => ip_from_bytes(b).map(|ip| ip.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(PkiError::Certificate(e.to_string())),
    };
    let uris = uri_sans(&cert).unwrap_or_default();
    Ok(CertInfo {
        common_name: cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).map(str::to_string),
        subject: cert.subject().to_string(),
        sans,
        uris,
        serial_hex: serial_hex(cert.raw_serial()),
        fingerprint_sha256: to_hex(&sha256(&der)),
        not_before: asn1_to_system(cert.validity().not_before),
        not_after: asn1_to_system(cert.validity().not_after),
        is_ca: cert.is_ca(),
    })
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClusterCa;
    use std::time::Duration;

    #[test]
    fn chain_against_other_ca_fails() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        let leaf = ca.issue_server_cert(&["localhost".into()], Duration::from_secs(3600)).unwrap();
        verify_chain(&leaf.cert_pem, ca.cert_pem()).unwrap();
        // Same subject name (both CAs are "otherix-cluster-ca"), different key.
        assert_eq!(verify_chain(&leaf.cert_pem, other.cert_pem()), Err(VerifyError::BadSignature));
        // A leaf is not a trust anchor.
        assert_eq!(verify_chain(&leaf.cert_pem, &leaf.cert_pem), Err(VerifyError::NotCa));
    }

    #[test]
    fn identity_rules() {
        let ca = ClusterCa::generate().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let now = crate::ca::now_utc();
        let issue = |cn: &str, sans: &[&str]| {
            let spec = crate::ca::LeafSpec {
                common_name: cn.to_string(),
                sans: sans.iter().map(|s| crate::names::San::parse(s).unwrap()).collect(),
                server_auth: true,
                not_before: now,
                not_after: now + time::Duration::hours(1),
            };
            ca.issue_leaf(&key, &spec).unwrap().cert_pem
        };
        let id = |cn: &str, sans: &[&str]| cert_identity(&issue(cn, sans));
        assert_eq!(id("node-a", &["node-a.agents.otherix.local"]).as_deref(), Some("a"));
        assert_eq!(id("node-a", &["10.0.0.1"]).as_deref(), Some("a"));
        assert_eq!(id("x", &["node-b.agents.otherix.local"]).as_deref(), Some("b"));
        // CN and SAN disagree: no identity.
        assert_eq!(id("node-a", &["node-b.agents.otherix.local"]), None);
        assert_eq!(id("x", &["node-a.agents.otherix.local", "node-b.agents.otherix.local"]), None);
        // Not node names.
        assert_eq!(id("otherix-cp-replica", &["localhost"]), None);
        assert_eq!(id("node-", &[]), None);
        assert_eq!(id("node-A", &[]), None);
        assert_eq!(id("x", &["node-a.agents.otherix.local.evil.com"]), None);
        assert_eq!(id("x", &["evil-node-a.agents.otherix.local"]), None);

        // A node name next to the control-plane identity: neither a node nor the control plane.
        let spec = crate::ca::LeafSpec {
            common_name: "node-a".into(),
            sans: vec![
                crate::names::San::parse("node-a.agents.otherix.local").unwrap(),
                crate::names::San::Uri(CP_IDENTITY_URI.into()),
            ],
            server_auth: true,
            not_before: now,
            not_after: now + time::Duration::hours(1),
        };
        let both = ca.issue_leaf(&key, &spec).unwrap().cert_pem;
        assert_eq!(cert_identity(&both), None);
        assert!(!is_control_plane_cert_der(&first_cert_from_pem(&both).unwrap()));
        // The control-plane identity on a leaf without serverAuth: not the control plane.
        let spec = crate::ca::LeafSpec {
            common_name: CP_COMMON_NAME.into(),
            sans: vec![crate::names::San::Uri(CP_IDENTITY_URI.into())],
            server_auth: false,
            not_before: now,
            not_after: now + time::Duration::hours(1),
        };
        let client_only = ca.issue_leaf(&key, &spec).unwrap().cert_pem;
        assert!(!is_control_plane_cert_der(&first_cert_from_pem(&client_only).unwrap()));
        // The CA itself is not the control plane.
        assert!(!is_control_plane_cert_der(ca.cert_der()));
    }

    #[test]
    fn chain_validity_period() {
        let ca = ClusterCa::generate().unwrap();
        let now = crate::ca::now_utc();
        let expired = ca
            .issue_server_cert_between(
                &["localhost".into()],
                now - time::Duration::days(10),
                now - time::Duration::days(1),
            )
            .unwrap();
        assert!(matches!(verify_chain(&expired.cert_pem, ca.cert_pem()), Err(VerifyError::NotValidNow { .. })));
        let future = ca
            .issue_server_cert_between(
                &["localhost".into()],
                now + time::Duration::days(1),
                now + time::Duration::days(10),
            )
            .unwrap();
        assert!(matches!(verify_chain(&future.cert_pem, ca.cert_pem()), Err(VerifyError::NotValidNow { .. })));
    }

    #[test]
    fn garbage_input_is_an_error_not_a_panic() {
        let ca = ClusterCa::generate().unwrap();
        let inputs = [
            String::new(),
            "garbage".to_string(),
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".to_string(),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_string(),
            crate::pem::encode_pem("CERTIFICATE", &[0x30, 0x82, 0xff, 0xff, 0x00]),
            crate::pem::encode_pem("CERTIFICATE", &[0u8; 300]),
            "x".repeat(1 << 20),
        ];
        for junk in &inputs {
            assert!(verify_chain(junk, ca.cert_pem()).is_err());
            assert!(verify_chain(ca.cert_pem(), junk).is_err());
            assert_eq!(cert_identity(junk), None);
            assert!(cert_info(junk).is_err());
            assert!(key_matches_cert(junk, junk).is_err());
            assert!(key_matches_cert(ca.cert_pem(), junk).is_err());
        }
        // Truncations of a real certificate never panic.
        let der = ca.cert_der().as_ref().to_vec();
        for n in (0..der.len()).step_by(7) {
            let pem = crate::pem::encode_pem("CERTIFICATE", &der[..n]);
            assert!(verify_chain(&pem, ca.cert_pem()).is_err());
            assert_eq!(cert_identity_der(&der[..n]), None);
        }
    }
}

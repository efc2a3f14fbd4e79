//! Agent enrolment: key + CSR generation on the agent, CSR checks and signing on the CA.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_PKCS9_EXTENSION_REQUEST,
    OID_SIG_ED25519, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_NAME_CONSTRAINTS,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::ca::{BACKDATE, ClusterCa, LeafSpec, add_validity, now_utc};
use crate::error::{CsrError, PkiError};
use crate::names::{San, agent_common_name, agent_dns_name, validate_node_name};

/// Largest CSR PEM accepted by [`ClusterCa::sign_agent_csr`].
pub const MAX_CSR_PEM_BYTES: usize = 64 * 1024;

/// Default validity of agent certificates (about one year).
pub const AGENT_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A signed agent certificate and the metadata the control plane records about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedAgentCert {
    /// The agent certificate, PEM.
    pub cert_pem: String,
    /// The node the certificate names.
    pub node_name: String,
    /// The subject, `CN=node-<name>`.
    pub subject: String,
    /// Serial number, lower-case hex.
    pub serial_hex: String,
    /// sha256 of the certificate DER, lower-case hex.
    pub fingerprint_sha256: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Generates the agent's ECDSA P-384 key and a CSR for `node_name`: `(key_pem, csr_pem)`.
pub fn generate_agent_key_and_csr(node_name: &str) -> Result<(String, String), PkiError> {
    validate_node_name(node_name)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(|e| PkiError::KeyGen(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, agent_common_name(node_name));
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(|e| PkiError::Sign(e.to_string()))?;
    let csr_pem = csr.pem().map_err(|e| PkiError::Sign(e.to_string()))?;
    Ok((key.serialize_pem(), csr_pem))
}

/// Checks a CSR: parse, key type allow-list, no CA extensions, signature; returns the public key.
fn check_csr(csr_pem: &str) -> Result<rcgen::SubjectPublicKeyInfo, CsrError> {
    if csr_pem.len() > MAX_CSR_PEM_BYTES {
        return Err(CsrError::TooLarge(csr_pem.len()));
    }
    let der =
        CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| CsrError::Pem(e.to_string()))?;
    let (rem, csr) =
        X509CertificationRequest::from_der(der.as_ref()).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rem.is_empty() {
        return Err(CsrError::Malformed("trailing bytes after the CSR".into()));
    }
    let info = &csr.certification_request_info;

    // Key type allow-list, before any signature work.
    let spki = &info.subject_pki;
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => {}
            Some(c) => {
                return Err(CsrError::UnsupportedKeyType(format!("ECDSA on curve {c}")));
            }
            None => {
                return Err(CsrError::UnsupportedKeyType("ECDSA without a named curve".into()));
            }
        }
    } else if *alg == OID_SIG_ED25519 {
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err(CsrError::Malformed("unparseable RSA public key".into())),
        };
        if !(2048..=8192).contains(&bits) {
            return Err(CsrError::UnsupportedKeyType(format!("RSA {bits} bits")));
        }
    } else {
        return Err(CsrError::UnsupportedKeyType(format!("key algorithm {alg}")));
    }

    // Requested extensions: nothing that would make a CA.
    for attr in info.iter_attributes() {
        match attr.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(req) => {
                for ext in &req.extensions {
                    if ext.oid == OID_X509_EXT_BASIC_CONSTRAINTS {
                        match ext.parsed_extension() {
                            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                                return Err(CsrError::CaRequested("basicConstraints CA:TRUE"));
                            }
                            ParsedExtension::BasicConstraints(_) => {}
                            _ => {
                                return Err(CsrError::Malformed("unparseable basicConstraints extension".into()));
                            }
                        }
                    } else if ext.oid == OID_X509_EXT_KEY_USAGE {
                        match ext.parsed_extension() {
                            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() => {
                                return Err(CsrError::CaRequested("keyUsage keyCertSign"));
                            }
                            ParsedExtension::KeyUsage(ku) if ku.crl_sign() => {
                                return Err(CsrError::CaRequested("keyUsage cRLSign"));
                            }
                            ParsedExtension::KeyUsage(_) => {}
                            _ => {
                                return Err(CsrError::Malformed("unparseable keyUsage extension".into()));
                            }
                        }
                    } else if ext.oid == OID_X509_EXT_NAME_CONSTRAINTS {
                        return Err(CsrError::CaRequested("nameConstraints"));
                    }
                }
            }
            _ if attr.oid == OID_PKCS9_EXTENSION_REQUEST => {
                return Err(CsrError::Malformed("unparseable extensionRequest attribute".into()));
            }
            _ => {}
        }
    }

    csr.verify_signature().map_err(|e| CsrError::BadSignature(e.to_string()))?;

    rcgen::SubjectPublicKeyInfo::from_der(spki.raw).map_err(|e| CsrError::UnsupportedKeyType(e.to_string()))
}

impl ClusterCa {
    /// Signs an agent CSR: checks it, ignores its subject and SANs, and issues a certificate
    /// that names the node only: `CN=node-<name>`, the one SAN
    /// `node-<name>.agents.otherix.local`, EKU clientAuth only (a node certificate can never
    /// serve TLS to a client that checks the purpose), not a CA. Nothing the joining agent
    /// chooses besides its name and key ends up in the certificate.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        node_name: &str,
        validity: Duration,
    ) -> Result<SignedAgentCert, CsrError> {
        validate_node_name(node_name)?;
        let sans = vec![San::Dns(agent_dns_name(node_name))];
        let public_key = check_csr(csr_pem)?;
        let now = now_utc();
        let common_name = agent_common_name(node_name);
        let leaf = self
            .issue_leaf(
                &public_key,
                &LeafSpec {
                    common_name: common_name.clone(),
                    sans,
                    server_auth: false,
                    not_before: now - BACKDATE,
                    not_after: add_validity(now, validity),
                },
            )
            .map_err(CsrError::Sign)?;
        Ok(SignedAgentCert {
            cert_pem: leaf.cert_pem,
            node_name: node_name.to_string(),
            subject: format!("CN={common_name}"),
            serial_hex: leaf.serial_hex,
            fingerprint_sha256: leaf.fingerprint_sha256,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cert_identity, cert_info, key_matches_cert, verify_chain};
    use rcgen::{BasicConstraints, IsCa, KeyUsagePurpose, SanType};

    const YEAR: Duration = AGENT_CERT_VALIDITY;

    fn csr_with(params: &CertificateParams, alg: &'static rcgen::SignatureAlgorithm) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn agent_enrolment_round_trip() {
        let ca = ClusterCa::generate().unwrap();
        let (key_pem, csr_pem) = generate_agent_key_and_csr("node-a1").unwrap();
        let signed = ca.sign_agent_csr(&csr_pem, "node-a1", YEAR).unwrap();
        verify_chain(&signed.cert_pem, ca.cert_pem()).unwrap();
        assert!(key_matches_cert(&signed.cert_pem, &key_pem).unwrap());
        assert_eq!(cert_identity(&signed.cert_pem).as_deref(), Some("node-a1"));
        let info = cert_info(&signed.cert_pem).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("node-node-a1"));
        assert_eq!(signed.subject, "CN=node-node-a1");
        assert_eq!(info.sans, ["node-node-a1.agents.otherix.local"]);
        assert!(info.uris.is_empty());
        assert!(!info.is_ca);
        assert_eq!(info.serial_hex, signed.serial_hex);
        assert_eq!(info.fingerprint_sha256, signed.fingerprint_sha256);
        assert_eq!(info.not_before, signed.not_before);
        assert_eq!(info.not_after, signed.not_after);
        let der = crate::pem::first_cert_from_pem(&signed.cert_pem).unwrap();
        let x = crate::pem::parse_x509(&der).unwrap();
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        // clientAuth only: a node certificate cannot serve TLS to a purpose-checking client.
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!crate::is_control_plane_cert_der(&der));
        let bc = x.basic_constraints().unwrap().unwrap().value;
        assert!(!bc.ca);
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());

        // Two signings of the same CSR get different serials.
        let again = ca.sign_agent_csr(&csr_pem, "node-a1", YEAR).unwrap();
        assert_ne!(again.serial_hex, signed.serial_hex);
    }

    #[test]
    fn csr_subject_and_sans_are_ignored() {
        let ca = ClusterCa::generate().unwrap();
        let mut params = CertificateParams::new(vec![
            "otherix-cp-replica".to_string(),
            "node-victim.agents.otherix.local".to_string(),
            "127.0.0.1".to_string(),
        ])
        .unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "node-victim");
        dn.push(DnType::OrganizationName, "admins");
        params.distinguished_name = dn;
        params.subject_alt_names.push(SanType::Rfc822Name("root@example.com".try_into().unwrap()));
        let csr = csr_with(&params, &rcgen::PKCS_ECDSA_P384_SHA384);
        let signed = ca.sign_agent_csr(&csr, "worker-2", YEAR).unwrap();
        let info = cert_info(&signed.cert_pem).unwrap();
        assert_eq!(info.subject, "CN=node-worker-2");
        assert_eq!(info.sans, ["node-worker-2.agents.otherix.local"]);
        assert_eq!(cert_identity(&signed.cert_pem).as_deref(), Some("worker-2"));

        // An openssl-made RSA 2048 CSR with its own subject and SANs: accepted, ignored.
        let rsa = include_str!("testdata/rsa2048.csr");
        let signed = ca.sign_agent_csr(rsa, "rsa-node", YEAR).unwrap();
        let info = cert_info(&signed.cert_pem).unwrap();
        assert_eq!(info.subject, "CN=node-rsa-node");
        assert_eq!(info.sans, ["node-rsa-node.agents.otherix.local"]);
        verify_chain(&signed.cert_pem, ca.cert_pem()).unwrap();
    }

    #[test]
    fn allowed_key_types() {
        let ca = ClusterCa::generate().unwrap();
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let csr = csr_with(&CertificateParams::default(), alg);
            let signed = ca.sign_agent_csr(&csr, "n1", YEAR).unwrap();
            verify_chain(&signed.cert_pem, ca.cert_pem()).unwrap();
            assert_eq!(cert_spki(&signed.cert_pem), csr_spki(&csr));
        }
        let rsa = include_str!("testdata/rsa2048.csr");
        let signed = ca.sign_agent_csr(rsa, "n1", YEAR).unwrap();
        assert_eq!(cert_spki(&signed.cert_pem), csr_spki(rsa));
    }

    /// The SubjectPublicKeyInfo DER of a certificate.
    fn cert_spki(cert_pem: &str) -> Vec<u8> {
        let der = crate::pem::first_cert_from_pem(cert_pem).unwrap();
        crate::pem::parse_x509(&der).unwrap().public_key().raw.to_vec()
    }

    /// The SubjectPublicKeyInfo DER of a CSR.
    fn csr_spki(csr_pem: &str) -> Vec<u8> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap();
        let (_, csr) = X509CertificationRequest::from_der(der.as_ref()).unwrap();
        csr.certification_request_info.subject_pki.raw.to_vec()
    }

    #[test]
    fn ca_extension_csrs_refused() {
        let ca = ClusterCa::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = csr_with(&params, &rcgen::PKCS_ECDSA_P384_SHA384);
        assert!(matches!(ca.sign_agent_csr(&csr, "n1", YEAR), Err(CsrError::CaRequested("basicConstraints CA:TRUE"))));

        let mut params = CertificateParams::default();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
        let csr = csr_with(&params, &rcgen::PKCS_ECDSA_P384_SHA384);
        assert!(matches!(ca.sign_agent_csr(&csr, "n1", YEAR), Err(CsrError::CaRequested("keyUsage keyCertSign"))));

        let mut params = CertificateParams::default();
        params.key_usages = vec![KeyUsagePurpose::CrlSign];
        let csr = csr_with(&params, &rcgen::PKCS_ECDSA_P384_SHA384);
        assert!(matches!(ca.sign_agent_csr(&csr, "n1", YEAR), Err(CsrError::CaRequested("keyUsage cRLSign"))));

        let nc = include_str!("testdata/p256-nameconstraints.csr");
        assert!(matches!(ca.sign_agent_csr(nc, "n1", YEAR), Err(CsrError::CaRequested("nameConstraints"))));

        // An explicit CA:FALSE and an ordinary key usage are fine.
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let csr = csr_with(&params, &rcgen::PKCS_ECDSA_P256_SHA256);
        ca.sign_agent_csr(&csr, "n1", YEAR).unwrap();
    }

    #[test]
    fn bad_key_types_refused() {
        let ca = ClusterCa::generate().unwrap();
        for (csr, want) in [
            (include_str!("testdata/rsa1024.csr"), "RSA 1024 bits"),
            (include_str!("testdata/p521.csr"), "ECDSA on curve 1.3.132.0.35"),
            (include_str!("testdata/ed448.csr"), "key algorithm 1.3.101.113"),
        ] {
            match ca.sign_agent_csr(csr, "n1", YEAR) {
                Err(CsrError::UnsupportedKeyType(got)) => assert_eq!(got, want),
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_signature_refused() {
        let ca = ClusterCa::generate().unwrap();
        let (_, csr_pem) = generate_agent_key_and_csr("n1").unwrap();
        let mut der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap().as_ref().to_vec();
        // Flip a byte inside the signed subject (the CN "node-n1" near the start).
        let pos = der.windows(7).position(|w| w == b"node-n1").expect("CN in CSR");
        der[pos + 5] = b'x';
        let tampered = crate::pem::encode_pem("CERTIFICATE REQUEST", &der);
        assert!(matches!(ca.sign_agent_csr(&tampered, "n1", YEAR), Err(CsrError::BadSignature(_))));
    }

    #[test]
    fn node_names_and_sans_validated() {
        let ca = ClusterCa::generate().unwrap();
        let (_, csr) = generate_agent_key_and_csr("ok").unwrap();
        for bad in ["", "-a", "a-", "UPPER", "a.b", &"x".repeat(64)] {
            assert!(matches!(ca.sign_agent_csr(&csr, bad, YEAR), Err(CsrError::InvalidNodeName { .. })), "{bad:?}");
            assert!(generate_agent_key_and_csr(bad).is_err());
        }
    }

    #[test]
    fn garbage_csrs_refused_without_panic() {
        let ca = ClusterCa::generate().unwrap();
        let (_, good) = generate_agent_key_and_csr("n1").unwrap();
        let good_der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap().as_ref().to_vec();
        let mut inputs = vec![
            String::new(),
            "garbage".to_string(),
            "-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n".into(),
            "-----BEGIN CERTIFICATE REQUEST-----\n%%%%\n-----END CERTIFICATE REQUEST-----\n".into(),
            "-----BEGIN CERTIFICATE REQUEST-----\nMIIB".into(),
            ca.cert_pem().to_string(),
            crate::pem::encode_pem("CERTIFICATE REQUEST", &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            crate::pem::encode_pem("CERTIFICATE REQUEST", &[0u8; 100]),
            "A".repeat(MAX_CSR_PEM_BYTES + 1),
        ];
        let mut trailing = good_der.clone();
        trailing.push(0);
        inputs.push(crate::pem::encode_pem("CERTIFICATE REQUEST", &trailing));
        for n in (0..good_der.len()).step_by(5) {
            inputs.push(crate::pem::encode_pem("CERTIFICATE REQUEST", &good_der[..n]));
        }
        for i in (0..good_der.len()).step_by(3) {
            let mut d = good_der.clone();
            d[i] ^= 0xff;
            inputs.push(crate::pem::encode_pem("CERTIFICATE REQUEST", &d));
        }
        for junk in &inputs {
            assert!(ca.sign_agent_csr(junk, "n1", YEAR).is_err(), "accepted {junk:?}");
        }
        assert!(matches!(
            ca.sign_agent_csr(&"A".repeat(MAX_CSR_PEM_BYTES + 1), "n1", YEAR),
            Err(CsrError::TooLarge(_))
        ));
    }
}

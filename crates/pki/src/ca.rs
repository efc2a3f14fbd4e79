//! The cluster CA: generation, PEM round trip, fingerprint and leaf issuing.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::error::PkiError;
use crate::fingerprint::{format_fingerprint, sha256, to_hex};
use crate::names::San;
use crate::pem::{encode_pem, first_cert_from_pem, parse_x509};

/// Common name of the cluster CA.
pub const CA_COMMON_NAME: &str = "otherix-cluster-ca";

/// Validity of a freshly generated cluster CA (about 10 years).
pub const CA_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);

/// How far back `notBefore` is set on issued certificates, to tolerate clock skew.
pub(crate) const BACKDATE: time::Duration = time::Duration::minutes(5);

/// The cluster certificate authority: certificate and signing key (ECDSA P-384).
pub struct ClusterCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    fingerprint: [u8; 32],
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &format_fingerprint(&self.fingerprint))
            .field("key", &"[elided]")
            .finish()
    }
}

/// A leaf certificate as issued: what the caller stores or returns.
pub(crate) struct IssuedLeaf {
    pub cert_pem: String,
    pub serial_hex: String,
    pub fingerprint_sha256: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The leaf profile: subject CN, SANs, validity, and whether it may serve TLS.
pub(crate) struct LeafSpec {
    pub common_name: String,
    pub sans: Vec<San>,
    /// serverAuth in the extended key usage (replicas); clientAuth is always there.
    pub server_auth: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// Now, truncated to whole seconds (X.509 times have second precision).
pub(crate) fn now_utc() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// Adds a std duration to a time, saturating far in the future.
pub(crate) fn add_validity(start: OffsetDateTime, validity: Duration) -> OffsetDateTime {
    let d = time::Duration::try_from(validity).unwrap_or(time::Duration::days(365 * 100));
    start.checked_add(d).unwrap_or_else(|| start + time::Duration::days(365 * 100))
}

fn random_serial() -> Result<(SerialNumber, String), String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| e.to_string())?;
    // Positive and minimal as a DER INTEGER, so the hex equals what parsers print.
    b[0] = (b[0] & 0x7f).max(1);
    Ok((SerialNumber::from_slice(&b), to_hex(&b)))
}

impl ClusterCa {
    /// Generates a new CA: ECDSA P-384, CN `otherix-cluster-ca`, ~10 years, keyCertSign/cRLSign.
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(|e| PkiError::KeyGen(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CA_COMMON_NAME);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = add_validity(now, CA_VALIDITY);
        let (serial, _) = random_serial().map_err(PkiError::KeyGen)?;
        params.serial_number = Some(serial);
        let cert = params.self_signed(&key).map_err(|e| PkiError::Sign(e.to_string()))?;
        Self::from_parts(cert.der().clone(), key)
    }

    /// Loads a CA from its certificate PEM and private key PEM (as stored in etcd), checking
    /// that the certificate is a CA and that the key belongs to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let der = first_cert_from_pem(cert_pem).map_err(PkiError::Pem)?;
        if key_pem.len() > crate::pem::MAX_PEM_BYTES {
            return Err(PkiError::Key("PEM input too large".into()));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Key(e.to_string()))?;
        Self::from_parts(der, key)
    }

    fn from_parts(der: CertificateDer<'static>, key: KeyPair) -> Result<Self, PkiError> {
        {
            let x509 = parse_x509(&der).map_err(PkiError::Certificate)?;
            match x509.basic_constraints() {
                Ok(Some(bc)) if bc.value.ca => {}
                Ok(_) => return Err(PkiError::NotCa("basic constraints do not say CA")),
                Err(e) => return Err(PkiError::Certificate(e.to_string())),
            }
            match x509.key_usage() {
                Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                    return Err(PkiError::NotCa("key usage lacks keyCertSign"));
                }
                Ok(_) => {}
                Err(e) => return Err(PkiError::Certificate(e.to_string())),
            }
            if x509.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
                return Err(PkiError::KeyMismatch);
            }
        }
        let key_pem = key.serialize_pem();
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| PkiError::Certificate(e.to_string()))?;
        Ok(ClusterCa {
            cert_pem: encode_pem("CERTIFICATE", &der),
            fingerprint: sha256(&der),
            cert_der: der,
            key_pem,
            issuer,
        })
    }

    /// The CA certificate and private key as PEM: `(cert_pem, key_pem)`.
    pub fn to_pem(&self) -> (String, String) {
        (self.cert_pem.clone(), self.key_pem.clone())
    }

    /// The CA certificate as PEM (public; served by `GetCa`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate as DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// sha256 of the CA certificate DER, lower-case hex without prefix.
    pub fn fingerprint_sha256(&self) -> String {
        to_hex(&self.fingerprint)
    }

    /// sha256 of the CA certificate DER as raw bytes.
    pub fn fingerprint_bytes(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Signs a leaf for `public_key` with the given profile; not a CA, EKU clientAuth, plus
    /// serverAuth when the profile says so.
    pub(crate) fn issue_leaf(&self, public_key: &impl PublicKeyData, spec: &LeafSpec) -> Result<IssuedLeaf, String> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.common_name.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names =
            spec.sans.iter().map(|s| s.to_rcgen().map_err(|r| format!("SAN {s}: {r}"))).collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if spec.server_auth {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let (serial, serial_hex) = random_serial()?;
        params.serial_number = Some(serial);
        let cert = params.signed_by(public_key, &self.issuer).map_err(|e| e.to_string())?;
        Ok(IssuedLeaf {
            cert_pem: cert.pem(),
            serial_hex,
            fingerprint_sha256: to_hex(&sha256(cert.der())),
            not_before: spec.not_before.into(),
            not_after: spec.not_after.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_round_trip_through_pem() {
        let ca = ClusterCa::generate().unwrap();
        let (cert_pem, key_pem) = ca.to_pem();
        assert!(cert_pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(key_pem.contains("PRIVATE KEY"));
        let again = ClusterCa::from_pem(&cert_pem, &key_pem).unwrap();
        assert_eq!(again.fingerprint_sha256(), ca.fingerprint_sha256());
        assert_eq!(again.to_pem(), ca.to_pem());
        assert_eq!(ca.fingerprint_sha256().len(), 64);
        assert_eq!(ca.fingerprint_sha256(), to_hex(&sha256(ca.cert_der().as_ref())));

        let x = parse_x509(ca.cert_der()).unwrap();
        let cn: Vec<_> = x.subject().iter_common_name().map(|c| c.as_str().unwrap().to_string()).collect();
        assert_eq!(cn, [CA_COMMON_NAME]);
        assert!(x.is_ca());
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let years = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp()) / (365 * 24 * 3600);
        assert!((9..=10).contains(&years), "{years}");
        assert_eq!(x.public_key().algorithm.algorithm, x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY);
        assert_eq!(
            x.public_key().algorithm.parameters.as_ref().unwrap().as_oid().unwrap(),
            x509_parser::oid_registry::OID_NIST_EC_P384
        );
        // The same CA after a PEM round trip signs certs that chain to the original.
        let c = again.issue_server_cert(&["localhost".to_string()], Duration::from_secs(3600)).unwrap();
        crate::verify_chain(&c.cert_pem, ca.cert_pem()).unwrap();
    }

    #[test]
    fn from_pem_refuses_mismatched_key_leaf_and_garbage() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        let (cert_pem, _) = ca.to_pem();
        let (_, other_key) = other.to_pem();
        assert!(matches!(ClusterCa::from_pem(&cert_pem, &other_key), Err(PkiError::KeyMismatch)));
        let leaf = ca.issue_server_cert(&["localhost".to_string()], Duration::from_secs(3600)).unwrap();
        assert!(matches!(ClusterCa::from_pem(&leaf.cert_pem, &leaf.key_pem), Err(PkiError::NotCa(_))));
        for junk in [
            "",
            "garbage",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        ] {
            assert!(ClusterCa::from_pem(junk, &other_key).is_err(), "{junk:?}");
            assert!(ClusterCa::from_pem(&cert_pem, junk).is_err(), "{junk:?}");
        }
    }
}

//! The X509-SVID rules (SPIFFE X509-SVID specification, section 4): what a leaf certificate must
//! be before its SPIFFE ID can be trusted. Chain validation is `tapproof-tls`'s job; this module
//! reads one DER certificate and says which identity it claims, or why it claims none.

use crate::spiffe::{SpiffeId, SpiffeIdError};
use x509_parser::prelude::*;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    #[error("certificate has no URI SAN, so it carries no SPIFFE ID")]
    NoUriSan,
    #[error("certificate has {0} URI SANs; an X509-SVID must have exactly one")]
    ManyUriSans(usize),
    #[error("certificate's URI SAN {uri:?} is not a valid SPIFFE ID: {source}")]
    BadSpiffeId { uri: String, source: SpiffeIdError },
    #[error("certificate is a CA (basicConstraints CA:true); a leaf SVID must not be")]
    IsCa,
    #[error("certificate has no keyUsage extension; a leaf SVID must set digitalSignature")]
    NoKeyUsage,
    #[error("certificate's keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("certificate's keyUsage sets keyCertSign or cRLSign, which a leaf SVID must not")]
    SigningUsage,
}

/// What a valid leaf SVID says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    pub id: SpiffeId,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    /// Hex, as `openssl x509 -serial` prints it (no separators).
    pub serial: String,
    /// Whether the certificate may authenticate a TLS server and a TLS client (`true` for both
    /// when it has no extendedKeyUsage extension: any purpose). rustls refuses a peer whose
    /// certificate lacks the purpose of its side.
    pub server_auth: bool,
    pub client_auth: bool,
    /// The TLS 1.3 signature scheme this certificate's key signs a handshake with (its name as
    /// IANA writes it, `ecdsa_secp256r1_sha256`, `mldsa87`, ...): TLS 1.3 fixes it by the key for
    /// ECDSA, EdDSA and ML-DSA; for RSA only the family is known (`rsa_pss_rsae`).
    pub signature_scheme: &'static str,
}

/// The TLS 1.3 signature scheme of a certificate's key (see `SvidInfo::signature_scheme`).
fn signature_scheme(cert: &X509Certificate) -> &'static str {
    let spki = &cert.public_key().algorithm;
    let curve = spki
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    match (spki.algorithm.to_id_string().as_str(), curve.as_deref()) {
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => "ecdsa_secp256r1_sha256",
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => "ecdsa_secp384r1_sha384",
        ("1.2.840.10045.2.1", Some("1.3.132.0.35")) => "ecdsa_secp521r1_sha512",
        ("1.3.101.112", _) => "ed25519",
        ("1.2.840.113549.1.1.1", _) => "rsa_pss_rsae",
        ("2.16.840.1.101.3.4.3.17", _) => "mldsa44",
        ("2.16.840.1.101.3.4.3.18", _) => "mldsa65",
        (crate::ca::ML_DSA_87_OID, _) => "mldsa87",
        _ => "unknown",
    }
}

/// Applies the leaf X509-SVID rules to `der` and returns the identity it carries.
pub fn inspect_svid(der: &[u8]) -> Result<SvidInfo, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    let malformed = |e: X509Error| SvidError::Malformed(e.to_string());

    let uris: Vec<&str> = match cert.subject_alternative_name().map_err(malformed)? {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => *one,
        many => return Err(SvidError::ManyUriSans(many.len())),
    };
    let id = SpiffeId::parse(uri).map_err(|source| SvidError::BadSpiffeId {
        uri: uri.to_owned(),
        source,
    })?;

    if let Some(bc) = cert.basic_constraints().map_err(malformed)? {
        if bc.value.ca {
            return Err(SvidError::IsCa);
        }
    }
    let ku = cert
        .key_usage()
        .map_err(malformed)?
        .ok_or(SvidError::NoKeyUsage)?;
    if !ku.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(SvidError::SigningUsage);
    }

    let serial = cert.raw_serial().iter().map(|b| format!("{b:02X}")).collect();
    let (server_auth, client_auth) = match cert.extended_key_usage().map_err(malformed)? {
        Some(eku) => (
            eku.value.any || eku.value.server_auth,
            eku.value.any || eku.value.client_auth,
        ),
        None => (true, true),
    };
    Ok(SvidInfo {
        server_auth,
        client_auth,
        id,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial,
        signature_scheme: signature_scheme(&cert),
    })
}

/// Subject and subject alternative names (`O=example.org, SAN spiffe://...`) and expiry (Unix
/// seconds) of any X.509 certificate: what the audit's TLS probe reports about a server it does
/// not trust.
pub fn cert_summary(der: &[u8]) -> Option<(String, i64)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut parts = Vec::new();
    let subject = cert.subject().to_string();
    if !subject.is_empty() {
        parts.push(subject);
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => u.to_string(),
                x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                other => other.to_string(),
            })
            .collect();
        if !names.is_empty() {
            parts.push(format!("SAN {}", names.join(" ")));
        }
    }
    Some((parts.join(", "), cert.validity().not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
    };

    fn cert(sans: Vec<SanType>, ca: bool, usages: Vec<KeyUsagePurpose>) -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.is_ca = if ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        p.key_usages = usages;
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn accepts_a_leaf_svid() {
        let der = cert(
            vec![
                uri("spiffe://example.org/node/a"),
                SanType::DnsName("a.example.org".try_into().unwrap()),
            ],
            false,
            vec![KeyUsagePurpose::DigitalSignature],
        );
        let info = inspect_svid(&der).unwrap();
        assert_eq!(info.id.to_string(), "spiffe://example.org/node/a");
        assert!(info.not_after > info.not_before);
        assert!(!info.serial.is_empty());
    }

    #[test]
    fn rejects_what_the_svid_spec_forbids() {
        let ds = vec![KeyUsagePurpose::DigitalSignature];
        assert_eq!(
            inspect_svid(&cert(vec![], false, ds.clone())),
            Err(SvidError::NoUriSan)
        );
        assert_eq!(
            inspect_svid(&cert(
                vec![uri("spiffe://example.org/a"), uri("spiffe://example.org/b")],
                false,
                ds.clone()
            )),
            Err(SvidError::ManyUriSans(2))
        );
        assert!(matches!(
            inspect_svid(&cert(vec![uri("https://example.org/a")], false, ds.clone())),
            Err(SvidError::BadSpiffeId { .. })
        ));
        assert_eq!(
            inspect_svid(&cert(vec![uri("spiffe://example.org/a")], true, ds.clone())),
            Err(SvidError::IsCa)
        );
        assert_eq!(
            inspect_svid(&cert(vec![uri("spiffe://example.org/a")], false, vec![])),
            Err(SvidError::NoKeyUsage)
        );
        assert_eq!(
            inspect_svid(&cert(
                vec![uri("spiffe://example.org/a")],
                false,
                vec![KeyUsagePurpose::KeyEncipherment]
            )),
            Err(SvidError::NoDigitalSignature)
        );
        assert_eq!(
            inspect_svid(&cert(
                vec![uri("spiffe://example.org/a")],
                false,
                vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign]
            )),
            Err(SvidError::SigningUsage)
        );
    }

    #[test]
    fn rejects_garbage_and_truncated_der() {
        assert!(matches!(
            inspect_svid(b"not a cert"),
            Err(SvidError::Malformed(_))
        ));
        let der = cert(
            vec![uri("spiffe://example.org/a")],
            false,
            vec![KeyUsagePurpose::DigitalSignature],
        );
        for cut in [1, der.len() / 2, der.len() - 1] {
            assert!(matches!(inspect_svid(&der[..cut]), Err(SvidError::Malformed(_))));
        }
    }
}

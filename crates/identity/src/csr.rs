//! Checks on certificate signing requests from nodes. The CA decides every field of the
//! certificate itself; from a CSR it takes only the public key, after checking that the CSR is
//! well formed, self-signed by that key, uses a key type we accept, and asks for nothing beyond
//! the one identity being issued.

use crate::ca::ML_DSA_87_OID;
use crate::spiffe::SpiffeId;
use rcgen::{CertificateSigningRequestParams, PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use rustls_pki_types::CertificateSigningRequestDer;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not valid PEM or DER, or its signature does not verify: {0}")]
    Malformed(String),
    #[error("CSR key type {0} is not accepted; use ECDSA P-256, Ed25519 or ML-DSA-87")]
    KeyType(String),
    #[error("CSR asks for {0}, which is not a SPIFFE URI; a CSR may name only the identity being issued")]
    ExtraSan(String),
    #[error("CSR asks for {count} identities; it may name only one")]
    ManySans { count: usize },
    #[error("CSR asks for {requested}, which is in another trust domain than {expected}")]
    ForeignTrustDomain { requested: String, expected: SpiffeId },
    #[error("CSR asks for {requested}, but this request may only be issued {expected}")]
    WrongIdentity { requested: String, expected: SpiffeId },
}

/// The public key a CSR carries, as the CA signs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrKey {
    algorithm: &'static rcgen::SignatureAlgorithm,
    /// The subjectPublicKey bits.
    key: Vec<u8>,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.key
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

/// Parses a PEM or DER CSR and returns its public key if it may be issued `expected`.
pub fn check_csr(csr: &[u8], expected: &SpiffeId) -> Result<CsrKey, CsrError> {
    let der = if csr.starts_with(b"-----BEGIN") {
        use rustls_pki_types::pem::PemObject;
        CertificateSigningRequestDer::from_pem_slice(csr).map_err(|e| CsrError::Malformed(e.to_string()))?
    } else {
        CertificateSigningRequestDer::from(csr.to_vec())
    };
    let (key, sans) = match ml_dsa_87(&der)? {
        Some(checked) => checked,
        None => {
            let parsed = CertificateSigningRequestParams::from_der(&der)
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
            let alg: &'static rcgen::SignatureAlgorithm = PublicKeyData::algorithm(&parsed.public_key);
            if alg != &PKCS_ECDSA_P256_SHA256 && alg != &PKCS_ED25519 {
                let name = if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
                    "ECDSA P-384"
                } else if [
                    &rcgen::PKCS_RSA_SHA256,
                    &rcgen::PKCS_RSA_SHA384,
                    &rcgen::PKCS_RSA_SHA512,
                ]
                .contains(&alg)
                {
                    "RSA"
                } else {
                    "(an algorithm tapproof does not know)"
                };
                return Err(CsrError::KeyType(name.into()));
            }
            let key = CsrKey {
                algorithm: alg,
                key: parsed.public_key.der_bytes().to_vec(),
            };
            (key, parsed.params.subject_alt_names)
        }
    };
    check_sans(&sans, expected)?;
    Ok(key)
}

/// A CSR signed with ML-DSA-87, checked here: rcgen verifies CSRs through x509-parser, which
/// knows no ML-DSA, so the signature is verified with aws-lc-rs (as rcgen signs). `None` for a
/// CSR of another algorithm.
fn ml_dsa_87(der: &[u8]) -> Result<Option<(CsrKey, Vec<SanType>)>, CsrError> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;
    let malformed = |e: &dyn std::fmt::Display| CsrError::Malformed(e.to_string());
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| malformed(&e))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed("trailing bytes after the CSR".into()));
    }
    if csr.signature_algorithm.algorithm.to_id_string() != ML_DSA_87_OID {
        return Ok(None);
    }
    let info = &csr.certification_request_info;
    if info.subject_pki.algorithm.algorithm.to_id_string() != ML_DSA_87_OID {
        return Err(CsrError::Malformed(
            "signed with ML-DSA-87 by a key of another algorithm".into(),
        ));
    }
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ML_DSA_87,
        info.subject_pki.subject_public_key.data.as_ref(),
    )
    .verify(info.raw, csr.signature_value.data.as_ref())
    .map_err(|_| CsrError::Malformed("its ML-DSA-87 signature does not verify".into()))?;
    let mut sans = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        let ParsedExtension::SubjectAlternativeName(names) = ext else {
            continue;
        };
        for name in &names.general_names {
            sans.push(match name {
                GeneralName::URI(uri) => SanType::URI((*uri).try_into().map_err(|e| malformed(&e))?),
                GeneralName::DNSName(dns) => SanType::DnsName((*dns).try_into().map_err(|e| malformed(&e))?),
                GeneralName::RFC822Name(mail) => {
                    SanType::Rfc822Name((*mail).try_into().map_err(|e| malformed(&e))?)
                }
                other => return Err(CsrError::ExtraSan(format!("{other}"))),
            });
        }
    }
    let key = CsrKey {
        algorithm: &rcgen::PKCS_ML_DSA_87,
        key: info.subject_pki.subject_public_key.data.to_vec(),
    };
    Ok(Some((key, sans)))
}

/// A CSR may name nothing, or exactly `expected`.
fn check_sans(sans: &[SanType], expected: &SpiffeId) -> Result<(), CsrError> {
    if sans.len() > 1 {
        return Err(CsrError::ManySans { count: sans.len() });
    }
    if let Some(san) = sans.first() {
        let SanType::URI(uri) = san else {
            return Err(CsrError::ExtraSan(match san {
                SanType::DnsName(name) => format!("DNS name {}", name.as_str()),
                SanType::IpAddress(ip) => format!("IP address {ip}"),
                SanType::Rfc822Name(mail) => format!("e-mail address {}", mail.as_str()),
                _ => "a subject alternative name of another kind".into(),
            }));
        };
        let uri = uri.as_str();
        match SpiffeId::parse(uri) {
            Ok(id) if &id == expected => {}
            Ok(id) if id.trust_domain() != expected.trust_domain() => {
                return Err(CsrError::ForeignTrustDomain {
                    requested: uri.to_owned(),
                    expected: expected.clone(),
                })
            }
            _ => {
                return Err(CsrError::WrongIdentity {
                    requested: uri.to_owned(),
                    expected: expected.clone(),
                })
            }
        }
    }
    Ok(())
}

/// Makes a CSR with a new ECDSA P-256 key; returns (CSR PEM, key PEM). The agent's side. With no
/// `id` (at join, when the server decides the node's name) the CSR names no identity.
pub fn new_csr(id: Option<&SpiffeId>) -> Result<(String, String), rcgen::Error> {
    new_csr_with(id, crate::KeyAlgorithm::EcdsaP256)
}

/// The same with a new key of `algorithm` (ML-DSA-87 for the `cnsa2` profile).
pub fn new_csr_with(
    id: Option<&SpiffeId>,
    algorithm: crate::KeyAlgorithm,
) -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(algorithm.rcgen())?;
    let mut params = rcgen::CertificateParams::default();
    if let Some(id) = id {
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    }
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P384_SHA384};

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn csr_with(alg: &'static rcgen::SignatureAlgorithm, sans: Vec<SanType>) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn accepts_the_agents_own_csrs() {
        let want = id("spiffe://example.org/node/web-1");
        let (csr, key) = new_csr(Some(&want)).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        check_csr(csr.as_bytes(), &want).unwrap();
        // No SAN at all is fine too: the CA decides the identity.
        check_csr(csr_with(&PKCS_ED25519, vec![]).as_bytes(), &want).unwrap();
        let (csr, _) = new_csr_with(Some(&want), crate::KeyAlgorithm::MlDsa87).unwrap();
        assert_eq!(
            check_csr(csr.as_bytes(), &want).unwrap().algorithm(),
            &rcgen::PKCS_ML_DSA_87
        );
    }

    #[test]
    fn refuses_what_it_must_not_sign() {
        let want = id("spiffe://example.org/node/web-1");
        let cases = [
            (csr_with(&PKCS_ECDSA_P384_SHA384, vec![]), "key type"),
            (
                csr_with(
                    &PKCS_ECDSA_P256_SHA256,
                    vec![
                        uri("spiffe://example.org/node/web-1"),
                        uri("spiffe://example.org/svc/x"),
                    ],
                ),
                "only one",
            ),
            (
                csr_with(
                    &PKCS_ECDSA_P256_SHA256,
                    vec![SanType::DnsName("web-1.example.org".try_into().unwrap())],
                ),
                "not a SPIFFE URI",
            ),
            (
                csr_with(&PKCS_ECDSA_P256_SHA256, vec![uri("spiffe://evil.org/node/web-1")]),
                "another trust domain",
            ),
            (
                csr_with(
                    &PKCS_ECDSA_P256_SHA256,
                    vec![uri("spiffe://example.org/node/db-1")],
                ),
                "may only be issued",
            ),
        ];
        for (csr, want_msg) in cases {
            let e = check_csr(csr.as_bytes(), &want).unwrap_err().to_string();
            assert!(e.contains(want_msg), "{want_msg}: {e}");
        }
    }

    #[test]
    fn refuses_garbage_and_tampered_csrs() {
        let want = id("spiffe://example.org/node/web-1");
        assert!(matches!(
            check_csr(b"not a csr", &want),
            Err(CsrError::Malformed(_))
        ));
        let (pem, _) = new_csr(Some(&want)).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|d: CertificateSigningRequestDer<'static>| d.as_ref().to_vec())
            .unwrap();
        for i in [10, der.len() / 2, der.len() - 5] {
            let mut bad = der.clone();
            bad[i] ^= 0x40;
            assert!(
                check_csr(&bad, &want).is_err(),
                "flipped byte {i} must be refused"
            );
        }
        assert!(check_csr(&der[..der.len() - 1], &want).is_err());
    }
}

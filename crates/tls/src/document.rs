//! Signed documents (the evidence export): a signature made by a leaf of the trust domain's CA,
//! checked offline. The chain is checked by the same webpki client verifier the tunnels use, as
//! of the time the document says it was signed, then the leaf must be an X509-SVID of the trust
//! domain (`verify::check_svid`), then the signature must verify with the leaf's key under the
//! scheme that key signs with (`SvidInfo::signature_scheme`).

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, SignatureScheme};
use std::sync::Arc;
use tapproof_identity::{inspect_svid, SpiffeId, TrustDomain};

/// Why a document's signature is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum DocumentSignatureError {
    #[error("the signing chain is not PEM certificates: {0}")]
    Chain(String),
    #[error("the trust bundle holds no usable root: {0}")]
    Bundle(String),
    #[error("the signing certificate does not chain to the trust bundle (as of the signing time): {0}")]
    Untrusted(String),
    #[error("the signing certificate is not an identity of trust domain {td}: {detail}")]
    NotOurs { td: TrustDomain, detail: String },
    #[error("the signature scheme {0:?} is not one a tapproof CA signs with")]
    Scheme(String),
    #[error("the signature does not match the signed bytes (they were changed, or signed by another key)")]
    Mismatch,
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate".into());
    }
    Ok(certs)
}

/// The TLS name of the scheme a key signs with (as `SvidInfo::signature_scheme` names it).
fn scheme(name: &str) -> Option<SignatureScheme> {
    Some(match name {
        "ecdsa_secp256r1_sha256" => SignatureScheme::ECDSA_NISTP256_SHA256,
        "ecdsa_secp384r1_sha384" => SignatureScheme::ECDSA_NISTP384_SHA384,
        "ed25519" => SignatureScheme::ED25519,
        "mldsa87" => SignatureScheme::ML_DSA_87,
        _ => return None,
    })
}

/// Checks that `signature` over `msg` was made by the leaf of `chain_pem`, an identity of `td`
/// chaining to one of `roots_pem` as of `signed_at` (Unix seconds). Returns the signer's ID and
/// the scheme's name.
pub fn verify_document_signature(
    chain_pem: &str,
    roots_pem: &str,
    td: &TrustDomain,
    signed_at: i64,
    msg: &[u8],
    signature: &[u8],
) -> Result<(SpiffeId, &'static str), DocumentSignatureError> {
    let chain = certs(chain_pem).map_err(DocumentSignatureError::Chain)?;
    let mut roots = RootCertStore::empty();
    for root in certs(roots_pem).map_err(DocumentSignatureError::Bundle)? {
        roots
            .add(root)
            .map_err(|e| DocumentSignatureError::Bundle(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| DocumentSignatureError::Bundle(e.to_string()))?;
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(signed_at).unwrap_or_default(),
    ));
    let (leaf, intermediates) = chain.split_first().expect("certs() returns at least one");
    verifier
        .verify_client_cert(leaf, intermediates, at)
        .map_err(|e| DocumentSignatureError::Untrusted(crate::tls_error_text(&e)))?;
    let id = crate::verify::check_svid(leaf, td).map_err(|e| DocumentSignatureError::NotOurs {
        td: td.clone(),
        detail: crate::tls_error_text(&e),
    })?;
    let name = inspect_svid(leaf)
        .map(|info| info.signature_scheme)
        .unwrap_or("unknown");
    let wanted = scheme(name).ok_or_else(|| DocumentSignatureError::Scheme(name.to_owned()))?;
    let cert =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| DocumentSignatureError::Chain(format!("{e:?}")))?;
    let verified = algorithms
        .mapping
        .iter()
        .filter(|(s, _)| *s == wanted)
        .flat_map(|(_, algs)| algs.iter())
        .any(|alg| cert.verify_signature(*alg, msg, signature).is_ok());
    if verified {
        Ok((id, name))
    } else {
        Err(DocumentSignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapproof_identity::{Authority, KeyAlgorithm};

    fn ca(td: &TrustDomain, algorithm: KeyAlgorithm) -> (Authority, String) {
        let root = Authority::new_root_with(td.clone(), time::Duration::days(1), algorithm).unwrap();
        let pem = root.cert_pem().to_owned();
        (root, pem)
    }

    #[test]
    fn a_document_signed_by_the_ca_verifies_and_nothing_else_does() {
        let td = TrustDomain::new("example.org").unwrap();
        let id = SpiffeId::parse("spiffe://example.org/server/evidence").unwrap();
        let now = tapproof_identity::when::now();
        for algorithm in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::MlDsa87] {
            let (root, bundle) = ca(&td, algorithm);
            let (chain, sig) = root
                .sign_once(&id, time::Duration::hours(1), b"the evidence")
                .unwrap();
            let (who, scheme) =
                verify_document_signature(&chain, &bundle, &td, now, b"the evidence", &sig).unwrap();
            assert_eq!(who, id);
            assert_eq!(
                scheme,
                match algorithm {
                    KeyAlgorithm::EcdsaP256 => "ecdsa_secp256r1_sha256",
                    KeyAlgorithm::MlDsa87 => "mldsa87",
                }
            );
            // One byte changed.
            let e = verify_document_signature(&chain, &bundle, &td, now, b"the evidencE", &sig).unwrap_err();
            assert!(matches!(e, DocumentSignatureError::Mismatch), "{e}");
            // Another CA's signature, checked against our bundle.
            let (other, _) = ca(&td, algorithm);
            let (their_chain, their_sig) = other
                .sign_once(&id, time::Duration::hours(1), b"the evidence")
                .unwrap();
            let e = verify_document_signature(&their_chain, &bundle, &td, now, b"the evidence", &their_sig)
                .unwrap_err();
            assert!(matches!(e, DocumentSignatureError::Untrusted(_)), "{e}");
            // Signed after the signing certificate expired.
            let e = verify_document_signature(&chain, &bundle, &td, now + 7200, b"the evidence", &sig)
                .unwrap_err();
            assert!(matches!(e, DocumentSignatureError::Untrusted(_)), "{e}");
        }
    }
}

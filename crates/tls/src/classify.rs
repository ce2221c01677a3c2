//! Sorts handshake failures into a small, stable set of reasons: the label values of the
//! `handshake_failures_total` metric and the `reason` field of the log line.

use crate::verify::SpiffeCheckError;
use rustls::{CertificateError, Error, PeerIncompatible};
use std::io;

pub fn failure_reason(err: &io::Error) -> &'static str {
    if err.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof => "eof",
            io::ErrorKind::InvalidData => "not_tls",
            _ => "io",
        };
    };
    match tls {
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => "not_tls",
        Error::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon)
        | Error::PeerIncompatible(PeerIncompatible::KeyShareExtensionRequired)
        | Error::PeerIncompatible(PeerIncompatible::NamedGroupsExtensionRequired) => "no_common_key_exchange",
        Error::PeerIncompatible(PeerIncompatible::NoCipherSuitesInCommon) => "no_common_cipher",
        // A `cnsa2` peer and one whose key cannot sign ML-DSA-87 (or the other way round).
        Error::PeerIncompatible(
            PeerIncompatible::NoSignatureSchemesInCommon
            | PeerIncompatible::NoCertificateRequestSignatureSchemesInCommon,
        ) => "no_common_signature",
        Error::PeerIncompatible(_) => "tls_version",
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(cert) => match cert {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "cert_expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "cert_not_yet_valid"
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_purpose"
            }
            CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::UnknownRevocationStatus => "unknown_ca",
            CertificateError::Other(other) => match other.0.downcast_ref::<SpiffeCheckError>() {
                Some(SpiffeCheckError::NotSvid(_)) => "not_svid",
                Some(SpiffeCheckError::ForeignTrustDomain { .. }) => "foreign_trust_domain",
                Some(SpiffeCheckError::UnexpectedPeer { .. }) => "wrong_peer_id",
                None => "bad_cert",
            },
            _ => "bad_cert",
        },
        Error::AlertReceived(_) => "alert_received",
        Error::DecryptError | Error::PeerMisbehaved(_) => "peer_misbehaved",
        _ => "other",
    }
}

/// A failed handshake (or any I/O error) in words for a log line: rustls' certificate errors
/// print as Rust debug text (`Other(OtherError(NameConstraintViolation))`), so they are said here.
pub fn failure_text(err: &io::Error) -> String {
    match err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(tls) => tls_error_text(tls),
        None => err.to_string(),
    }
}

/// A rustls error in words.
pub fn tls_error_text(err: &Error) -> String {
    let Error::InvalidCertificate(cert) = err else {
        return err.to_string();
    };
    let what = match cert {
        CertificateError::BadEncoding => "a certificate is not valid DER",
        CertificateError::Expired => "a certificate has expired",
        CertificateError::NotValidYet => "a certificate is not valid yet (check the clocks)",
        CertificateError::Revoked => "a certificate is revoked",
        CertificateError::UnhandledCriticalExtension => "a certificate has a critical extension that is not understood",
        CertificateError::UnknownIssuer => "the certificate chain does not lead to a trusted root (unknown issuer: a foreign CA, or an intermediate missing from the chain)",
        CertificateError::UnknownRevocationStatus => "a certificate's revocation status is unknown",
        CertificateError::BadSignature => "a certificate's signature does not verify",
        CertificateError::NotValidForName => "the certificate is not valid for the expected name",
        CertificateError::InvalidPurpose => "the certificate's extendedKeyUsage does not allow this use (a node identity needs serverAuth and clientAuth)",
        CertificateError::ApplicationVerificationFailure => "the certificate failed an application check",
        CertificateError::Other(other) => {
            if let Some(spiffe) = other.0.downcast_ref::<SpiffeCheckError>() {
                return format!("invalid peer certificate: {spiffe}");
            }
            return match other.0.downcast_ref::<webpki::Error>() {
                Some(webpki::Error::NameConstraintViolation) => "invalid peer certificate: an issuer's name constraints do not permit the certificate's name (a URI constraint must name the trust domain, e.g. permitted;URI:example.org; directory-name constraints are not supported)".into(),
                Some(webpki::Error::PathLenConstraintViolated) => "invalid peer certificate: the chain is longer than an issuer's pathLenConstraint allows".into(),
                Some(webpki::Error::CaUsedAsEndEntity) => "invalid peer certificate: a CA certificate was presented as the leaf".into(),
                Some(webpki::Error::EndEntityUsedAsCa) => "invalid peer certificate: a leaf certificate was used as an issuer".into(),
                Some(webpki::Error::MaximumPathDepthExceeded) => "invalid peer certificate: the chain is too long".into(),
                Some(e) => format!("invalid peer certificate: {e}"),
                None => format!("invalid peer certificate: {}", other.0),
            };
        }
        // The context variants (expired at, not valid before, wrong purpose, ...) already say
        // what they mean in rustls' own words.
        _ => return err.to_string(),
    };
    format!("invalid peer certificate: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::OtherError;
    use std::sync::Arc;

    #[test]
    fn certificate_errors_are_words_not_rust_debug_text() {
        let constrained = Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
            webpki::Error::NameConstraintViolation,
        ))));
        let text = tls_error_text(&constrained);
        assert!(text.contains("name constraints"), "{text}");
        assert!(
            !text.contains("OtherError") && !text.contains("NameConstraintViolation"),
            "{text}"
        );
        let unknown = tls_error_text(&Error::InvalidCertificate(CertificateError::UnknownIssuer));
        assert!(unknown.contains("does not lead to a trusted root"), "{unknown}");
        let io = io::Error::new(io::ErrorKind::InvalidData, constrained);
        assert_eq!(failure_text(&io), text);
        assert_eq!(
            failure_text(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            "unexpected end of file"
        );
    }
}

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

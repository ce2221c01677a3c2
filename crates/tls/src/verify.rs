//! SPIFFE peer verification. Chain building and signature checks are webpki's (through rustls);
//! on top, the leaf must be an X509-SVID of our trust domain, and on the client side it must be
//! exactly the identity the outbound expects. SPIFFE certificates carry no DNS name, so the
//! server-name check of the stock verifier is replaced, never skipped without a replacement.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme,
};
use std::sync::Arc;
use tapproof_identity::{inspect_svid, SpiffeId, SvidError, TrustDomain};

#[derive(Debug, thiserror::Error)]
pub enum SpiffeCheckError {
    #[error("peer certificate is not an X509-SVID: {0}")]
    NotSvid(SvidError),
    #[error("peer identity {id} is not in trust domain {expected}")]
    ForeignTrustDomain { id: SpiffeId, expected: TrustDomain },
    #[error("peer identity is {got}, expected {expected}")]
    UnexpectedPeer { got: SpiffeId, expected: SpiffeId },
}

pub(crate) fn reject(e: SpiffeCheckError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Checks the leaf is an SVID of `td` and returns its ID.
pub(crate) fn check_svid(
    end_entity: &CertificateDer<'_>,
    td: &TrustDomain,
) -> Result<SpiffeId, rustls::Error> {
    let info = inspect_svid(end_entity).map_err(|e| reject(SpiffeCheckError::NotSvid(e)))?;
    if info.id.trust_domain() != td {
        return Err(reject(SpiffeCheckError::ForeignTrustDomain {
            id: info.id,
            expected: td.clone(),
        }));
    }
    Ok(info.id)
}

/// Inbound side: the client must present an SVID of our trust domain chaining to the bundle.
/// Which IDs may open which service is policy, checked per stream by the agent.
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
    /// One verifier per federated trust domain, each with only that domain's roots.
    foreign: std::collections::BTreeMap<TrustDomain, Arc<dyn ClientCertVerifier>>,
    /// Seconds after its expiry a client certificate is still accepted (0: not at all). Only the
    /// control plane sets it, so an agent whose certificate expired during an outage can renew;
    /// what such a caller may do is the server's `authorize` (renewal only).
    expired_grace_s: u64,
}

impl SpiffeClientVerifier {
    pub(crate) fn new(
        roots: Arc<RootCertStore>,
        trust_domain: TrustDomain,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider).build()?;
        Ok(Self {
            inner,
            trust_domain,
            foreign: Default::default(),
            expired_grace_s: 0,
        })
    }

    /// Client certificates are checked when presented but not required (the control plane's join
    /// endpoint is authenticated by the token; its handlers require an identity everywhere else).
    /// `expired_grace`: how long after expiry a certificate still passes (see the field).
    pub(crate) fn optional(
        roots: Arc<RootCertStore>,
        trust_domain: TrustDomain,
        provider: Arc<CryptoProvider>,
        expired_grace: std::time::Duration,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .allow_unauthenticated()
            .build()?;
        Ok(Self {
            inner,
            trust_domain,
            foreign: Default::default(),
            expired_grace_s: expired_grace.as_secs(),
        })
    }

    /// Also accepts clients of the federated trust domains in `foreign`, each checked against
    /// its own domain's roots.
    pub(crate) fn federated(
        mut self,
        foreign: &crate::ForeignRoots,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        // Our own domain is never federated: its peers chain to our bundle only.
        for (td, roots) in foreign.iter().filter(|(td, _)| **td != self.trust_domain) {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
            self.foreign.insert(td.clone(), verifier);
        }
        Ok(self)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The roots are chosen by the trust domain the leaf claims: a federated domain's own
        // verifier for its IDs, ours for everything else (the chain is checked before the SVID
        // rules, so an unknown CA is reported as that whatever the certificate holds).
        let claimed = inspect_svid(end_entity)
            .ok()
            .map(|info| info.id.trust_domain().clone());
        if let Some((td, verifier)) = claimed.and_then(|td| self.foreign.get_key_value(&td)) {
            verifier.verify_client_cert(end_entity, intermediates, now)?;
            check_svid(end_entity, td)?;
            return Ok(ClientCertVerified::assertion());
        }
        match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Ok(_) => {}
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) if self.expired_grace_s > 0 => {
                // Within the grace window the chain is checked as of the leaf's last valid
                // second: everything but the leaf's expiry must hold (signatures, the roots,
                // the intermediates' own validity then).
                let expired = rustls::Error::InvalidCertificate(CertificateError::Expired);
                let info = inspect_svid(end_entity).map_err(|e| reject(SpiffeCheckError::NotSvid(e)))?;
                let not_after = u64::try_from(info.not_after).map_err(|_| expired.clone())?;
                if now.as_secs().saturating_sub(not_after) > self.expired_grace_s {
                    return Err(expired);
                }
                let then = UnixTime::since_unix_epoch(std::time::Duration::from_secs(not_after));
                self.inner.verify_client_cert(end_entity, intermediates, then)?;
            }
            Err(e) => return Err(e),
        }
        check_svid(end_entity, &self.trust_domain)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Outbound side: the server must chain to the bundle and prove exactly `expected`.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub(crate) fn new(roots: Arc<RootCertStore>, expected: SpiffeId, provider: Arc<CryptoProvider>) -> Self {
        Self {
            roots,
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let got = check_svid(end_entity, self.expected.trust_domain())?;
        if got != self.expected {
            return Err(reject(SpiffeCheckError::UnexpectedPeer {
                got,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

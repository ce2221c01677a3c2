//! TLS 1.3 client and server configurations built from the current material, and the accept and
//! connect calls the agent uses (so the agent never names rustls).

use crate::federation::ForeignRoots;
use crate::material::{Material, MaterialError};
use crate::provider::{crypto_provider, CryptoPolicy};
use crate::verify::{SpiffeClientVerifier, SpiffeServerVerifier};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::version::TLS13;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tapproof_identity::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

pub(crate) const ALPN_H2: &[u8] = b"h2";

#[derive(Debug)]
pub(crate) struct FixedCert(pub(crate) Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for FixedCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn build_error(e: impl std::fmt::Display) -> MaterialError {
    MaterialError::BadKey {
        path: Default::default(),
        detail: format!("cannot build TLS configuration: {e}"),
    }
}

/// Whether `material` can serve under `policy`: the `cnsa2` profile signs handshakes with
/// ML-DSA-87 only, so a node whose key cannot is refused here, before any peer sees it.
fn fit(material: &Material, policy: CryptoPolicy) -> Result<(), MaterialError> {
    if policy == CryptoPolicy::Cnsa2
        && material
            .certified
            .key
            .choose_scheme(&[SignatureScheme::ML_DSA_87])
            .is_none()
    {
        return Err(MaterialError::Profile {
            profile: "cnsa2",
            detail: "its key cannot sign with ML-DSA-87; make it an ML-DSA-87 identity from an ML-DSA-87 CA (`tapproof pki mint --profile cnsa2`, `tapproof server init --profile cnsa2`, or your own PKI)".into(),
        });
    }
    if policy == CryptoPolicy::Cnsa2
        && !tapproof_identity::signed_with_ml_dsa_87(material.certified.cert.iter().map(|c| c.as_ref()))
    {
        return Err(MaterialError::Profile {
            profile: "cnsa2",
            detail: "its certificate chain is not signed with ML-DSA-87 throughout, so cnsa2 peers would refuse it; it needs an ML-DSA-87 CA (`tapproof server init --profile cnsa2`, or `server ca rotate prepare --profile cnsa2` to roll an existing fleet over)".into(),
        });
    }
    Ok(())
}

/// The inbound (tunnel listener) side.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
}

impl ServerTls {
    pub fn new(material: &Material, kx: CryptoPolicy) -> Result<Self, MaterialError> {
        Self::federated(material, &ForeignRoots::default(), kx)
    }

    /// Also accepting clients of the federated trust domains in `foreign`.
    pub fn federated(
        material: &Material,
        foreign: &ForeignRoots,
        kx: CryptoPolicy,
    ) -> Result<Self, MaterialError> {
        fit(material, kx)?;
        let provider = crypto_provider(kx);
        let verifier = SpiffeClientVerifier::new(
            material.roots.clone(),
            material.trust_domain.clone(),
            provider.clone(),
        )
        .and_then(|v| v.federated(foreign, provider.clone()))
        .map_err(build_error)?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])
            .map_err(build_error)?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(FixedCert(material.certified.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }
}

/// The outbound side, bound to the one identity the peer must prove.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
}

impl ClientTls {
    pub fn new(
        material: &Material,
        expected_peer: SpiffeId,
        kx: CryptoPolicy,
    ) -> Result<Self, MaterialError> {
        Self::federated(material, &ForeignRoots::default(), expected_peer, kx)
    }

    /// The peer may be of a federated trust domain in `foreign`; it is then checked against that
    /// domain's roots only (ours only for our own domain; a domain in neither matches no root).
    pub fn federated(
        material: &Material,
        foreign: &ForeignRoots,
        expected_peer: SpiffeId,
        kx: CryptoPolicy,
    ) -> Result<Self, MaterialError> {
        fit(material, kx)?;
        let provider = crypto_provider(kx);
        let td = expected_peer.trust_domain();
        let roots = if *td == material.trust_domain {
            material.roots.clone()
        } else {
            foreign
                .store(td)
                .cloned()
                .unwrap_or_else(|| Arc::new(rustls::RootCertStore::empty()))
        };
        let verifier = SpiffeServerVerifier::new(roots, expected_peer, provider.clone());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])
            .map_err(build_error)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(FixedCert(material.certified.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // The peer is named by its SPIFFE ID, not a DNS name: send no SNI at all, so nothing about
        // the target appears on the wire before the handshake encrypts.
        config.enable_sni = false;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// The same, but never resuming a session: every handshake is a full one (benchmarks).
    pub fn without_resumption(
        material: &Material,
        expected_peer: SpiffeId,
        kx: CryptoPolicy,
    ) -> Result<Self, MaterialError> {
        let tls = Self::new(material, expected_peer, kx)?;
        let mut config = (*tls.connector.config().clone()).clone();
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }
}

/// Runs the server side of the handshake over any byte stream (TCP in the agent, in-memory pipes
/// in tests).
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
    tls: &ServerTls,
    io: IO,
) -> io::Result<tokio_rustls::server::TlsStream<IO>> {
    tls.acceptor.accept(io).await
}

pub async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
    tls: &ClientTls,
    io: IO,
    peer: SocketAddr,
) -> io::Result<tokio_rustls::client::TlsStream<IO>> {
    // With SNI disabled the name is only a key for the session cache, which is per ClientTls and
    // so per expected identity: a resumed session can never stand in for another identity.
    let name = rustls::pki_types::ServerName::IpAddress(peer.ip().into());
    tls.connector.connect(name, io).await
}

//! TLS for the control plane's API. The server presents `spiffe://<td>/server`, accepts client
//! certificates of its trust domain when offered (every endpoint but join requires one), and
//! speaks HTTP/2 or HTTP/1.1. Agents verify the server against the bundle they hold, or, before
//! they hold one (join), against the SHA-256 pin of the root carried in the join token.

use crate::material::IdentityFiles;
use crate::provider::{crypto_provider, CryptoPolicy};
use crate::verify::{check_svid, reject, SpiffeCheckError, SpiffeClientVerifier};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::version::TLS13;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tapproof_identity::{SpiffeId, TrustDomain};
use tokio::io::{AsyncRead, AsyncWrite};

#[derive(Debug, thiserror::Error)]
pub enum ControlTlsError {
    #[error("bad PEM in {what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("cannot build TLS configuration: {0}")]
    Config(String),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {detail}")]
    BadIdentity { path: PathBuf, detail: String },
}

fn pem_certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, ControlTlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| ControlTlsError::Pem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(ControlTlsError::Pem {
            what,
            detail: "no certificate".into(),
        });
    }
    Ok(certs)
}

fn roots_from(pems: &[String]) -> Result<Arc<RootCertStore>, ControlTlsError> {
    let mut roots = RootCertStore::empty();
    for pem in pems {
        for cert in pem_certs("trust bundle", pem)? {
            roots.add(cert).map_err(|e| ControlTlsError::Pem {
                what: "trust bundle",
                detail: e.to_string(),
            })?;
        }
    }
    Ok(Arc::new(roots))
}

/// SHA-256 of a certificate's DER: the root pin a join token carries.
pub fn cert_pin(pem: &str) -> Result<[u8; 32], ControlTlsError> {
    let der = pem_certs("root", pem)?.remove(0);
    Ok(sha256(&der))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// The control-plane server's TLS configuration.
#[derive(Clone)]
pub struct ControlServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl ControlServerTls {
    /// `chain_pem`: leaf first, then intermediates and the root (agents joining with only a pin
    /// find the root in the chain). `roots`: PEMs of every root clients may chain to.
    ///
    /// `expired_grace`: how long after its expiry a client certificate is still accepted, for
    /// renewal after an outage (0: never). The server decides what such a caller may do.
    pub fn new(
        chain_pem: &str,
        key_pem: &str,
        roots: &[String],
        td: &TrustDomain,
        expired_grace: std::time::Duration,
    ) -> Result<Self, ControlTlsError> {
        let provider = crypto_provider(CryptoPolicy::PreferPostQuantum);
        let chain = pem_certs("server certificate", chain_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| ControlTlsError::Pem {
            what: "server key",
            detail: e.to_string(),
        })?;
        let certified = CertifiedKey::from_der(chain, key, &provider)
            .map_err(|e| ControlTlsError::Config(e.to_string()))?;
        let verifier =
            SpiffeClientVerifier::optional(roots_from(roots)?, td.clone(), provider.clone(), expired_grace)
                .map_err(|e| ControlTlsError::Config(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])
            .map_err(|e| ControlTlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Accepts a connection and returns it with what the handshake negotiated, the client's
    /// SPIFFE ID and certificate serial among it (when it presented a certificate).
    pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: IO,
    ) -> io::Result<(tokio_rustls::server::TlsStream<IO>, crate::SessionInfo)> {
        let stream = self.acceptor.accept(io).await?;
        let session = crate::session::server_session(&stream);
        Ok((stream, session))
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// How an agent knows the control plane is genuine.
pub enum ServerTrust {
    /// Before joining: the root's SHA-256, from the join token.
    Pin([u8; 32]),
    /// After joining: the trust bundle's root PEMs.
    Bundle(Vec<String>),
    /// A federated trust domain's bundle endpoint: the roots held for the server ID's domain.
    Federated(crate::ForeignRoots),
}

/// The agent's side of the control-plane connection.
#[derive(Clone)]
pub struct ControlClientTls {
    connector: tokio_rustls::TlsConnector,
}

impl ControlClientTls {
    /// `identity`: (chain PEM, key PEM) to present, or none (join).
    pub fn new(
        trust: ServerTrust,
        server_id: SpiffeId,
        identity: Option<(&str, &str)>,
    ) -> Result<Self, ControlTlsError> {
        let provider = crypto_provider(CryptoPolicy::PreferPostQuantum);
        let roots = match &trust {
            ServerTrust::Pin(_) => None,
            ServerTrust::Bundle(pems) => Some(roots_from(pems)?),
            ServerTrust::Federated(foreign) => {
                Some(foreign.store(server_id.trust_domain()).cloned().ok_or_else(|| {
                    ControlTlsError::Config(format!("no bundle held for {}", server_id.trust_domain()))
                })?)
            }
        };
        let pin = match trust {
            ServerTrust::Pin(p) => Some(p),
            ServerTrust::Bundle(_) | ServerTrust::Federated(_) => None,
        };
        let verifier = ControlServerVerifier {
            pin,
            roots,
            server_id,
            provider: provider.clone(),
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&TLS13])
            .map_err(|e| ControlTlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match identity {
            Some((chain_pem, key_pem)) => {
                let chain = pem_certs("agent certificate", chain_pem)?;
                let key =
                    PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| ControlTlsError::Pem {
                        what: "agent key",
                        detail: e.to_string(),
                    })?;
                let certified = CertifiedKey::from_der(chain, key, &provider)
                    .map_err(|e| ControlTlsError::Config(e.to_string()))?;
                builder.with_client_cert_resolver(Arc::new(Fixed(Arc::new(certified))))
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.enable_sni = false;
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// A client presenting the identity in `files` (chain and key) that trusts `files.bundle` and
    /// expects the server at `spiffe://<the leaf's trust domain>/server`; with `trust_domain`, the
    /// leaf must belong to it. Also returns the leaf's SPIFFE ID. Agents, admin commands and the
    /// load generators all connect this way.
    pub fn from_files(
        files: &IdentityFiles,
        trust_domain: Option<&TrustDomain>,
    ) -> Result<(Self, SpiffeId), ControlTlsError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| ControlTlsError::Read {
                path: p.to_owned(),
                source,
            })
        };
        let (chain, key, bundle) = (read(&files.cert)?, read(&files.key)?, read(&files.bundle)?);
        let bad = |detail: String| ControlTlsError::BadIdentity {
            path: files.cert.clone(),
            detail,
        };
        let leaf = tapproof_identity::ca::first_der(&chain).map_err(bad)?;
        let id = tapproof_identity::inspect_svid(&leaf)
            .map_err(|e| bad(e.to_string()))?
            .id;
        if let Some(td) = trust_domain.filter(|td| *td != id.trust_domain()) {
            return Err(bad(format!(
                "holds an identity of {}, not {td}",
                id.trust_domain()
            )));
        }
        let server_id =
            SpiffeId::new(id.trust_domain().clone(), "/server").expect("\"/server\" is a valid path");
        let tls = Self::new(ServerTrust::Bundle(vec![bundle]), server_id, Some((&chain, &key)))?;
        Ok((tls, id))
    }

    pub async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: IO,
        peer: SocketAddr,
    ) -> io::Result<tokio_rustls::client::TlsStream<IO>> {
        self.connector
            .connect(ServerName::IpAddress(peer.ip().into()), io)
            .await
    }
}

#[derive(Debug)]
struct ControlServerVerifier {
    pin: Option<[u8; 32]>,
    roots: Option<Arc<RootCertStore>>,
    server_id: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ControlServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = match (&self.roots, &self.pin) {
            (Some(roots), _) => roots.clone(),
            (None, Some(pin)) => {
                // The pinned root must be among what the server sent; then it is the only anchor.
                let root = intermediates.iter().find(|c| &sha256(c) == pin).ok_or(
                    rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
                )?;
                let mut store = RootCertStore::empty();
                store.add(root.clone().into_owned())?;
                Arc::new(store)
            }
            (None, None) => return Err(rustls::Error::General("no trust configured".into())),
        };
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let got = check_svid(end_entity, self.server_id.trust_domain())?;
        if got != self.server_id {
            return Err(reject(SpiffeCheckError::UnexpectedPeer {
                got,
                expected: self.server_id.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

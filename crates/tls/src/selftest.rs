//! Self-test probes: connections to this node's own tunnel listener that must fail. Each one gets
//! one thing wrong on purpose (no TLS, TLS 1.2, no client certificate, a certificate of a foreign
//! CA, a listener that is not who the dialler expects, a classical-only key exchange where a
//! post-quantum one is required); a probe the listener *accepts* is an alarm (the agent counts
//! and logs it, `agent/src/selftest.rs`). A refusal after a TLS 1.3 handshake (the server judges
//! the client's certificate after the client's Finished) is seen when the listener closes instead
//! of answering the HTTP/2 preface with its SETTINGS.

use crate::classify::failure_reason;
use crate::config::{connect, ClientTls};
use crate::material::Material;
use crate::provider::{crypto_provider, CryptoPolicy};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The HTTP/2 connection preface and an empty SETTINGS frame: what a tunnel client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The HTTP/2 preface in the clear.
    Plaintext,
    /// TLS 1.2 only, with this node's identity.
    Tls12,
    /// TLS 1.3 without a client certificate.
    NoClientCert,
    /// A certificate for this node's SPIFFE ID from a CA made for the probe.
    ForeignCa,
    /// This node's own client expecting another identity than the listener proves.
    WrongIdentity,
    /// X25519 alone, where the node requires a post-quantum group.
    ClassicalKeyExchange,
}

impl Probe {
    pub const ALL: [Probe; 6] = [
        Probe::Plaintext,
        Probe::Tls12,
        Probe::NoClientCert,
        Probe::ForeignCa,
        Probe::WrongIdentity,
        Probe::ClassicalKeyExchange,
    ];

    /// The stable name (a metric label).
    pub fn name(self) -> &'static str {
        match self {
            Probe::Plaintext => "plaintext",
            Probe::Tls12 => "tls12",
            Probe::NoClientCert => "no_client_cert",
            Probe::ForeignCa => "foreign_ca",
            Probe::WrongIdentity => "wrong_identity",
            Probe::ClassicalKeyExchange => "classical_key_exchange",
        }
    }
}

/// What became of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Refused, as it must be; why (a handshake failure reason, or what the listener did).
    Refused(String),
    /// The listener took it: an alarm.
    Accepted,
    /// Not run here, and why.
    NotApplicable(&'static str),
    /// The probe could not run (the listener unreachable, a probe certificate not made).
    Error(String),
}

impl Verdict {
    /// The stable result name (a metric label).
    pub fn result(&self) -> &'static str {
        match self {
            Verdict::Refused(_) => "refused",
            Verdict::Accepted => "accepted",
            Verdict::NotApplicable(_) => "not_applicable",
            Verdict::Error(_) => "error",
        }
    }
}

/// Runs `probe` against the tunnel listener at `addr` of the node holding `material` under
/// `policy`; each step waits at most `wait`.
pub async fn run(
    probe: Probe,
    addr: SocketAddr,
    material: &Material,
    policy: CryptoPolicy,
    wait: Duration,
) -> Verdict {
    // Decided before connecting: a connection opened only to be dropped would count as a
    // failed handshake on the listener.
    if probe == Probe::ClassicalKeyExchange && policy == CryptoPolicy::PreferPostQuantum {
        return Verdict::NotApplicable("this node accepts X25519 (no require_post_quantum, default profile)");
    }
    let tcp = match timeout(wait, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Verdict::Error(format!("cannot connect to {addr}: {e}")),
        Err(_) => return Verdict::Error(format!("no connection to {addr} in {wait:?}")),
    };
    let own = || (material.certified.cert.clone(), material.certified.key.clone());
    let config = match probe {
        Probe::Plaintext => return answered(tcp, wait).await,
        Probe::WrongIdentity => {
            let nobody = match material.trust_domain.node_id("tapproof-selftest-nobody") {
                Ok(id) => id,
                Err(e) => return Verdict::Error(e.to_string()),
            };
            let tls = match ClientTls::new(material, nobody, policy) {
                Ok(t) => t,
                Err(e) => return Verdict::Error(e.to_string()),
            };
            return match timeout(wait, connect(&tls, tcp, addr)).await {
                Ok(Ok(_)) => Verdict::Accepted,
                Ok(Err(e)) => Verdict::Refused(failure_reason(&e).to_owned()),
                Err(_) => Verdict::Refused("timeout".into()),
            };
        }
        Probe::Tls12 => {
            let (chain, key) = own();
            build(
                rustls::crypto::aws_lc_rs::default_provider(),
                &rustls::version::TLS12,
                Some(Identity::Signing(chain, key)),
            )
        }
        Probe::NoClientCert => build((*crypto_provider(policy)).clone(), &rustls::version::TLS13, None),
        Probe::ForeignCa => match foreign(material) {
            Ok((chain, key)) => build(
                (*crypto_provider(CryptoPolicy::PreferPostQuantum)).clone(),
                &rustls::version::TLS13,
                Some(Identity::Der(chain, key)),
            ),
            Err(e) => return Verdict::Error(format!("cannot make the probe's foreign CA: {e}")),
        },
        Probe::ClassicalKeyExchange => {
            let mut provider = (*crypto_provider(CryptoPolicy::PreferPostQuantum)).clone();
            provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
            let (chain, key) = own();
            build(
                provider,
                &rustls::version::TLS13,
                Some(Identity::Signing(chain, key)),
            )
        }
    };
    match config {
        Ok(config) => ask(config, addr, tcp, wait).await,
        Err(e) => Verdict::Error(format!("cannot build the probe's TLS config: {e}")),
    }
}

/// The TLS handshake with `config` on `tcp`, then `answered`.
async fn ask(config: Arc<ClientConfig>, addr: SocketAddr, tcp: TcpStream, wait: Duration) -> Verdict {
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::IpAddress(addr.ip().into());
    match timeout(wait, connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => answered(tls, wait).await,
        Ok(Err(e)) => Verdict::Refused(failure_reason(&e).to_owned()),
        Err(_) => Verdict::Refused("timeout".into()),
    }
}

/// A probe by the control plane: TLS 1.3 to the tunnel listener at `addr`, presenting
/// `chain_pem` and `key_pem` (an identity the listener must refuse: expired, revoked), under
/// `policy`'s groups; the verdict as for the node's own probes.
pub async fn run_with_identity(
    addr: SocketAddr,
    chain_pem: &str,
    key_pem: &str,
    policy: CryptoPolicy,
    wait: Duration,
) -> Verdict {
    use rustls::pki_types::pem::PemObject;
    let chain = match CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>() {
        Ok(c) => c,
        Err(e) => return Verdict::Error(format!("the probe's chain: {e}")),
    };
    let key = match PrivateKeyDer::from_pem_slice(key_pem.as_bytes()) {
        Ok(k) => k,
        Err(e) => return Verdict::Error(format!("the probe's key: {e}")),
    };
    let config = match build(
        (*crypto_provider(policy)).clone(),
        &rustls::version::TLS13,
        Some(Identity::Der(chain, key)),
    ) {
        Ok(c) => c,
        Err(e) => return Verdict::Error(format!("cannot build the probe's TLS config: {e}")),
    };
    let tcp = match timeout(wait, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Verdict::Error(format!("cannot connect to {addr}: {e}")),
        Err(_) => return Verdict::Error(format!("no connection to {addr} in {wait:?}")),
    };
    ask(config, addr, tcp, wait).await
}

/// Sends the HTTP/2 preface and waits for the listener's first bytes: an answer means it took
/// the connection (its SETTINGS), a close, a reset or an alert that it refused it.
async fn answered<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, wait: Duration) -> Verdict {
    if let Err(e) = io.write_all(PREFACE).await {
        return Verdict::Refused(format!("closed: {}", failure_reason(&e)));
    }
    let mut buf = [0u8; 64];
    match timeout(wait, io.read(&mut buf)).await {
        // An HTTP/2 frame header: length (3 bytes), then type 4 (SETTINGS).
        Ok(Ok(n)) if n >= 4 && buf[3] == 4 => Verdict::Accepted,
        Ok(Ok(0)) => Verdict::Refused("closed".into()),
        // A TLS alert record (type 21) in the clear: the plaintext probe refused.
        Ok(Ok(_)) if buf[0] == 21 => Verdict::Refused("tls_alert".into()),
        Ok(Ok(n)) => Verdict::Refused(format!("answered {n} bytes that are not HTTP/2")),
        Ok(Err(e)) => Verdict::Refused(failure_reason(&e).to_owned()),
        Err(_) => Verdict::Refused("no answer".into()),
    }
}

enum Identity {
    Signing(Vec<CertificateDer<'static>>, Arc<dyn rustls::sign::SigningKey>),
    Der(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

fn build(
    provider: CryptoProvider,
    version: &'static rustls::SupportedProtocolVersion,
    identity: Option<Identity>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(provider);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[version])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(Identity::Der(chain, key)) => builder.with_client_auth_cert(chain, key)?,
        Some(Identity::Signing(chain, key)) => builder.with_client_cert_resolver(Arc::new(
            crate::config::FixedCert(Arc::new(rustls::sign::CertifiedKey::new(chain, key))),
        )),
    };
    config.alpn_protocols = vec![crate::config::ALPN_H2.to_vec()];
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// A throwaway root of this node's trust domain (another key than the real one) and a leaf for
/// this node's own SPIFFE ID under it.
fn foreign(material: &Material) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    use rustls::pki_types::pem::PemObject;
    let root =
        tapproof_identity::Authority::new_root(material.trust_domain.clone(), time::Duration::minutes(10))
            .map_err(|e| e.to_string())?;
    let issued = root
        .issue_with_new_key(material.id(), time::Duration::minutes(5))
        .map_err(|e| e.to_string())?;
    let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).map_err(|e| e.to_string())?;
    Ok((chain, key))
}

/// A verifier for clients that do not judge the server, only play the client whose treatment
/// by the server is under test (the probes here; the test clients of `tapproof-test-util`): any
/// certificate, with a signature that verifies under `provider`'s algorithms.
#[derive(Debug)]
pub struct AnyServer(Arc<CryptoProvider>);

impl AnyServer {
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        Self(provider)
    }
}

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

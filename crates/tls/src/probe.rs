//! The audit's TLS probe: does whoever listens at an address speak TLS, and with what? A ClientHello
//! offering every version, suite and group rustls knows; the server's certificate is recorded, not
//! judged (the probe authenticates nothing and sends no data). A server that wants a client
//! certificate still shows its version, suite, group and certificate before it refuses us.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the probe learnt about one listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Tls(TlsDetails),
    /// It answered, but not with TLS (first bytes shown, printable only).
    NotTls {
        answer: String,
    },
    /// Connected, but nothing came back in time: a server that waits for its client to speak
    /// first, in a protocol that is not TLS.
    NoAnswer {
        waited: Duration,
    },
    Unreachable {
        detail: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsDetails {
    pub version: String,
    pub cipher: String,
    pub group: String,
    pub subject: Option<String>,
    pub not_after: Option<i64>,
    /// The handshake ended with the server wanting a client certificate (mutual TLS).
    pub client_cert_required: bool,
}

#[derive(Debug)]
struct Recorder {
    provider: Arc<rustls::crypto::CryptoProvider>,
    leaf: Mutex<Option<Vec<u8>>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.leaf.lock().unwrap_or_else(|p| p.into_inner()) = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(40)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect()
}

/// Probes `addr`, giving up after `timeout` (connect, and again for the answer).
pub fn probe(addr: SocketAddr, timeout: Duration) -> ProbeOutcome {
    let mut tcp = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(t) => t,
        Err(e) => {
            return ProbeOutcome::Unreachable {
                detail: e.to_string(),
            }
        }
    };
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let recorder = Arc::new(Recorder {
        provider: provider.clone(),
        leaf: Mutex::new(None),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .expect("the default provider supports every version")
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let name = ServerName::IpAddress(addr.ip().into());
    let mut conn = match ClientConnection::new(Arc::new(config), name) {
        Ok(c) => c,
        Err(e) => {
            return ProbeOutcome::Unreachable {
                detail: e.to_string(),
            }
        }
    };
    let start = Instant::now();
    let mut first = Vec::new();
    let result = loop {
        if !conn.is_handshaking() {
            break Ok(());
        }
        // Each read has its own timeout; this bounds a peer that trickles bytes.
        if start.elapsed() > timeout * 3 {
            break Err(io::Error::new(ErrorKind::TimedOut, "handshake too slow"));
        }
        if conn.wants_write() {
            if let Err(e) = conn.write_tls(&mut tcp) {
                break Err(e);
            }
            continue;
        }
        // Read raw bytes ourselves first, so a non-TLS answer can be shown.
        let mut buf = [0u8; 8192];
        match io::Read::read(&mut tcp, &mut buf) {
            Ok(0) => break Err(io::Error::new(ErrorKind::UnexpectedEof, "closed")),
            Ok(n) => {
                if first.is_empty() {
                    first.extend_from_slice(&buf[..n.min(64)]);
                }
                let mut slice = &buf[..n];
                let mut failed = None;
                while !slice.is_empty() && failed.is_none() {
                    match conn.read_tls(&mut slice) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            return ProbeOutcome::NotTls {
                                answer: format!("{} ({e})", printable(&first)),
                            }
                        }
                    }
                    if let Err(e) = conn.process_new_packets() {
                        if conn.protocol_version().is_none() {
                            return ProbeOutcome::NotTls {
                                answer: format!("{} ({e})", printable(&first)),
                            };
                        }
                        failed = Some(e);
                    }
                }
                if let Some(e) = failed {
                    break Err(io::Error::other(e));
                }
            }
            Err(e) => break Err(e),
        }
    };
    if conn.protocol_version().is_none() {
        return match result {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                ProbeOutcome::NoAnswer {
                    waited: start.elapsed(),
                }
            }
            _ if !first.is_empty() => ProbeOutcome::NotTls {
                answer: printable(&first),
            },
            Err(e) => ProbeOutcome::NotTls {
                answer: format!("closed without a TLS answer ({e})"),
            },
            Ok(()) => ProbeOutcome::NotTls {
                answer: "no TLS answer".into(),
            },
        };
    }
    // TLS 1.3 clients finish before the server has judged their (empty) certificate: a server
    // that requires one says so with an alert right after. Wait for it briefly.
    let mut refused_after = match &result {
        Err(e) => !matches!(
            e.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::UnexpectedEof
        ),
        Ok(()) => false,
    };
    if result.is_ok() {
        while conn.wants_write() {
            if conn.write_tls(&mut tcp).is_err() {
                break;
            }
        }
        let _ = tcp.set_read_timeout(Some(timeout.min(Duration::from_millis(500))));
        let mut buf = [0u8; 4096];
        if let Ok(n) = io::Read::read(&mut tcp, &mut buf) {
            let mut slice = &buf[..n];
            let _ = conn.read_tls(&mut slice);
            if let Err(rustls::Error::AlertReceived(alert)) = conn.process_new_packets() {
                refused_after = matches!(
                    alert,
                    rustls::AlertDescription::CertificateRequired
                        | rustls::AlertDescription::HandshakeFailure
                        | rustls::AlertDescription::BadCertificate
                );
            }
        }
    }
    let leaf = recorder.leaf.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (subject, not_after) = leaf
        .as_deref()
        .and_then(tapproof_identity::svid::cert_summary)
        .map_or((None, None), |(s, t)| (Some(s), Some(t)));
    ProbeOutcome::Tls(TlsDetails {
        version: conn
            .protocol_version()
            .map(|v| format!("{v:?}").replace("TLSv1_", "TLS 1."))
            .unwrap_or_default(),
        cipher: conn
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default(),
        group: conn
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()))
            .unwrap_or_default(),
        subject,
        not_after,
        client_cert_required: refused_after,
    })
}

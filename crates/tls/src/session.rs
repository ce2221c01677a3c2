//! What a finished handshake negotiated, for logs, `/v1/status` and the quickstart.

use rustls::CommonState;
use tapproof_identity::{inspect_svid, SpiffeId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// `TLSv1.3` (as OpenSSL writes it).
    pub version: String,
    /// The IANA name, for example `TLS_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// For example `X25519MLKEM768`.
    pub group: String,
    /// The peer's SPIFFE ID; always present after our verifiers accepted the peer.
    pub peer_id: Option<SpiffeId>,
    /// Whether the handshake resumed an earlier session.
    pub resumed: bool,
    /// When the peer's certificate expires (Unix seconds).
    pub peer_not_after: Option<i64>,
    /// The peer certificate's serial (hex), for revocation by serial.
    pub peer_serial: Option<String>,
    /// The signature scheme the peer signed the handshake with, derived from its certificate's
    /// key (rustls does not expose it per connection; TLS 1.3 fixes it by the key).
    pub peer_signature: Option<&'static str>,
}

/// `TLSv1.3`, as OpenSSL and Wireshark write it (rustls spells it `TLSv1_3`).
fn version_name(v: rustls::ProtocolVersion) -> String {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        other => other
            .as_str()
            .map_or_else(|| format!("0x{:04x}", u16::from(other)), str::to_owned),
    }
}

/// The IANA name of a suite (`TLS_AES_256_GCM_SHA384`; rustls writes TLS 1.3 suites `TLS13_...`).
fn cipher_name(suite: rustls::CipherSuite) -> String {
    match suite.as_str() {
        Some(name) => name
            .strip_prefix("TLS13_")
            .map_or_else(|| name.to_owned(), |rest| format!("TLS_{rest}")),
        None => format!("0x{:04x}", u16::from(suite)),
    }
}

fn info(state: &CommonState) -> SessionInfo {
    let svid = state
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| inspect_svid(leaf).ok());
    let peer_not_after = svid.as_ref().map(|s| s.not_after);
    let peer_serial = svid.as_ref().map(|s| s.serial.clone());
    let peer_signature = svid.as_ref().map(|s| s.signature_scheme);
    let peer_id = svid.map(|s| s.id);
    SessionInfo {
        version: state.protocol_version().map(version_name).unwrap_or_default(),
        cipher: state
            .negotiated_cipher_suite()
            .map(|s| cipher_name(s.suite()))
            .unwrap_or_default(),
        group: state
            .negotiated_key_exchange_group()
            .map(|g| {
                let name = g.name();
                name.as_str()
                    .map_or_else(|| format!("0x{:04x}", u16::from(name)), str::to_owned)
            })
            .unwrap_or_default(),
        peer_id,
        resumed: matches!(state.handshake_kind(), Some(rustls::HandshakeKind::Resumed)),
        peer_not_after,
        peer_serial,
        peer_signature,
    }
}

pub fn server_session<IO>(stream: &tokio_rustls::server::TlsStream<IO>) -> SessionInfo {
    info(stream.get_ref().1)
}

pub fn client_session<IO>(stream: &tokio_rustls::client::TlsStream<IO>) -> SessionInfo {
    info(stream.get_ref().1)
}

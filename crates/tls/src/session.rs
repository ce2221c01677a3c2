//! What a finished handshake negotiated, for logs, `/v1/status` and the quickstart.

use rustls::CommonState;
use tapproof_identity::{inspect_svid, SpiffeId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// `TLSv1_3`.
    pub version: String,
    /// For example `TLS13_AES_256_GCM_SHA384`.
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
}

fn info(state: &CommonState) -> SessionInfo {
    let svid = state
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| inspect_svid(leaf).ok());
    let peer_not_after = svid.as_ref().map(|s| s.not_after);
    let peer_serial = svid.as_ref().map(|s| s.serial.clone());
    let peer_id = svid.map(|s| s.id);
    SessionInfo {
        version: state
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default(),
        cipher: state
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default(),
        group: state
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()))
            .unwrap_or_default(),
        peer_id,
        resumed: matches!(state.handshake_kind(), Some(rustls::HandshakeKind::Resumed)),
        peer_not_after,
        peer_serial,
    }
}

pub fn server_session<IO>(stream: &tokio_rustls::server::TlsStream<IO>) -> SessionInfo {
    info(stream.get_ref().1)
}

pub fn client_session<IO>(stream: &tokio_rustls::client::TlsStream<IO>) -> SessionInfo {
    info(stream.get_ref().1)
}

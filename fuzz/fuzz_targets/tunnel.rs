//! The tunnel's HTTP/2 server and CONNECT handling, fed arbitrary bytes as an authenticated,
//! allowed peer would send them after TLS (the stream preface, SETTINGS, HEADERS for CONNECT,
//! DATA, resets, anything): the agent never panics, and every stream ends in an answer or a reset.
//! Streams for `db` are forwarded to a closed port (502); other names get 404.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

struct Harness {
    rt: tokio::runtime::Runtime,
    state: Arc<tapproof_agent::AgentState>,
    peer: tapproof_identity::SpiffeId,
    _pki: tapproof_test_util::pki::TestPki,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let pki = tapproof_test_util::pki::TestPki::new();
        let id = pki.node("db-1");
        let text = format!(
            "trust_domain = \"{}\"\n{}[tunnel]\nlisten = \"127.0.0.1:0\"\n[[inbound]]\nservice = \"db\"\nforward = \"127.0.0.1:1\"\nallow = [\"spiffe://{}/node/web-1\"]\n",
            pki.td,
            tapproof_test_util::process::identity_section(&id),
            pki.td
        );
        let config = tapproof_agent::AgentConfig::parse(std::path::Path::new("fuzz.toml"), &text).unwrap();
        let files = tapproof_agent::identity_files(&config);
        let material = tapproof_tls::ReloadingMaterial::load(files, config.trust_domain.clone()).unwrap();
        let state = Arc::new(tapproof_agent::AgentState::new(config, material, Default::default(), Some(1024)));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Harness { rt, state, peer: pki.id("web-1"), _pki: pki }
    })
}

/// The client preface and an empty SETTINGS frame: inputs start with them half of the time, so
/// the fuzzer spends its time past the preface check.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let input = match data.split_first() {
        Some((flag, rest)) if flag & 1 == 1 => [PREFACE, rest].concat(),
        _ => data.to_vec(),
    };
    h.rt.block_on(tapproof_agent::fuzzing::tunnel_bytes(
        &h.state,
        h.peer.clone(),
        input,
    ));
});

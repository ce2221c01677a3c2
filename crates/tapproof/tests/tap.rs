//! The tap test: two "hosts" (network namespaces) joined by a veth "fibre", an agent on each, and
//! tcpdump on the fibre. A canary sent through tapproof never appears in the capture; the same
//! canary sent in plaintext across the same fibre does (so the capture is proven to work); and
//! the captured ServerHello shows the X25519MLKEM768 key-exchange group. A second test runs the
//! pair on the `cnsa2` profile and reads its terms off the fibre.
//!
//! Needs root (namespaces, captures). Under CI (CI=true) it runs and fails loudly; elsewhere
//! without root it says it was skipped.

use tapproof_test_util::netns::{spawn_ready, Background, Netns, Tcpdump as Capture, TwoHosts};
use tapproof_test_util::pcap::{
    client_hello_offers, contains, server_hello_cipher, server_hello_group, stream_from, tcp_segments,
    MLKEM1024, ML_DSA_87, TLS_AES_256_GCM_SHA384, X25519MLKEM768,
};
use tapproof_test_util::pki::TestPki;
use tapproof_test_util::process::{identity_section, AgentProcess};

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");

fn can_run() -> bool {
    tapproof_test_util::root_with("tap test", &[("tcpdump", "--version"), ("ip", "-V")])
}

/// Starts `tapproof-bench echo-server` in `ns` and waits for its "listening" line.
fn echo_server(ns: &Netns, listen: &str) -> Background {
    let bench = tapproof_test_util::bench_exe(EXE);
    spawn_ready(ns, &[&bench, "echo-server", "--listen", listen], "listening").0
}

/// Agent db-1 on host B (its tunnel on the fibre address, inbound `db` to an echo service on
/// B's 127.0.0.1:7000) and agent web-1 on host A (outbound `db` on A's 127.0.0.1:15432), both
/// with `tunnel` lines in their `[tunnel]` section.
fn agents(hosts: &TwoHosts, pki: &TestPki, tunnel: &str) -> (AgentProcess, AgentProcess) {
    let td = &pki.td;
    let (db_id, web_id) = (pki.node("db-1"), pki.node("web-1"));
    let db_config = format!(
        "trust_domain = \"{td}\"\n{}[admin]\nlisten = \"127.0.0.1:15000\"\n[tunnel]\nlisten = \"{}:15008\"\n{tunnel}\
         [[inbound]]\nservice = \"db\"\nforward = \"127.0.0.1:7000\"\nallow = [\"spiffe://{td}/node/web-1\"]\n",
        identity_section(&db_id),
        hosts.b_ip
    );
    let db = AgentProcess::start_with(EXE, pki.path(), "db-1", &db_config, &hosts.b.prefix());
    let web_config = format!(
        "trust_domain = \"{td}\"\n{}[admin]\nlisten = \"127.0.0.1:15000\"\n[tunnel]\n{tunnel}\
         [[outbound]]\nlisten = \"127.0.0.1:15432\"\nservice = \"db\"\npeers = [\"{}:15008\"]\nserver_id = \"spiffe://{td}/node/db-1\"\n",
        identity_section(&web_id),
        hosts.b_ip
    );
    let web = AgentProcess::start_with(EXE, pki.path(), "web-1", &web_config, &hosts.a.prefix());
    (db, web)
}

fn send(ns: &Netns, to: &str, data: &str) -> String {
    ns.exec_ok(&[
        &tapproof_test_util::bench_exe(EXE),
        "send",
        "--connect",
        to,
        "--data",
        data,
    ])
    .trim_end()
    .to_owned()
}

#[test]
fn a_tap_on_the_fibre_sees_no_canary_through_tapproof() {
    if !can_run() {
        return;
    }
    let hosts = TwoHosts::new("tap");
    let pki = TestPki::new();
    let canary = format!("TAPPROOF-CANARY-{:016x}", rand_u64());

    // Host B: the service on its loopback, fronted by agent db-1 on the fibre address; and a
    // plaintext echo listening on the fibre for the control capture.
    let _service = echo_server(&hosts.b, "127.0.0.1:7000");
    let _plain = echo_server(&hosts.b, &format!("{}:7001", hosts.b_ip));
    // Host A: agent web-1 with an outbound for db.
    let (_db, _web) = agents(&hosts, &pki, "");

    // 1. Through tapproof: the canary arrives, and the fibre never carries it.
    let tunnel_pcap = pki.path().join("tunnel.pcap");
    let capture = Capture::start(&hosts.a, &hosts.a_if, &tunnel_pcap);
    assert_eq!(
        send(&hosts.a, "127.0.0.1:15432", &canary),
        canary,
        "canary must arrive through the tunnel"
    );
    capture.stop();
    let captured = std::fs::read(&tunnel_pcap).unwrap();
    let segments = tcp_segments(&captured);
    assert!(
        segments.iter().any(|s| s.src.port() == 15008),
        "the capture must hold the tunnel's packets"
    );
    assert!(
        !contains(&captured, canary.as_bytes()),
        "the canary crossed the fibre in the clear"
    );
    let from_server = stream_from(&segments, 15008);
    assert_eq!(
        server_hello_group(&from_server),
        Some(X25519MLKEM768),
        "ServerHello must select X25519MLKEM768"
    );
    // TLS 1.3 encrypts the certificates too: not even the SPIFFE IDs are visible on the fibre.
    assert!(
        !contains(&captured, b"spiffe://"),
        "an identity crossed the fibre in the clear"
    );

    // 2. The control: the same canary in plaintext across the same fibre is seen.
    let plain_pcap = pki.path().join("plain.pcap");
    let capture = Capture::start(&hosts.a, &hosts.a_if, &plain_pcap);
    assert_eq!(send(&hosts.a, &format!("{}:7001", hosts.b_ip), &canary), canary);
    capture.stop();
    assert!(
        contains(&std::fs::read(&plain_pcap).unwrap(), canary.as_bytes()),
        "the capture must see plaintext"
    );
}

/// The `cnsa2` profile on the fibre: the ClientHello offers TLS_AES_256_GCM_SHA384, ML-KEM-1024
/// and the ML-DSA-87 signature scheme and nothing else, and the ServerHello picks ML-KEM-1024
/// and TLS_AES_256_GCM_SHA384. (The signatures themselves travel encrypted in TLS 1.3: the
/// offer is what a tap can check; the peer could sign nothing but what was offered.)
#[test]
fn a_cnsa2_tunnel_offers_and_picks_only_ml_kem_1024_aes_256_and_ml_dsa_87() {
    if !can_run() {
        return;
    }
    let hosts = TwoHosts::new("tapq");
    let pki = TestPki::with(
        tapproof_test_util::pki::TD,
        tapproof_identity::KeyAlgorithm::MlDsa87,
    );
    let canary = format!("TAPPROOF-CNSA2-CANARY-{:016x}", rand_u64());
    let _service = echo_server(&hosts.b, "127.0.0.1:7000");
    let (_db, web) = agents(&hosts, &pki, "crypto_profile = \"cnsa2\"\n");
    let pcap = pki.path().join("cnsa2.pcap");
    let capture = Capture::start(&hosts.a, &hosts.a_if, &pcap);
    assert_eq!(
        send(&hosts.a, "127.0.0.1:15432", &canary),
        canary,
        "{}",
        web.log()
    );
    capture.stop();
    let captured = std::fs::read(&pcap).unwrap();
    assert!(
        !contains(&captured, canary.as_bytes()),
        "the canary crossed in the clear"
    );
    let segments = tcp_segments(&captured);
    let from_server = stream_from(&segments, 15008);
    assert_eq!(
        server_hello_group(&from_server),
        Some(MLKEM1024),
        "ServerHello group"
    );
    assert_eq!(
        server_hello_cipher(&from_server),
        Some(TLS_AES_256_GCM_SHA384),
        "ServerHello cipher"
    );
    let client_port = segments
        .iter()
        .find(|s| s.dst.port() == 15008)
        .expect("the client's segments")
        .src
        .port();
    let (suites, groups, signatures) =
        client_hello_offers(&stream_from(&segments, client_port)).expect("a ClientHello");
    assert_eq!(suites, vec![TLS_AES_256_GCM_SHA384], "offered suites");
    assert_eq!(groups, vec![MLKEM1024], "offered groups");
    assert_eq!(signatures, vec![ML_DSA_87], "offered signature schemes");
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::process::id())
}

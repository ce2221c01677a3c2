//! Everything a peer can get wrong on the tunnel port is refused, logged with a reason, and
//! counted, while the agent keeps serving everyone else.

use std::time::Duration;
use tapproof_test_util::fixture::Pair;
use tapproof_test_util::process::AgentProcess;
use tapproof_test_util::tls_client::{
    attempt, connect_status, garbage_after_handshake, plaintext_attempt, raw_config,
};
use tapproof_test_util::traffic::round_trip;
use tapproof_tls::rustls::version::{TLS12, TLS13};
use tapproof_tls::CryptoPolicy;

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");

fn failures(agent: &AgentProcess, reason: &str) -> f64 {
    agent.metric(
        "tapproof_handshake_failures_total",
        &["side=\"inbound\"", &format!("reason=\"{reason}\"")],
    )
}

/// Runs `bad`, then checks the refusal was counted under `reason`, logged, and that a good
/// client is still served.
fn refused(pair: &Pair, reason: &str, bad: impl FnOnce()) {
    let before = failures(&pair.db, reason);
    bad();
    pair.db.wait_for(
        &format!("handshake failure {reason}"),
        Duration::from_secs(15),
        |a| failures(a, reason) > before,
    );
    assert!(
        pair.db.log().contains(&format!("reason=\"{reason}\""))
            || pair.db.log().contains(&format!("reason={reason}")),
        "log names the reason {reason}:\n{}",
        pair.db.log()
    );
    assert_eq!(
        round_trip(pair.app_addr(), b"still serving").unwrap(),
        b"still serving"
    );
}

#[test]
fn every_bad_client_is_refused_and_the_agent_keeps_serving() {
    let pair = Pair::start(EXE);
    let tunnel = pair.db.tunnel();
    let td = &pair.pki.td;

    refused(&pair, "not_tls", || {
        let answer = plaintext_attempt(tunnel);
        assert!(
            !String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"),
            "plaintext must get nothing useful"
        );
    });

    refused(&pair, "tls_version", || {
        let config = raw_config(Some(&pair.web_id), &[&TLS12], CryptoPolicy::PreferPostQuantum);
        let e = attempt(tunnel, config).unwrap_err();
        assert!(e.contains("handshake"), "{e}");
    });

    refused(&pair, "no_client_cert", || {
        let config = raw_config(None, &[&TLS13], CryptoPolicy::PreferPostQuantum);
        attempt(tunnel, config).unwrap_err();
    });

    let stranger = tapproof_test_util::pki::TestPki::new(); // same trust domain name, another CA
    refused(&pair, "unknown_ca", || {
        let config = raw_config(
            Some(&stranger.node("web-1")),
            &[&TLS13],
            CryptoPolicy::PreferPostQuantum,
        );
        attempt(tunnel, config).unwrap_err();
    });

    refused(&pair, "foreign_trust_domain", || {
        let config = raw_config(
            Some(&pair.pki.foreign_domain("web-1")),
            &[&TLS13],
            CryptoPolicy::PreferPostQuantum,
        );
        attempt(tunnel, config).unwrap_err();
    });

    refused(&pair, "cert_expired", || {
        let config = raw_config(
            Some(&pair.pki.expired("web-1")),
            &[&TLS13],
            CryptoPolicy::PreferPostQuantum,
        );
        attempt(tunnel, config).unwrap_err();
    });

    refused(&pair, "not_svid", || {
        let config = raw_config(
            Some(&pair.pki.without_spiffe_id("web-1")),
            &[&TLS13],
            CryptoPolicy::PreferPostQuantum,
        );
        attempt(tunnel, config).unwrap_err();
    });

    // Past the handshake: bytes that are not HTTP/2 close the tunnel.
    assert!(
        garbage_after_handshake(tunnel, &pair.web_id),
        "garbage must close the connection"
    );
    pair.db
        .wait_for("protocol error counted", Duration::from_secs(10), |a| {
            a.metric("tapproof_tunnel_errors_total", &["reason=\"not_http2\""]) >= 1.0
        });

    // Streams: an unknown service and an identity the policy does not allow.
    let db_id = pair.pki.id("db-1");
    assert_eq!(connect_status(tunnel, &pair.web_id, td, &db_id, "nope"), 404);
    assert_eq!(
        pair.db.metric(
            "tapproof_policy_denials_total",
            &["service=\"(unknown)\"", "reason=\"unknown_service\""]
        ),
        1.0
    );
    let intruder = pair.pki.node("web-2");
    assert_eq!(connect_status(tunnel, &intruder, td, &db_id, "db"), 403);
    assert_eq!(
        pair.db.metric(
            "tapproof_policy_denials_total",
            &["service=\"db\"", "reason=\"not_allowed\""]
        ),
        1.0
    );
    let log = pair.db.log();
    assert!(
        log.contains("spiffe://example.org/node/web-2") && log.contains("policy does not allow"),
        "{log}"
    );
    // An identity matched by the `/*` pattern is allowed.
    let svc = pair.pki.custom(
        "svc-web",
        tapproof_identity::ca::leaf_params(
            &pair.pki.td.service_id("web").unwrap(),
            time::Duration::hours(1),
            time::OffsetDateTime::now_utc() + time::Duration::days(1),
        )
        .unwrap(),
    );
    assert_eq!(connect_status(tunnel, &svc, td, &db_id, "db"), 200);

    assert_eq!(
        round_trip(pair.app_addr(), b"still serving").unwrap(),
        b"still serving"
    );
}

/// The outbound side refuses a peer that proves another identity than `server_id`.
#[test]
fn outbound_refuses_a_peer_with_the_wrong_identity() {
    let pki = tapproof_test_util::pki::TestPki::new();
    let echo = tapproof_test_util::traffic::EchoServer::start();
    let impostor_id = pki.node("db-2");
    let web_id = pki.node("web-1");
    let impostor = AgentProcess::start(
        EXE,
        pki.path(),
        "db-2",
        &tapproof_test_util::fixture::db_config(&pki, &impostor_id, echo.addr, ""),
    );
    let web = AgentProcess::start(
        EXE,
        pki.path(),
        "web-1",
        &tapproof_test_util::fixture::web_config(&pki, &web_id, &[impostor.tunnel()], "db-1", ""),
    );
    let back = round_trip(web.outbound(0), b"secret").unwrap_or_default();
    assert!(back.is_empty(), "no byte may reach an impostor's service");
    assert_eq!(
        web.metric(
            "tapproof_handshake_failures_total",
            &["side=\"outbound\"", "reason=\"wrong_peer_id\""]
        ),
        1.0
    );
    assert_eq!(impostor.metric("tapproof_streams_total", &[]), 0.0);
}

/// With `require_post_quantum`, a client that offers only X25519 is refused.
#[test]
fn require_post_quantum_refuses_classical_key_exchange() {
    let pair = Pair::start_with(EXE, "require_post_quantum = true", "");
    let before = failures(&pair.db, "no_common_key_exchange");
    let config = tapproof_test_util::tls_client::raw_config_with_groups(
        Some(&pair.web_id),
        vec![tapproof_tls::rustls::crypto::aws_lc_rs::kx_group::X25519],
    );
    attempt(pair.db.tunnel(), config).unwrap_err();
    assert!(failures(&pair.db, "no_common_key_exchange") > before);
    assert_eq!(round_trip(pair.app_addr(), b"pq").unwrap(), b"pq");
    assert_eq!(pair.db.status()["tunnels"][0]["key_exchange"], "X25519MLKEM768");
}

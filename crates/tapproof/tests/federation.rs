//! SPIFFE federation with real agents and a real server: a node of example.org opens a tunnel to a
//! node of partner.org with both identities checked, each side holding the other's bundle; the
//! bundle is kept fresh from partner.org's SPIFFE bundle endpoint (a tapproof server's
//! `/v1/spiffe-bundle`, https_spiffe profile), so partner.org's root rollover reaches example.org
//! without anyone copying files; and a config naming a foreign ID without federating its trust
//! domain is refused with words.

use std::time::Duration;
use tapproof_test_util::pki::TestPki;
use tapproof_test_util::process::{identity_section, run_tapproof, AgentProcess};
use tapproof_test_util::server::{init, ServerProcess};
use tapproof_test_util::traffic::{round_trip, EchoServer};

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");

fn federation(td: &str, bundle: &std::path::Path, endpoint: &str) -> String {
    format!(
        "[[federation]]\ntrust_domain = \"{td}\"\nbundle = \"{}\"\n{endpoint}",
        bundle.display()
    )
}

fn db_config(partner: &TestPki, echo: std::net::SocketAddr, federated: &str) -> String {
    format!(
        "trust_domain = \"partner.org\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n[tunnel]\nlisten = \"127.0.0.1:0\"\n\
         [[inbound]]\nservice = \"db\"\nforward = \"{echo}\"\nallow = [\"spiffe://example.org/node/web-1\"]\n{federated}",
        identity_section(&partner.node("db-1")),
    )
}

fn web_config(ours: &TestPki, db: std::net::SocketAddr, federated: &str) -> String {
    format!(
        "trust_domain = \"example.org\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"db\"\npeers = [\"{db}\"]\n\
         server_id = \"spiffe://partner.org/node/db-1\"\n{federated}",
        identity_section(&ours.node("web-1")),
    )
}

#[test]
fn nodes_of_two_federated_trust_domains_open_a_tunnel() {
    let (ours, partner) = (
        TestPki::for_domain("example.org"),
        TestPki::for_domain("partner.org"),
    );
    let dir = tempfile::tempdir().unwrap();
    let echo = EchoServer::start();
    let db = AgentProcess::start(
        EXE,
        dir.path(),
        "db-1",
        &db_config(
            &partner,
            echo.addr,
            &federation("example.org", &ours.bundle(), ""),
        ),
    );
    let web = AgentProcess::start(
        EXE,
        dir.path(),
        "web-1",
        &web_config(
            &ours,
            db.tunnel(),
            &federation("partner.org", &partner.bundle(), ""),
        ),
    );
    let payload = tapproof_test_util::traffic::random_bytes(64 * 1024);
    assert_eq!(round_trip(web.outbound(0), &payload).unwrap(), payload);
    let sockets = db.admin_get("/v1/sockets").1;
    assert!(sockets.contains("spiffe://example.org/node/web-1"), "{sockets}");
    assert_eq!(
        web.metric(
            "tapproof_federation_bundle_roots",
            &["trust_domain=\"partner.org\""]
        ),
        1.0
    );

    // A peer of example.org that partner.org's db-1 does not federate with: the same web-1 is
    // refused at the handshake (unknown CA), and the stream never reaches the echo server.
    let lone = AgentProcess::start(
        EXE,
        dir.path(),
        "db-lone",
        &db_config(&partner, echo.addr, "").replace(
            "allow = [\"spiffe://example.org/node/web-1\"]",
            "allow = [\"spiffe://partner.org/node/web-1\"]",
        ),
    );
    let web2 = AgentProcess::start(
        EXE,
        dir.path(),
        "web-2",
        &web_config(
            &ours,
            lone.tunnel(),
            &federation("partner.org", &partner.bundle(), ""),
        ),
    );
    assert!(round_trip(web2.outbound(0), b"hello").map_or(true, |got| got.is_empty()));
    lone.wait_for("the refusal counted", Duration::from_secs(10), |a| {
        a.metric(
            "tapproof_handshake_failures_total",
            &["side=\"inbound\"", "reason=\"unknown_ca\""],
        ) >= 1.0
    });
}

#[test]
fn a_foreign_id_without_federation_is_refused_with_words() {
    let (ours, partner) = (
        TestPki::for_domain("example.org"),
        TestPki::for_domain("partner.org"),
    );
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, config: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        run_tapproof(EXE, &["check-config", "--config", path.to_str().unwrap()])
    };
    let (code, out, err) = check("web", &web_config(&ours, "127.0.0.1:1".parse().unwrap(), ""));
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("outbound[0].server_id") && err.contains("[[federation]]"),
        "{err}"
    );
    let echo: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let (code, _, err) = check("db", &db_config(&partner, echo, ""));
    assert_ne!(code, 0);
    assert!(
        err.contains("inbound[0].allow[0]") && err.contains("[[federation]]"),
        "{err}"
    );

    // Federating with one's own trust domain, an endpoint without its ID, an unreadable bundle.
    let cases = [
        (federation("example.org", &ours.bundle(), ""), "own trust domain"),
        (
            federation(
                "partner.org",
                &partner.bundle(),
                "endpoint = \"https://127.0.0.1:1/v1/spiffe-bundle\"\n",
            ),
            "endpoint_id",
        ),
        (
            federation(
                "partner.org",
                &partner.bundle(),
                "endpoint = \"http://127.0.0.1:1/\"\nendpoint_id = \"spiffe://partner.org/server\"\n",
            ),
            "not an https:// URL",
        ),
        (
            federation("partner.org", &dir.path().join("missing.pem"), ""),
            "missing.pem",
        ),
    ];
    for (section, want) in cases {
        let (code, _, err) = check(
            "web",
            &web_config(&ours, "127.0.0.1:1".parse().unwrap(), &section),
        );
        assert_ne!(code, 0, "{section}");
        assert!(err.contains(want), "{section}: {err}");
    }
    let (code, out, err) = check(
        "web",
        &web_config(
            &ours,
            "127.0.0.1:1".parse().unwrap(),
            &federation("partner.org", &partner.bundle(), ""),
        ),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("federated with  partner.org (bundle file only)"),
        "{out}"
    );
}

/// partner.org runs a tapproof server; example.org's agent starts from a copy of its bundle and
/// follows its bundle endpoint: a root rollover prepared at partner.org (a second root in its
/// bundle) reaches the running agent within its refresh interval.
#[test]
fn the_bundle_endpoint_keeps_a_federated_bundle_fresh_through_a_root_rollover() {
    let dir = tempfile::tempdir().unwrap();
    let data = init(EXE, dir.path(), "partner.org");
    let server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "1h");

    // What example.org's operator copies once, out of band: partner.org's roots.
    let admin = dir.path().join("admin");
    server.admin_cert(EXE, "alice", &admin);
    let initial = admin.join("bundle.pem");

    let ours = TestPki::for_domain("example.org");
    let endpoint = format!(
        "endpoint = \"https://{}/v1/spiffe-bundle\"\nendpoint_id = \"spiffe://partner.org/server\"\nrefresh_interval = \"1s\"\n",
        server.addr
    );
    let config = format!(
        "trust_domain = \"example.org\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        identity_section(&ours.node("web-1")),
        federation("partner.org", &initial, &endpoint)
    );
    let web = AgentProcess::start(EXE, dir.path(), "web-1", &config);
    let refreshes = |a: &AgentProcess, result: &str| {
        a.metric(
            "tapproof_federation_bundle_refreshes_total",
            &["trust_domain=\"partner.org\"", &format!("result=\"{result}\"")],
        )
    };
    web.wait_for(
        "a first fetch, same roots as the file",
        Duration::from_secs(20),
        |a| refreshes(a, "unchanged") >= 1.0,
    );

    let data_s = data.to_str().unwrap().to_owned();
    let (code, out, err) = run_tapproof(EXE, &["server", "ca", "rotate", "prepare", "--data-dir", &data_s]);
    assert_eq!(code, 0, "{out}{err}");
    web.wait_for(
        "the second root from the endpoint",
        Duration::from_secs(30),
        |a| {
            a.metric(
                "tapproof_federation_bundle_roots",
                &["trust_domain=\"partner.org\""],
            ) == 2.0
        },
    );
    assert!(refreshes(&web, "ok") >= 1.0);
    assert!(web.log().contains("federated bundle updated"), "{}", web.log());

    // An endpoint proving another identity than endpoint_id is not believed: its bundle is not
    // taken, and the agent says why.
    let wrong = config.replace("spiffe://partner.org/server", "spiffe://partner.org/node/evil");
    drop(web);
    let web = AgentProcess::start(EXE, dir.path(), "web-1c", &wrong);
    web.wait_for("the refusal", Duration::from_secs(20), |a| {
        refreshes(a, "unreachable") >= 1.0
    });
    assert_eq!(
        web.metric(
            "tapproof_federation_bundle_roots",
            &["trust_domain=\"partner.org\""]
        ),
        1.0
    );
    assert!(
        web.log().contains("cannot refresh the federated bundle"),
        "{}",
        web.log()
    );
    server.stop();
}

//! Real `tapproof agent` processes on loopback carrying real TCP through real mTLS tunnels.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::Duration;
use tapproof_test_util::fixture::{db_config, Pair};
use tapproof_test_util::process::AgentProcess;
use tapproof_test_util::traffic::{random_bytes, round_trip, sha256};

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");

/// One byte through, and both agents list the tunnel socket with the peer and the TLS it
/// negotiated (what their coverage reports and the dashboard show per link).
#[test]
fn one_byte_round_trips() {
    let pair = Pair::start(EXE);
    assert_eq!(round_trip(pair.app_addr(), b"x").unwrap(), b"x");
    for (agent, kind, peer, service) in [
        (
            &pair.web,
            "tunnel_out",
            "spiffe://example.org/node/db-1",
            Some("db"),
        ),
        (&pair.db, "tunnel_in", "spiffe://example.org/node/web-1", None),
    ] {
        let (status, body) = agent.admin_get("/v1/sockets");
        assert_eq!(status, 200);
        let sockets: serde_json::Value = serde_json::from_str(&body).unwrap();
        let tunnel = sockets["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["kind"] == kind)
            .unwrap_or_else(|| panic!("{}: {body}", agent.name));
        let session = &tunnel["session"];
        assert_eq!(session["peer_id"], peer, "{body}");
        assert_eq!(session["tls_version"], "TLSv1.3", "{body}");
        assert_eq!(session["group"], "X25519MLKEM768", "{body}");
        assert!(session["cipher"].as_str().unwrap().starts_with("TLS_"), "{body}");
        assert_eq!(session["service"].as_str(), service, "{body}");
    }
}

/// Both agents' `/metrics` as a plain scrape sees them: Prometheus text that promtool accepts,
/// the latency histograms filled, build_info, process metrics, and no `control_plane_*` series
/// on agents that use their own PKI (they have no control plane to be down).
#[test]
fn metrics_pass_promtool_and_have_histograms_but_no_control_plane() {
    let pair = Pair::start(EXE);
    assert_eq!(round_trip(pair.app_addr(), b"x").unwrap(), b"x");
    for (agent, side) in [(&pair.web, "outbound"), (&pair.db, "inbound")] {
        let (status, body) = agent.admin_get("/metrics");
        assert_eq!(status, 200);
        tapproof_test_util::promtool::check_metrics(&body);
        assert!(!body.contains("control_plane"), "{body}");
        assert!(
            !body.contains("# EOF"),
            "a plain scrape gets Prometheus text: {body}"
        );
        let label = format!("side=\"{side}\"");
        assert_eq!(
            agent.metric("tapproof_handshake_duration_seconds_count", &[&label]),
            1.0,
            "{body}"
        );
        assert_eq!(agent.metric("tapproof_build_info", &["role=\"agent\""]), 1.0);
        assert!(agent.metric("process_resident_memory_bytes", &[]) > 0.0);
    }
    assert_eq!(
        pair.web
            .metric("tapproof_stream_open_duration_seconds_count", &[]),
        1.0
    );
}

#[test]
fn hundred_mib_both_ways_with_checksum() {
    let pair = Pair::start(EXE);
    let payload = random_bytes(100 * 1024 * 1024);
    let back = round_trip(pair.app_addr(), &payload).unwrap();
    assert_eq!(back.len(), payload.len());
    assert_eq!(sha256(&back), sha256(&payload), "echoed bytes differ");
    let sent = pair.web.metric(
        "tapproof_bytes_total",
        &["side=\"outbound\"", "flow=\"app_to_tunnel\""],
    );
    assert_eq!(sent as usize, payload.len());
    let received = pair.db.metric(
        "tapproof_bytes_total",
        &["side=\"inbound\"", "flow=\"tunnel_to_app\""],
    );
    assert_eq!(received as usize, payload.len());
}

/// With `key_update_bytes` at 1 MiB, one tunnel carries 32 MiB each way under some thirty
/// successive keys per direction: the echo comes back intact, each agent counts the KeyUpdates
/// it sent, and no second tunnel was needed.
#[test]
fn key_updates_by_bytes_on_one_tunnel_keep_a_checksummed_transfer_intact() {
    let limit = "key_update_bytes = 1048576";
    let pair = Pair::start_with(EXE, limit, limit);
    let payload = random_bytes(32 * 1024 * 1024);
    let back = round_trip(pair.app_addr(), &payload).unwrap();
    assert_eq!(sha256(&back), sha256(&payload), "echoed bytes differ");
    for (agent, side) in [(&pair.web, "outbound"), (&pair.db, "inbound")] {
        let side = format!("side=\"{side}\"");
        let sent = agent.metric("tapproof_tunnel_key_updates_total", &[&side, "reason=\"bytes\""]);
        assert!(
            (28.0..=40.0).contains(&sent),
            "{}: {sent} key updates for 32 MiB at 1 MiB each",
            agent.name
        );
        assert_eq!(
            agent.metric("tapproof_tunnels_total", &[&side]),
            1.0,
            "{}",
            agent.name
        );
        assert_eq!(
            agent.metric("tapproof_tunnel_key_updates_total", &[&side, "reason=\"time\""]),
            0.0
        );
    }
}

/// The app closes its write side first: the service still sees EOF, and its answer still comes back.
#[test]
fn half_close_from_the_client_is_carried_through() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let service = std::thread::spawn(move || {
        let (mut tcp, _) = server.accept().unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).unwrap(); // returns only on EOF, i.e. the half-close
        tcp.write_all(format!("got {} bytes", got.len()).as_bytes())
            .unwrap();
        tcp.shutdown(Shutdown::Write).unwrap();
    });
    let pair = Pair::forwarding_to(EXE, addr);
    let mut app = TcpStream::connect(pair.app_addr()).unwrap();
    app.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    app.write_all(&[7u8; 5000]).unwrap();
    app.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    app.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "got 5000 bytes");
    service.join().unwrap();
}

/// The service closes its write side first while the app keeps sending: the app sees EOF, and
/// what it sends afterwards still reaches the service.
#[test]
fn half_close_from_the_service_is_carried_through() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let service = std::thread::spawn(move || {
        let (mut tcp, _) = server.accept().unwrap();
        tcp.write_all(b"hello, then goodbye").unwrap();
        tcp.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).unwrap();
        got
    });
    let pair = Pair::forwarding_to(EXE, addr);
    let mut app = TcpStream::connect(pair.app_addr()).unwrap();
    app.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = Vec::new();
    app.read_to_end(&mut greeting).unwrap();
    assert_eq!(greeting, b"hello, then goodbye");
    app.write_all(b"still talking after your EOF").unwrap();
    app.shutdown(Shutdown::Write).unwrap();
    assert_eq!(service.join().unwrap(), b"still talking after your EOF");
}

/// 200 app connections open at once ride one TLS connection: one handshake on each side.
#[test]
fn two_hundred_concurrent_connections_share_one_tls_connection() {
    const N: usize = 200;
    let pair = Pair::start(EXE);
    let addr = pair.app_addr();
    let all_open = Arc::new(Barrier::new(N + 1));
    let mut clients = Vec::new();
    for i in 0..N {
        let all_open = all_open.clone();
        clients.push(std::thread::spawn(move || {
            let mut tcp = TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let msg = format!("connection {i}");
            tcp.write_all(msg.as_bytes()).unwrap();
            let mut buf = vec![0; msg.len()];
            tcp.read_exact(&mut buf).unwrap();
            assert_eq!(buf, msg.as_bytes());
            all_open.wait(); // every stream is open at this point
            all_open.wait(); // hold it open until the main thread has looked
            tcp.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            tcp.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
        }));
    }
    all_open.wait();
    assert_eq!(
        pair.db.metric("tapproof_streams_open", &["side=\"inbound\""]),
        N as f64
    );
    assert_eq!(
        pair.web
            .metric("tapproof_handshakes_total", &["side=\"outbound\""]),
        1.0
    );
    assert_eq!(
        pair.db.metric("tapproof_handshakes_total", &["side=\"inbound\""]),
        1.0
    );
    let status = pair.web.status();
    let tunnels = status["tunnels"].as_array().unwrap();
    assert_eq!(tunnels.len(), 1, "{status}");
    assert_eq!(tunnels[0]["streams_open"], N);
    all_open.wait();
    for c in clients {
        c.join().unwrap();
    }
}

/// An outside tool replaces the certificate files mid-stream: the open stream keeps working and
/// new handshakes present the new certificate.
#[test]
fn certificate_files_replaced_mid_stream() {
    let pair = Pair::start(EXE);
    let mut app = TcpStream::connect(pair.app_addr()).unwrap();
    app.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 6];
    app.write_all(b"before").unwrap();
    app.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"before");
    let old_serial = pair.db.status()["certificate"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();

    // Rotate db-1: a new key and certificate, written the way cert-manager or SPIRE would.
    let fresh = pair
        .pki
        .ca
        .issue_with_new_key(&pair.pki.id("db-1"), time::Duration::hours(1))
        .unwrap();
    tapproof_test_util::pki::write_file(&pair.db_id.key, &fresh.key_pem, 0o600);
    tapproof_test_util::pki::write_file(&pair.db_id.cert, &fresh.chain_pem, 0o644);
    pair.db
        .wait_for("certificate reload", Duration::from_secs(10), |a| {
            a.metric("tapproof_certificate_reloads_total", &[]) >= 1.0
        });
    let new_serial = pair.db.status()["certificate"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(old_serial, new_serial);

    app.write_all(b"after!").unwrap();
    app.read_exact(&mut buf).unwrap();
    assert_eq!(
        &buf, b"after!",
        "the stream opened before the rotation must survive it"
    );
    assert_eq!(
        pair.web
            .metric("tapproof_handshakes_total", &["side=\"outbound\""]),
        1.0
    );

    let leaf = tapproof_test_util::tls_client::server_leaf(pair.db.tunnel(), &pair.web_id);
    let presented = tapproof_identity::inspect_svid(&leaf).unwrap();
    assert_eq!(
        presented.serial, new_serial,
        "new handshakes must use the new certificate"
    );
    app.shutdown(Shutdown::Write).unwrap();
}

/// A half-written rotation (new certificate, old key) is refused and the old identity kept.
#[test]
fn mismatched_rotation_keeps_the_old_identity() {
    let pair = Pair::start(EXE);
    let fresh = pair
        .pki
        .ca
        .issue_with_new_key(&pair.pki.id("db-1"), time::Duration::hours(1))
        .unwrap();
    tapproof_test_util::pki::write_file(&pair.db_id.cert, &fresh.chain_pem, 0o644);
    pair.db.wait_for("reload failure", Duration::from_secs(10), |a| {
        a.metric("tapproof_certificate_reload_failures_total", &[]) >= 1.0
    });
    assert!(pair.db.log().contains("does not match"), "{}", pair.db.log());
    assert_eq!(
        round_trip(pair.app_addr(), b"still served").unwrap(),
        b"still served"
    );
}

/// SIGTERM: stop accepting, let the open stream finish, exit 0.
#[test]
fn sigterm_drains_open_streams_then_exits_zero() {
    let mut pair = Pair::start_with(EXE, "drain_timeout = \"20s\"", "");
    let mut app = TcpStream::connect(pair.app_addr()).unwrap();
    app.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    app.write_all(b"one").unwrap();
    let mut buf = [0u8; 3];
    app.read_exact(&mut buf).unwrap();

    pair.db.signal(nix::sys::signal::Signal::SIGTERM);
    pair.db.wait_for("draining", Duration::from_secs(10), |a| {
        a.log().contains("draining")
    });
    assert!(pair.db.try_wait().is_none(), "must wait for the open stream");
    let (code, _) = pair.db.admin_get("/readyz");
    assert_eq!(code, 503, "a draining agent is not ready");

    app.write_all(b"two").unwrap();
    app.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"two", "the open stream keeps working while draining");
    app.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).unwrap();

    let status = pair.db.wait(Duration::from_secs(15));
    assert!(status.success(), "exit status {status}");
    assert!(pair.db.log().contains("drained"));
}

#[test]
fn peers_are_tried_in_turn() {
    let pki = tapproof_test_util::pki::TestPki::new();
    let echo = tapproof_test_util::traffic::EchoServer::start();
    let db_id = pki.node("db-1");
    let web_id = pki.node("web-1");
    let db = AgentProcess::start(EXE, pki.path(), "db-1", &db_config(&pki, &db_id, echo.addr, ""));
    // A port nothing listens on comes first.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let web = AgentProcess::start(
        EXE,
        pki.path(),
        "web-1",
        &tapproof_test_util::fixture::web_config(&pki, &web_id, &[dead, db.tunnel()], "db-1", ""),
    );
    assert_eq!(
        round_trip(web.outbound(0), b"via the second peer").unwrap(),
        b"via the second peer"
    );
    assert!(web.log().contains("peer unreachable"));
}

#[test]
fn reconnects_after_the_peer_restarts() {
    let pki = tapproof_test_util::pki::TestPki::new();
    let echo = tapproof_test_util::traffic::EchoServer::start();
    let db_id = pki.node("db-1");
    let web_id = pki.node("web-1");
    let db = AgentProcess::start(EXE, pki.path(), "db-1", &db_config(&pki, &db_id, echo.addr, ""));
    let tunnel = db.tunnel();
    let web = AgentProcess::start(
        EXE,
        pki.path(),
        "web-1",
        &tapproof_test_util::fixture::web_config(&pki, &web_id, &[tunnel], "db-1", ""),
    );
    assert_eq!(round_trip(web.outbound(0), b"first").unwrap(), b"first");

    assert!(db.terminate(Duration::from_secs(40)).success());
    web.wait_for("the closed tunnel to be noticed", Duration::from_secs(10), |a| {
        a.metric("tapproof_tunnels_open", &["side=\"outbound\""]) == 0.0
    });
    let config = db_config(&pki, &db_id, echo.addr, "").replacen(
        "[tunnel]\nlisten = \"127.0.0.1:0\"",
        &format!("[tunnel]\nlisten = \"{tunnel}\""),
        1,
    );
    let _db = AgentProcess::start(EXE, pki.path(), "db-1-restarted", &config);
    assert_eq!(round_trip(web.outbound(0), b"second").unwrap(), b"second");
    assert_eq!(
        web.metric("tapproof_handshakes_total", &["side=\"outbound\""]),
        2.0
    );
}

/// `tapproof status` reads a running agent; `--log-format json` writes one JSON object per line.
#[test]
fn status_command_and_json_logs() {
    let pki = tapproof_test_util::pki::TestPki::new();
    let echo = tapproof_test_util::traffic::EchoServer::start();
    let db_id = pki.node("db-1");
    let web_id = pki.node("web-1");
    let db = AgentProcess::start_with(
        EXE,
        pki.path(),
        "db-1",
        &db_config(&pki, &db_id, echo.addr, ""),
        &["env", "TAPPROOF_LOG_FORMAT=json"],
    );
    let web = AgentProcess::start(
        EXE,
        pki.path(),
        "web-1",
        &tapproof_test_util::fixture::web_config(&pki, &web_id, &[db.tunnel()], "db-1", ""),
    );
    assert_eq!(round_trip(web.outbound(0), b"hi").unwrap(), b"hi");

    let admin = web.admin().to_string();
    let (code, out, err) = tapproof_test_util::process::run_tapproof(EXE, &["status", "--admin", &admin]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("spiffe://example.org/node/web-1"), "{out}");
    assert!(
        out.contains("spiffe://example.org/node/db-1") && out.contains("X25519MLKEM768"),
        "{out}"
    );

    let log = db.log();
    let mut accepted = false;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["message"] == "tunnel: accepted" {
            accepted = true;
            assert_eq!(v["peer_id"], "spiffe://example.org/node/web-1");
            assert_eq!(v["group"], "X25519MLKEM768");
        }
    }
    assert!(accepted, "{log}");

    // `tapproof selftest` against db-1 (which has the tunnel listener): every probe refused,
    // exit 0; the round is kept on GET /v1/selftest and counted. web-1 has no listener to probe.
    let db_admin = db.admin().to_string();
    let (code, out, err) =
        tapproof_test_util::process::run_tapproof(EXE, &["selftest", "--admin", &db_admin]);
    assert_eq!(code, 0, "{out}{err}");
    for probe in [
        "plaintext",
        "tls12",
        "no_client_cert",
        "foreign_ca",
        "wrong_identity",
    ] {
        assert!(
            out.lines().any(|l| l.contains(probe) && l.contains("refused")),
            "{probe}: {out}"
        );
    }
    assert!(
        out.contains("classical_key_exchange") && out.contains("not_applicable"),
        "{out}"
    );
    assert_eq!(db.metric("tapproof_selftest_accepted", &[]), 0.0);
    assert_eq!(
        db.metric("tapproof_selftest_probes_total", &["result=\"refused\""]),
        5.0
    );
    let (code, _, err) = tapproof_test_util::process::run_tapproof(EXE, &["selftest", "--admin", &admin]);
    assert_ne!(code, 0);
    assert!(err.contains("no tunnel listener"), "{err}");
}

/// SIGHUP re-reads the config: an outbound listener added and removed, a broken file refused
/// (the running config stays), an allow list narrowed, a `[tunnel]` change named and left for the
/// next restart. Through all of it the agents keep running, no tunnel is redialled and a stream
/// held open keeps working.
#[test]
fn sighup_applies_what_it_can_without_dropping_the_tunnel() {
    use nix::sys::signal::Signal;
    let pair = Pair::start(EXE);
    let td = pair.pki.td.clone();
    let mut held = TcpStream::connect(pair.app_addr()).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut echo = |msg: &[u8]| {
        held.write_all(msg).unwrap();
        let mut buf = vec![0; msg.len()];
        held.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg);
    };
    echo(b"before");
    let reloads = |agent: &AgentProcess, result: &str| {
        agent.metric(
            "tapproof_config_reloads_total",
            &[&format!("result=\"{result}\"")],
        )
    };
    let reload = |agent: &AgentProcess, config: &str, result: &str| {
        let before = reloads(agent, result);
        std::fs::write(&agent.config_path, config).unwrap();
        agent.signal(Signal::SIGHUP);
        agent.wait_for(&format!("a reload {result}"), Duration::from_secs(10), |a| {
            reloads(a, result) > before
        });
    };

    // A second outbound listener, to the same peer.
    let web_config = std::fs::read_to_string(&pair.web.config_path).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let second = format!(
        "{web_config}[[outbound]]\nlisten = \"127.0.0.1:{port}\"\nservice = \"db\"\npeers = [\"{}\"]\nserver_id = \"spiffe://{td}/node/db-1\"\n",
        pair.db.tunnel()
    );
    reload(&pair.web, &second, "applied");
    let added: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(round_trip(added, b"added").unwrap(), b"added");
    let listeners = &pair.web.status()["listeners"]["outbound"];
    assert_eq!(listeners.as_array().unwrap().len(), 2, "{listeners}");
    echo(b"after an added listener");

    // A broken file: refused, nothing changes, the agent lives on.
    reload(&pair.web, "trust_domain = ", "refused");
    assert!(pair
        .web
        .log()
        .contains("config not reloaded, the running config stays"));
    assert_eq!(round_trip(added, b"still").unwrap(), b"still");

    // Back to one listener: the added one stops accepting.
    reload(&pair.web, &web_config, "applied");
    let closed = (0..100).any(|_| {
        let gone = TcpStream::connect(added).is_err();
        if !gone {
            std::thread::sleep(Duration::from_millis(20));
        }
        gone
    });
    assert!(closed, "the removed listener is closed");
    echo(b"after a removed listener");

    // db-1 no longer allows web-1: new streams are refused, the open one carries on.
    let db_config = std::fs::read_to_string(&pair.db.config_path).unwrap();
    let narrowed = db_config.replace(
        &format!("\"spiffe://{td}/node/web-1\", "),
        &format!("\"spiffe://{td}/node/someone-else\", "),
    );
    assert_ne!(narrowed, db_config);
    reload(&pair.db, &narrowed, "applied");
    assert_ne!(
        round_trip(pair.app_addr(), b"x").ok(),
        Some(b"x".to_vec()),
        "refused by the new allow list"
    );
    echo(b"after the allow list changed");

    // A [tunnel] change needs a restart: the rest applies, the change is named.
    let moved = db_config.replacen(
        "[tunnel]\nlisten = \"127.0.0.1:0\"",
        "[tunnel]\nlisten = \"127.0.0.1:1\"",
        1,
    );
    assert_ne!(moved, db_config);
    reload(&pair.db, &moved, "partial");
    assert!(
        pair.db
            .log()
            .contains("[tunnel] changed: takes effect at the next restart"),
        "{}",
        pair.db.log()
    );
    assert_eq!(
        round_trip(pair.app_addr(), b"allowed again").unwrap(),
        b"allowed again"
    );
    echo(b"at the end");
    // One tunnel per outbound pool: the first one's, and the added listener's.
    assert_eq!(
        pair.web.metric("tapproof_handshakes_total", &[]),
        2.0,
        "no tunnel redialled"
    );
    assert_eq!(
        pair.db.metric("tapproof_handshakes_total", &[]),
        2.0,
        "no tunnel redialled"
    );
}

/// Peers and forwards may be host names: `localhost` here (which may resolve to ::1 first, where
/// nothing listens: every address is tried in turn).
#[test]
fn peers_and_forwards_by_host_name() {
    use tapproof_test_util::fixture::web_config;
    use tapproof_test_util::pki::TestPki;
    use tapproof_test_util::traffic::EchoServer;
    let pki = TestPki::new();
    let echo = EchoServer::start();
    let (db_id, web_id) = (pki.node("db-1"), pki.node("web-1"));
    let db_text = db_config(&pki, &db_id, echo.addr, "")
        .replace(&echo.addr.to_string(), &format!("localhost:{}", echo.addr.port()));
    assert!(db_text.contains("forward = \"localhost:"), "{db_text}");
    let db = AgentProcess::start(EXE, pki.path(), "db-1", &db_text);
    let web_text = web_config(&pki, &web_id, &[db.tunnel()], "db-1", "").replace(
        &db.tunnel().to_string(),
        &format!("localhost:{}", db.tunnel().port()),
    );
    assert!(web_text.contains("peers = [\"localhost:"), "{web_text}");
    let web = AgentProcess::start(EXE, pki.path(), "web-1", &web_text);
    assert_eq!(round_trip(web.outbound(0), b"by name").unwrap(), b"by name");
    assert_eq!(round_trip(web.outbound(0), b"again").unwrap(), b"again");
}

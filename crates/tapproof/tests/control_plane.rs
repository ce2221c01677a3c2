//! The control plane with real processes: a server on SQLite, agents that join with tokens,
//! renew while traffic flows, restart without a token, and ride out a server outage.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tapproof_test_util::process::{run_tapproof, AgentProcess};
use tapproof_test_util::server::{control_section, init, ServerProcess};
use tapproof_test_util::traffic::{round_trip, EchoServer};

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");
const TD: &str = "example.org";

fn db_config(data_dir: &std::path::Path, token: &str, forward: SocketAddr, tunnel: &str) -> String {
    format!(
        "trust_domain = \"{TD}\"\n{}[audit]\nreport_interval_secs = 2\n[admin]\nlisten = \"127.0.0.1:0\"\n[tunnel]\nlisten = \"{tunnel}\"\n\
         [[inbound]]\nservice = \"db\"\nforward = \"{forward}\"\nallow = [\"spiffe://{TD}/node/web-1\"]\n",
        control_section(data_dir, token)
    )
}

fn web_config(data_dir: &std::path::Path, token: &str, tunnel: SocketAddr) -> String {
    format!(
        "trust_domain = \"{TD}\"\n{}[audit]\nreport_interval_secs = 2\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"db\"\npeers = [\"{tunnel}\"]\nserver_id = \"spiffe://{TD}/node/db-1\"\n",
        control_section(data_dir, token)
    )
}

struct Setup {
    dir: tempfile::TempDir,
    server: ServerProcess,
    echo: EchoServer,
    db: AgentProcess,
    web: AgentProcess,
}

fn setup(leaf_ttl: &str) -> Setup {
    setup_with(leaf_ttl, &[])
}

/// `setup` with more `server run` arguments.
fn setup_with(leaf_ttl: &str, server_args: &[&str]) -> Setup {
    let dir = tempfile::Builder::new().prefix("tapproof-cp-").tempdir().unwrap();
    let data = init(EXE, dir.path(), TD);
    let server = ServerProcess::start_with_args(EXE, &data, "127.0.0.1:0", leaf_ttl, None, server_args);
    let echo = EchoServer::start();
    let db_token = server.token(EXE, "db-1", &["db"], "5m");
    let db = AgentProcess::start(
        EXE,
        dir.path(),
        "db-1",
        &db_config(&dir.path().join("db-1"), &db_token, echo.addr, "127.0.0.1:0"),
    );
    let web_token = server.token(EXE, "web-1", &[], "5m");
    let web = AgentProcess::start(
        EXE,
        dir.path(),
        "web-1",
        &web_config(&dir.path().join("web-1"), &web_token, db.tunnel()),
    );
    Setup {
        dir,
        server,
        echo,
        db,
        web,
    }
}

/// Sends requests (each a new app connection) until stopped; counts successes and failures.
fn load(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, std::thread::JoinHandle<()>) {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (ok2, failed2) = (ok.clone(), failed.clone());
    let handle = std::thread::spawn(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let msg = format!("request {i}");
            match round_trip(addr, msg.as_bytes()) {
                Ok(back) if back == msg.as_bytes() => ok2.fetch_add(1, Ordering::Relaxed),
                other => {
                    eprintln!("request {i} failed: {other:?}");
                    failed2.fetch_add(1, Ordering::Relaxed)
                }
            };
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (ok, failed, handle)
}

/// Agents join with tokens, then 30 s leaves rotate at least 3 times on both sides while a client
/// keeps sending requests: zero failures, and new tunnels are made with the rotated certificates.
#[test]
fn join_then_rotate_under_load_without_a_failed_request() {
    let s = setup("30s");
    assert_eq!(round_trip(s.web.outbound(0), b"joined").unwrap(), b"joined");
    assert_eq!(s.db.status()["id"], "spiffe://example.org/node/db-1");
    // db-1's token registered service db: the agent holds that identity too, key 0600.
    let svc = std::fs::read_to_string(s.dir.path().join("db-1/svc-db.pem")).unwrap();
    let leaf = tapproof_identity::ca::first_der(&svc).unwrap();
    assert_eq!(
        tapproof_identity::inspect_svid(&leaf).unwrap().id.to_string(),
        "spiffe://example.org/svc/db"
    );
    let mode = std::fs::metadata(s.dir.path().join("db-1/svc-db.key"))
        .unwrap()
        .permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    let svc_serial = tapproof_identity::inspect_svid(&leaf).unwrap().serial;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, handle) = load(s.web.outbound(0), stop.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    while s.db.metric("tapproof_renewals_total", &[]) < 3.0
        || s.web.metric("tapproof_renewals_total", &[]) < 3.0
    {
        assert!(
            Instant::now() < deadline,
            "3 renewals each within 120 s; db log:\n{}\nweb log:\n{}",
            s.db.log(),
            s.web.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request may fail across rotations"
    );
    assert!(ok.load(Ordering::Relaxed) > 100, "the load ran throughout");
    assert!(
        s.web.metric("tapproof_handshakes_total", &["side=\"outbound\""]) >= 2.0,
        "tunnels are re-made once a certificate they were authenticated with expires"
    );
    assert_eq!(s.web.metric("tapproof_renewal_failures_total", &[]), 0.0);
    let svc = std::fs::read_to_string(s.dir.path().join("db-1/svc-db.pem")).unwrap();
    let renewed = tapproof_identity::inspect_svid(&tapproof_identity::ca::first_der(&svc).unwrap()).unwrap();
    assert_ne!(
        renewed.serial, svc_serial,
        "service identities are renewed with the node's"
    );

    // The audit log recorded the joins and renewals, and its chain verifies.
    let data = s.server.data_dir.to_str().unwrap().to_owned();
    let (code, out, _) = run_tapproof(EXE, &["server", "audit-log", "show", "--data-dir", &data]);
    assert_eq!(code, 0);
    assert!(out.contains("node.join") && out.contains("cert.issue"), "{out}");
    let (code, out, err) = run_tapproof(EXE, &["server", "audit-log", "verify", "--data-dir", &data]);
    assert_eq!(code, 0, "{out}{err}");
    drop(s.echo);
    drop(s.dir);
}

/// A restart needs no new token; a server outage leaves traffic flowing on the current
/// certificate (and says so), and renewal resumes when the server is back.
#[test]
fn restart_without_token_and_ride_out_a_server_outage() {
    let mut s = setup("30s");
    assert_eq!(round_trip(s.web.outbound(0), b"one").unwrap(), b"one");

    // Restart web-1 from its data dir: the token in its config is used up, and not needed.
    let web_dir = s.dir.path().join("web-1");
    let config = std::fs::read_to_string(s.dir.path().join("web-1.toml")).unwrap();
    assert!(s.web.terminate_ref(Duration::from_secs(40)).success());
    s.web = AgentProcess::start(EXE, s.dir.path(), "web-1-restarted", &config);
    assert!(
        s.web.log().contains("using the identity kept in the data dir"),
        "{}",
        s.web.log()
    );
    assert!(web_dir.join("node.key").exists());
    assert_eq!(round_trip(s.web.outbound(0), b"two").unwrap(), b"two");

    // Server down: renewal fails, traffic keeps flowing.
    let data = s.server.data_dir.clone();
    let addr = s.server.addr;
    s.server.stop_ref();
    // Any exchange tells: the state feed's next call finds the server gone within seconds,
    // long before the next renewal.
    s.web
        .wait_for("control_plane_up 0", Duration::from_secs(10), |a| {
            a.metric("tapproof_control_plane_up", &[]) == 0.0
        });
    s.web.wait_for("a failed renewal", Duration::from_secs(60), |a| {
        a.metric("tapproof_renewal_failures_total", &[]) >= 1.0
    });
    assert_eq!(s.web.metric("tapproof_control_plane_up", &[]), 0.0);
    assert!(s.web.log().contains("serving on the current certificate"));
    assert_eq!(round_trip(s.web.outbound(0), b"three").unwrap(), b"three");

    // Server back on the same address: renewal resumes.
    let before = s.web.metric("tapproof_renewals_total", &[]);
    s.server = ServerProcess::start(EXE, &data, &addr.to_string(), "30s");
    s.web
        .wait_for("renewal after the outage", Duration::from_secs(60), |a| {
            a.metric("tapproof_renewals_total", &[]) > before
        });
    assert_eq!(s.web.metric("tapproof_control_plane_up", &[]), 1.0);
    assert_eq!(round_trip(s.web.outbound(0), b"four").unwrap(), b"four");
}

/// The lock-out of issue 11: a server that crashed (SIGKILL) and stayed down until the agents'
/// certificates expired. The agents refuse to serve on an expired certificate, keep trying, and
/// renew by themselves when the server returns (no new token), then carry traffic again.
#[test]
fn a_node_whose_certificate_expired_in_an_outage_recovers_without_a_token() {
    let mut s = setup("30s");
    assert_eq!(round_trip(s.web.outbound(0), b"one").unwrap(), b"one");
    let data = s.server.data_dir.clone();
    let addr = s.server.addr;
    s.server.kill_ref();
    for agent in [&s.web, &s.db] {
        agent.wait_for("the certificate to expire", Duration::from_secs(45), |a| {
            a.metric("tapproof_certificate_expiry_seconds", &[]) < 0.0
        });
    }
    // Retries got denser as expiry neared (never a sleep past it), and expiry is said loudly
    // (by the first renewal attempt after it: within about a second of the metric going below 0).
    s.web
        .wait_for("the expiry said in the log", Duration::from_secs(10), |a| {
            a.log().contains("certificate expired and cannot renew")
        });
    let before = s.web.metric("tapproof_renewals_total", &[]);
    s.server = ServerProcess::start(EXE, &data, &addr.to_string(), "30s");
    let back = Instant::now();
    for agent in [&s.web, &s.db] {
        agent.wait_for(
            "renewal with the expired certificate",
            Duration::from_secs(45),
            |a| a.metric("tapproof_certificate_expiry_seconds", &[]) > 0.0,
        );
    }
    assert!(s.web.metric("tapproof_renewals_total", &[]) > before);
    tapproof_test_util::traffic::wait_for_round_trip(
        s.web.outbound(0),
        b"two",
        Duration::from_secs(10),
        "no traffic after recovery",
    );
    assert!(s.server.log().contains("renewal with an expired certificate"));
    eprintln!(
        "recovered {:.1} s after the server returned",
        back.elapsed().as_secs_f64()
    );
}

/// A suspended VM: web-1 stopped (SIGSTOP) for longer than its certificate's lifetime, then
/// continued. Its clock jumped past the expiry while it slept; it renews at once (the renewal
/// loop looks at the wall clock, not only its timers) with the expired certificate, and carries
/// traffic again.
#[test]
fn an_agent_suspended_past_its_certificate_recovers_when_continued() {
    let s = setup("30s");
    assert_eq!(round_trip(s.web.outbound(0), b"one").unwrap(), b"one");
    s.web.signal(nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(34));
    s.web.signal(nix::sys::signal::Signal::SIGCONT);
    let woke = Instant::now();
    s.web
        .wait_for("renewal after waking", Duration::from_secs(40), |a| {
            a.metric("tapproof_certificate_expiry_seconds", &[]) > 0.0
        });
    tapproof_test_util::traffic::wait_for_round_trip(
        s.web.outbound(0),
        b"two",
        Duration::from_secs(20),
        "no traffic after waking",
    );
    eprintln!(
        "fault: agent suspended 34 s (certificate lifetime 30 s) -> serving again {:.1} s after SIGCONT",
        woke.elapsed().as_secs_f64()
    );
}

/// Bad tokens: refused with a clear error and code, an audit row, and the agent exits 2.
#[test]
fn bad_tokens_are_refused_and_audited() {
    let dir = tempfile::Builder::new().prefix("tapproof-cp-").tempdir().unwrap();
    let data = init(EXE, dir.path(), TD);
    let server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "1h");
    let token = server.token(EXE, "web-1", &[], "5m");
    let write = |name: &str, token: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        let config = format!(
            "trust_domain = \"{TD}\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n",
            control_section(&dir.path().join(name), token)
        );
        std::fs::write(&path, config).unwrap();
        path
    };
    let first = AgentProcess::start(
        EXE,
        dir.path(),
        "first",
        &std::fs::read_to_string(write("first", &token)).unwrap(),
    );
    assert_eq!(first.status()["id"], "spiffe://example.org/node/web-1");

    let cases = [
        ("reused", token.clone(), "token_used"),
        ("malformed", "tpj1.nonsense".to_owned(), "malformed join token"),
        (
            "forged",
            {
                let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
                parts[4] = "00".repeat(32);
                parts.join(".")
            },
            "token_invalid",
        ),
    ];
    for (name, token, want) in cases {
        let path = write(name, &token);
        let (code, _, err) = run_tapproof(EXE, &["agent", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
        assert!(
            !dir.path().join(name).join("node.key").exists(),
            "{name}: nothing kept after a refused join"
        );
    }
    let expired = server.token(EXE, "web-2", &[], "1s");
    std::thread::sleep(Duration::from_millis(2100));
    let (code, _, err) = run_tapproof(
        EXE,
        &["agent", "--config", write("expired", &expired).to_str().unwrap()],
    );
    assert_eq!(code, 2);
    assert!(err.contains("token_expired"), "{err}");

    let (_, out, _) = run_tapproof(
        EXE,
        &[
            "server",
            "audit-log",
            "show",
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("join.refused") && out.contains("token_used") && out.contains("token_expired"),
        "{out}"
    );
}

/// A row edited directly in the database is found by `audit-log verify`.
#[test]
fn audit_log_verify_finds_an_edited_row() {
    let dir = tempfile::Builder::new().prefix("tapproof-cp-").tempdir().unwrap();
    let data = init(EXE, dir.path(), TD);
    let server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "1h");
    for node in ["a", "b", "c"] {
        server.token(EXE, node, &["svc"], "5m");
    }
    server.stop();
    let data_s = data.to_str().unwrap();
    let (code, out, _) = run_tapproof(EXE, &["server", "audit-log", "verify", "--data-dir", data_s]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 rows"), "{out}");

    let db = data.join("tapproof.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", db.display()))
            .await
            .unwrap();
        sqlx::query("UPDATE audit_log SET details = replace(details, '\"b\"', '\"mallory\"') WHERE seq = 3")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    });
    let (code, out, err) = run_tapproof(EXE, &["server", "audit-log", "verify", "--data-dir", data_s]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("row 3") && out.contains("edited"), "{out}");
}

/// Revoking a node by name, by SPIFFE ID or by its certificate's serial closes its open tunnel
/// and refuses its next handshake within 5 s, and the server refuses its renewal.
#[test]
fn revocation_of_every_kind_closes_tunnels_within_five_seconds() {
    for kind in ["--node", "--id", "--serial"] {
        revoke_and_check(kind);
    }
}

fn revoke_and_check(kind: &str) {
    use std::io::{Read, Write};
    let s = setup("1h");
    // An app connection through the tunnel, held open.
    let mut app = std::net::TcpStream::connect(s.web.outbound(0)).unwrap();
    app.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    app.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    app.read_exact(&mut buf).unwrap();
    // Both agents follow the state feed before the revocation (version 0).
    std::thread::sleep(Duration::from_millis(500));
    let value = match kind {
        "--node" => "web-1".to_owned(),
        "--id" => format!("spiffe://{TD}/node/web-1"),
        _ => s.web.status()["certificate"]["serial"]
            .as_str()
            .unwrap()
            .to_owned(),
    };

    let data = s.server.data_dir.to_str().unwrap().to_owned();
    let started = Instant::now();
    let (code, out, err) = run_tapproof(
        EXE,
        &[
            "server",
            "revoke",
            "--data-dir",
            &data,
            kind,
            &value,
            "--reason",
            "stolen",
        ],
    );
    assert_eq!(code, 0, "{kind}: {out}{err}");
    s.db.wait_for("web-1's tunnel to close", Duration::from_secs(5), |a| {
        a.metric("tapproof_tunnels_open", &["side=\"inbound\""]) == 0.0
    });
    let mut rest = Vec::new();
    let ended = app.read_to_end(&mut rest);
    assert!(
        ended.is_err() || rest.is_empty(),
        "{kind}: the held connection is cut"
    );
    // The next handshake from web-1 is refused.
    assert!(
        round_trip(s.web.outbound(0), b"again")
            .map(|b| b.is_empty())
            .unwrap_or(true),
        "{kind}: no byte may flow after revocation"
    );
    s.db.wait_for("the refused handshake", Duration::from_secs(5), |a| {
        a.metric(
            "tapproof_handshake_failures_total",
            &["side=\"inbound\"", "reason=\"revoked\""],
        ) >= 1.0
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{kind}: took {:?}",
        started.elapsed()
    );
    let (_, out, _) = run_tapproof(EXE, &["server", "audit-log", "show", "--data-dir", &data]);
    assert!(out.contains("revocation.add") && out.contains("stolen"), "{out}");
    // db-1 recorded the refused handshake and reported it.
    wait_for_handshakes(&s.server.data_dir, |r| {
        r.iter().any(|h| {
            h["node"] == "db-1"
                && h["outcome"] == "refused"
                && h["reason"] == "revoked"
                && h["peer_id"] == format!("spiffe://{TD}/node/web-1")
        })
    });
    // The other agent acknowledged it through the state feed within the same five seconds; the
    // revoked node is not expected to; nobody is pending.
    let deadline = Instant::now() + Duration::from_secs(10);
    let show = ["server", "revocation", "show", "--data-dir", &data, "--json"];
    let report = loop {
        let (code, out, err) = run_tapproof(EXE, &show);
        assert_eq!(code, 0, "{out}{err}");
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        if !report["applied"].as_array().unwrap().is_empty() || Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let applied = report["applied"].as_array().unwrap();
    assert_eq!(applied.len(), 1, "{kind}: {report}");
    assert_ne!(applied[0]["node"], "web-1", "{report}");
    assert!(applied[0]["seconds"].as_i64().unwrap() <= 5, "{kind}: {report}");
    assert_eq!(report["pending"], serde_json::json!([]), "{kind}: {report}");
    let (_, text, _) = run_tapproof(EXE, &show[..5]);
    assert!(
        text.contains("applied by 1 node(s)") && text.contains("pending: none"),
        "{text}"
    );
    // The revoked node's renewal (and every other call) is refused and audited: the agent's
    // state feed asks again within seconds.
    s.server_refuses_web(kind, &data);
}

impl Setup {
    /// web-1's calls to the server are refused once the revocation reached it: by the TLS
    /// listener for a serial, by the API (`<what>.refused` rows) for the others.
    fn server_refuses_web(&self, kind: &str, data: &str) {
        let expected = match kind {
            "--node" => "node_revoked",
            "--id" => "identity_revoked",
            _ => "certificate_revoked",
        };
        let action = if kind == "--serial" {
            "handshake.refused"
        } else {
            "state.refused"
        };
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let (_, out, _) = run_tapproof(EXE, &["server", "audit-log", "show", "--data-dir", data]);
            if out.contains(action) && out.contains(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{kind}: no {action} row with {expected}; audit log:\n{out}\nserver log:\n{}",
                self.server.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Two server replicas share one PostgreSQL database and serve joins at once: every agent joins
/// exactly once, one token races on both replicas and only one wins, and serials stay unique.
#[test]
fn two_replicas_on_postgresql_issue_concurrently() {
    let Ok(admin) = std::env::var("TAPPROOF_TEST_POSTGRES") else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the PostgreSQL replica test (TAPPROOF_TEST_POSTGRES)"
        );
        eprintln!("SKIPPED replica test: TAPPROOF_TEST_POSTGRES is not set (run scripts/postgres.sh)");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let name = format!("tapproof_replicas_{}", std::process::id());
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&pool)
            .await
            .unwrap();
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
            .unwrap();
    });
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);

    let dir = tempfile::Builder::new()
        .prefix("tapproof-replicas-")
        .tempdir()
        .unwrap();
    // Two replicas: the same store and key-encryption key, each its own data dir.
    let (a_dir, b_dir) = tapproof_test_util::server::init_replicas(EXE, dir.path(), TD, &url);
    assert!(
        !std::fs::read_to_string(a_dir.join("server.json"))
            .unwrap()
            .contains("tapproof_test@"),
        "no password in server.json"
    );
    let start =
        |data: &std::path::Path| ServerProcess::start_with_store(EXE, data, "127.0.0.1:0", "1h", Some(&url));
    let a = start(&a_dir);
    let b = start(&b_dir);

    // One token, two replicas, at the same time: exactly one join succeeds.
    let racer = a.token(EXE, "racer", &[], "5m");
    let nodes: Vec<(String, String)> = (0..8)
        .map(|i| (format!("n{i}"), a.token(EXE, &format!("n{i}"), &["svc"], "5m")))
        .collect();
    let agent_config = |name: &str, token: &str, server: SocketAddr| {
        format!(
            "trust_domain = \"{TD}\"\n[control]\ndata_dir = \"{}\"\ntoken = \"{token}\"\nserver = \"{server}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join(name).display()
        )
    };
    let mut handles = Vec::new();
    for (i, server) in [a.addr, b.addr].into_iter().enumerate() {
        let path = dir.path().join(format!("racer-{i}.toml"));
        std::fs::write(&path, agent_config(&format!("racer-{i}"), &racer, server)).unwrap();
        handles.push(std::thread::spawn(move || run_check(&path)));
    }
    let wins: Vec<bool> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        wins.iter().filter(|w| **w).count(),
        1,
        "exactly one replica may accept the token: {wins:?}"
    );

    // Eight agents join at once, alternating replicas.
    let mut agents = Vec::new();
    std::thread::scope(|scope| {
        let mut joins = Vec::new();
        for (i, (node, token)) in nodes.iter().enumerate() {
            let server = if i % 2 == 0 { a.addr } else { b.addr };
            let config = agent_config(node, token, server);
            let dir = dir.path().to_owned();
            let node = node.clone();
            joins
                .push(scope.spawn(move || AgentProcess::start(EXE, &dir, &format!("agent-{node}"), &config)));
        }
        for j in joins {
            agents.push(j.join().unwrap());
        }
    });
    let mut serials = std::collections::HashSet::new();
    for agent in &agents {
        serials.insert(
            agent.status()["certificate"]["serial"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(serials.len(), 8, "every agent holds its own certificate");
    let (code, out, err) = run_tapproof(
        EXE,
        &[
            "server",
            "audit-log",
            "verify",
            "--data-dir",
            a_dir.to_str().unwrap(),
            "--store",
            &url,
        ],
    );
    assert_eq!(code, 0, "one unforked chain across replicas: {out}{err}");
    drop(agents);
    a.stop();
    b.stop();
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&pool)
            .await;
    });
}

/// Starts an agent on `config` just long enough to see whether it joins; true when it did.
fn run_check(config: &std::path::Path) -> bool {
    let mut child = std::process::Command::new(EXE)
        .args(["agent", "--config", config.to_str().unwrap(), "--ready-file"])
        .arg(config.with_extension("ready"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if config.with_extension("ready").exists() {
            let _ = child.kill();
            let _ = child.wait();
            return true;
        }
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        assert!(Instant::now() < deadline, "agent neither joined nor failed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bad API input gets a JSON error with a stable code, an audit row where it is a security
/// event, and no change to stored state (a token survives a refused join).
#[test]
fn api_refuses_bad_input_with_codes() {
    use tapproof_test_util::server::control_request;
    use tapproof_tls::ServerTrust;
    let dir = tempfile::Builder::new()
        .prefix("tapproof-api-")
        .tempdir()
        .unwrap();
    let data = init(EXE, dir.path(), TD);
    let server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "1h");
    let token = server.token(EXE, "web-1", &["web"], "5m");
    let pin = tapproof_identity::JoinToken::parse(&token).unwrap().root_pin;
    let call = |path: &str, body: Vec<u8>| {
        control_request(server.addr, ServerTrust::Pin(pin), None, "POST", path, body)
    };
    let code = |v: &serde_json::Value| v["error"]["code"].as_str().unwrap_or("<none>").to_owned();

    let (status, v) = call("/v1/join", b"{not json".to_vec());
    assert_eq!((status, code(&v).as_str()), (400, "bad_json"), "{v}");
    let (status, v) = call("/v1/join", br#"{"token":"x","csr":"y","extra":1}"#.to_vec());
    assert_eq!(
        (status, code(&v).as_str()),
        (400, "bad_json"),
        "unknown fields are refused: {v}"
    );
    let (status, v) = call("/v1/join", vec![b' '; 100 * 1024]);
    assert_eq!((status, code(&v).as_str()), (413, "body_too_large"), "{v}");
    let (status, v) = call(
        "/v1/join",
        serde_json::to_vec(&serde_json::json!({"token": "tpj1.zz", "csr": ""})).unwrap(),
    );
    assert_eq!((status, code(&v).as_str()), (400, "token_malformed"), "{v}");

    // CSRs the CA must not sign: the token is not consumed by any of them.
    let key384 = rcgen_csr(true, None);
    let other_node = rcgen_csr(false, Some("spiffe://example.org/node/db-1"));
    let foreign = rcgen_csr(false, Some("spiffe://evil.org/node/web-1"));
    for (csr, why) in [
        (key384, "key type"),
        (other_node, "may only be issued"),
        (foreign, "another trust domain"),
    ] {
        let (status, v) = call(
            "/v1/join",
            serde_json::to_vec(&serde_json::json!({ "token": token, "csr": csr })).unwrap(),
        );
        assert_eq!((status, code(&v).as_str()), (400, "csr_invalid"), "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(why), "{v}");
    }
    let (good_csr, key) = tapproof_identity::new_csr(None).unwrap();
    let (status, v) = call(
        "/v1/join",
        serde_json::to_vec(&serde_json::json!({ "token": token, "csr": good_csr })).unwrap(),
    );
    assert_eq!(status, 200, "the token survived the refused joins: {v}");
    let chain = v["identity"]["chain_pem"].as_str().unwrap().to_owned();
    let bundle: Vec<String> = v["bundle"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(v["services"], serde_json::json!(["web"]));

    // Signing needs a node identity, and only for what is registered to the node.
    let (status, v) = call("/v1/sign", br#"{"csrs":[]}"#.to_vec());
    assert_eq!((status, code(&v).as_str()), (401, "identity_required"), "{v}");
    let as_node = |body: serde_json::Value| {
        control_request(
            server.addr,
            ServerTrust::Bundle(bundle.clone()),
            Some((&chain, &key)),
            "POST",
            "/v1/sign",
            serde_json::to_vec(&body).unwrap(),
        )
    };
    let (csr, _) = tapproof_identity::new_csr(None).unwrap();
    let (status, v) =
        as_node(serde_json::json!({ "csrs": [{ "id": "spiffe://example.org/svc/db", "csr": csr }] }));
    assert_eq!((status, code(&v).as_str()), (403, "not_registered"), "{v}");
    let (status, v) =
        as_node(serde_json::json!({ "csrs": [{ "id": "spiffe://example.org/svc/web", "csr": csr }] }));
    assert_eq!(status, 200, "a registered service identity is issued: {v}");
    assert_eq!(v["identities"][0]["id"], "spiffe://example.org/svc/web");

    let (status, v) = control_request(
        server.addr,
        ServerTrust::Pin(pin),
        None,
        "GET",
        "/v1/nothing",
        vec![],
    );
    assert_eq!((status, code(&v).as_str()), (404, "not_found"));
    let (status, openapi) = control_request(
        server.addr,
        ServerTrust::Pin(pin),
        None,
        "GET",
        "/v1/openapi.json",
        vec![],
    );
    assert_eq!(status, 200);
    for route in [
        "/v1/join",
        "/v1/sign",
        "/v1/bundle",
        "/v1/state",
        "/v1/nodes",
        "/v1/registrations",
        "/v1/revocations",
        "/v1/audit-log",
        "/v1/policy",
        "/v1/coverage",
        "/v1/dashboard",
        "/dashboard",
        "/healthz",
    ] {
        assert!(openapi["paths"].get(route).is_some(), "OpenAPI lacks {route}");
    }
    let (_, out, _) = run_tapproof(
        EXE,
        &[
            "server",
            "audit-log",
            "show",
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("csr.refused") && out.contains("sign.refused"),
        "{out}"
    );
}

/// A CSR with a P-384 key (refused type) or a P-256 key naming `uri`.
fn rcgen_csr(p384: bool, uri: Option<&str>) -> String {
    let alg = if p384 {
        &rcgen::PKCS_ECDSA_P384_SHA384
    } else {
        &rcgen::PKCS_ECDSA_P256_SHA256
    };
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut params = rcgen::CertificateParams::default();
    if let Some(u) = uri {
        params.subject_alt_names = vec![rcgen::SanType::URI(u.try_into().unwrap())];
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// A full root rollover (prepare, activate, retire) under continuous load: zero failed requests,
/// both agents end on the new root alone, and new tunnels are made under it.
#[test]
fn root_rollover_under_load_without_a_failed_request() {
    rollover_under_load(None);
}

/// The same rollover from the ECDSA P-256 root `server init` makes to an ML-DSA-87 one
/// (`prepare --profile cnsa2`): zero failed requests, and the agents end on chains signed with
/// ML-DSA-87 throughout.
#[test]
fn root_rollover_from_ecdsa_to_ml_dsa_87_under_load_without_a_failed_request() {
    rollover_under_load(Some("cnsa2"));
}

/// The certificate chain an agent with `[control]` holds in its data dir.
fn chain_of(data_dir: &std::path::Path) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(tapproof_agent::control::identity_files(data_dir).cert)
        .expect("the agent's certificate file");
    rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.unwrap().as_ref().to_vec())
        .collect()
}

fn rollover_under_load(profile: Option<&str>) {
    let s = setup("30s");
    let data = s.server.data_dir.to_str().unwrap().to_owned();
    let rotate = |step: &str| {
        let mut args = vec!["server", "ca", "rotate", step, "--data-dir", &data];
        if let (Some(p), "prepare") = (profile, step) {
            args.extend(["--profile", p]);
        }
        run_tapproof(EXE, &args)
    };
    let roots = |a: &AgentProcess| a.status()["certificate"]["bundle_roots"].as_u64().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, handle) = load(s.web.outbound(0), stop.clone());

    let (code, out, err) = rotate("prepare");
    assert_eq!(code, 0, "{out}{err}");
    for a in [&s.db, &s.web] {
        a.wait_for("the new root in the bundle", Duration::from_secs(30), |a| {
            roots(a) == 2
        });
    }
    let (code, out, err) = rotate("retire");
    assert_ne!(code, 0, "nothing to retire before activation: {out}");
    assert!(err.contains("no old root"), "{err}");

    let (code, out, err) = rotate("activate");
    assert_eq!(code, 0, "{out}{err}");
    let (db_before, web_before) = (
        s.db.metric("tapproof_renewals_total", &[]),
        s.web.metric("tapproof_renewals_total", &[]),
    );
    s.db.wait_for("a renewal under the new root", Duration::from_secs(40), |a| {
        a.metric("tapproof_renewals_total", &[]) > db_before
    });
    s.web
        .wait_for("a renewal under the new root", Duration::from_secs(40), |a| {
            a.metric("tapproof_renewals_total", &[]) > web_before
        });

    // Retiring early would break certificates from before the activation: refused until they expire.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, out, err) = rotate("retire");
        if code == 0 {
            break;
        }
        assert!(err.contains("still valid"), "{out}{err}");
        assert!(Instant::now() < deadline, "retire never allowed: {err}");
        std::thread::sleep(Duration::from_secs(2));
    }
    for a in [&s.db, &s.web] {
        a.wait_for("the old root out of the bundle", Duration::from_secs(30), |a| {
            roots(a) == 1
        });
    }
    // New tunnels under the new root alone.
    let handshakes = s.web.metric("tapproof_handshakes_total", &["side=\"outbound\""]);
    s.web
        .wait_for("a tunnel made after retirement", Duration::from_secs(40), |a| {
            a.metric("tapproof_handshakes_total", &["side=\"outbound\""]) > handshakes
        });
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request may fail during the rollover"
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    let (_, out, _) = run_tapproof(EXE, &["server", "audit-log", "show", "--data-dir", &data]);
    assert!(
        out.contains("ca.prepare") && out.contains("ca.activate") && out.contains("ca.retire"),
        "{out}"
    );
    let ml_dsa = profile == Some("cnsa2");
    for name in ["db-1", "web-1"] {
        let chain = chain_of(&s.dir.path().join(name));
        assert_eq!(
            tapproof_identity::signed_with_ml_dsa_87(chain.iter().map(Vec::as_slice)),
            ml_dsa,
            "{name}'s chain after the rollover"
        );
    }
}

/// A fleet on the `cnsa2` profile from the start: `server init --profile cnsa2` (ML-DSA-87
/// root and intermediate, the key sealed and read back by `server run`), agents with `[control]`
/// and `crypto_profile = "cnsa2"` join with ML-DSA-87 CSRs, talk on ML-KEM-1024 and
/// TLS_AES_256_GCM_SHA384, and renew (new ML-DSA-87 keys) without a failed request.
#[test]
fn a_cnsa2_fleet_joins_renews_and_talks_on_ml_kem_1024() {
    let dir = tempfile::Builder::new()
        .prefix("tapproof-cnsa2-")
        .tempdir()
        .unwrap();
    let data = dir.path().join("server");
    let (code, out, err) = run_tapproof(
        EXE,
        &[
            "server",
            "init",
            "--trust-domain",
            TD,
            "--data-dir",
            data.to_str().unwrap(),
            "--profile",
            "cnsa2",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "30s");
    let echo = EchoServer::start();
    let cnsa2 = |config: String| config.replace("[admin]", "[tunnel]\ncrypto_profile = \"cnsa2\"\n[admin]");
    let db_token = server.token(EXE, "db-1", &["db"], "5m");
    let db_text = db_config(&dir.path().join("db-1"), &db_token, echo.addr, "127.0.0.1:0")
        .replace("[tunnel]\n", "[tunnel]\ncrypto_profile = \"cnsa2\"\n");
    let db = AgentProcess::start(EXE, dir.path(), "db-1", &db_text);
    let web_token = server.token(EXE, "web-1", &[], "5m");
    let web = AgentProcess::start(
        EXE,
        dir.path(),
        "web-1",
        &cnsa2(web_config(&dir.path().join("web-1"), &web_token, db.tunnel())),
    );
    assert_eq!(round_trip(web.outbound(0), b"pq").unwrap(), b"pq");
    let tunnel = &web.status()["tunnels"][0];
    assert_eq!(tunnel["key_exchange"], "MLKEM1024", "{tunnel}");
    assert_eq!(tunnel["cipher"], "TLS_AES_256_GCM_SHA384", "{tunnel}");
    for name in ["db-1", "web-1"] {
        let chain = chain_of(&dir.path().join(name));
        assert!(
            tapproof_identity::signed_with_ml_dsa_87(chain.iter().map(Vec::as_slice)),
            "{name}"
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, handle) = load(web.outbound(0), stop.clone());
    let before = web.metric("tapproof_renewals_total", &[]);
    web.wait_for("a renewal", Duration::from_secs(40), |a| {
        a.metric("tapproof_renewals_total", &[]) > before
    });
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "{}", web.log());
    assert!(ok.load(Ordering::Relaxed) > 10);

    // Both ends' handshake records reach the server with the coverage reports (every 2 s here):
    // TLS 1.3, AES-256-GCM, ML-KEM-1024 and the peer's ML-DSA-87 signature, each end naming the
    // other. They were kept on each node's disk (0600) first.
    let records = wait_for_handshakes(&data, |r| {
        ["inbound", "outbound"]
            .iter()
            .all(|side| r.iter().any(|h| h["side"] == *side && h["outcome"] == "ok"))
    });
    for h in records.iter().filter(|h| h["outcome"] == "ok") {
        let (node, peer) = match h["side"].as_str().unwrap() {
            "inbound" => ("db-1", "web-1"),
            _ => ("web-1", "db-1"),
        };
        assert_eq!(h["node"], node, "{h}");
        assert_eq!(h["peer_id"], format!("spiffe://{TD}/node/{peer}"), "{h}");
        assert_eq!(h["tls_version"], "TLSv1.3", "{h}");
        assert_eq!(h["cipher"], "TLS_AES_256_GCM_SHA384", "{h}");
        assert_eq!(h["group"], "MLKEM1024", "{h}");
        assert_eq!(h["signature_scheme"], "mldsa87", "{h}");
    }
    let file = dir.path().join("web-1").join("handshakes.jsonl");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", file.display());
    let (code, text, err) = run_tapproof(
        EXE,
        &[
            "server",
            "handshakes",
            "--data-dir",
            data.to_str().unwrap(),
            "--from",
            "1h",
        ],
    );
    assert_eq!(code, 0, "{text}{err}");
    assert!(
        text.contains("TLSv1.3 TLS_AES_256_GCM_SHA384 MLKEM1024 mldsa87"),
        "{text}"
    );
}

/// The server's handshake records (`server handshakes --json`) once `done` holds (within 20 s).
fn wait_for_handshakes(
    data: &std::path::Path,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = run_tapproof(
            EXE,
            &[
                "server",
                "handshakes",
                "--data-dir",
                data.to_str().unwrap(),
                "--json",
            ],
        );
        assert_eq!(code, 0, "{out}{err}");
        let records: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        if done(&records) {
            return records;
        }
        assert!(Instant::now() < deadline, "no such handshake records: {out}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// An outbound that names only a service finds its peer and the identity to expect in the
/// control plane's directory (which node fronts the service, where its tunnel listens).
#[test]
fn outbound_finds_its_peer_in_the_directory() {
    let dir = tempfile::Builder::new()
        .prefix("tapproof-dir-")
        .tempdir()
        .unwrap();
    let data = init(EXE, dir.path(), TD);
    let server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "1h");
    let echo = EchoServer::start();
    let db_token = server.token(EXE, "db-1", &["db"], "5m");
    let db = AgentProcess::start(
        EXE,
        dir.path(),
        "db-1",
        &db_config(&dir.path().join("db-1"), &db_token, echo.addr, "127.0.0.1:0"),
    );
    let web_token = server.token(EXE, "web-1", &[], "5m");
    let web_config = format!(
        "trust_domain = \"{TD}\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n[[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"db\"\n",
        control_section(&dir.path().join("web-1"), &web_token)
    );
    let web = AgentProcess::start(EXE, dir.path(), "web-1", &web_config);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match round_trip(web.outbound(0), b"found you") {
            Ok(back) if back == b"found you" => break,
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "directory never led to db-1; web log:\n{}",
                    web.log()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    let status = web.status();
    assert_eq!(status["tunnels"][0]["peer_id"], "spiffe://example.org/node/db-1");
    assert_eq!(status["tunnels"][0]["peer_addr"], db.tunnel().to_string());
    assert!(
        server.log().contains("directory: tunnel address announced"),
        "{}",
        server.log()
    );

    // db-1 revoked by its certificate's serial: it leaves the directory, web-1 closes its tunnel
    // and dials it no more (db-1 sees no further handshake).
    let serial = db.status()["certificate"]["serial"].as_str().unwrap().to_owned();
    let (code, out, err) = run_tapproof(
        EXE,
        &[
            "server",
            "revoke",
            "--data-dir",
            data.to_str().unwrap(),
            "--serial",
            &serial,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    web.wait_for("web-1 to close the tunnel to db-1", Duration::from_secs(5), |a| {
        a.metric("tapproof_tunnels_open", &["side=\"outbound\""]) == 0.0
    });
    let handshakes = |a: &AgentProcess| {
        a.metric("tapproof_handshakes_total", &["side=\"inbound\""])
            + a.metric("tapproof_handshake_failures_total", &["side=\"inbound\""])
    };
    let before = handshakes(&db);
    for _ in 0..5 {
        assert!(
            round_trip(web.outbound(0), b"still there?")
                .map(|b| b.is_empty())
                .unwrap_or(true),
            "no byte may reach a revoked node"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(handshakes(&db), before, "web-1 must not dial a revoked node");
}

/// Admin commands against the running server over mTLS with an admin identity; node identities
/// and anonymous clients are refused.
#[test]
fn admin_commands_over_mtls() {
    use tapproof_test_util::server::control_request;
    let dir = tempfile::Builder::new()
        .prefix("tapproof-admin-")
        .tempdir()
        .unwrap();
    let data = init(EXE, dir.path(), TD);
    let server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "1h");
    let token = server.token(EXE, "web-1", &["web"], "5m");
    let web_dir = dir.path().join("web-1");
    let config = format!(
        "trust_domain = \"{TD}\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n",
        control_section(&web_dir, &token)
    );
    let _web = AgentProcess::start(EXE, dir.path(), "web-1", &config);

    let admin_dir = dir.path().join("alice");
    let d = data.to_str().unwrap();
    let key_mode_after_issue = || {
        let (code, out, err) = run_tapproof(
            EXE,
            &[
                "server",
                "admin-cert",
                "--data-dir",
                d,
                "--name",
                "alice",
                "--out",
                admin_dir.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "{out}{err}");
        let meta = std::fs::metadata(admin_dir.join("admin.key")).unwrap();
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777
    };
    assert_eq!(key_mode_after_issue(), 0o600);
    // Issued again over a key file someone made readable: the new key file is 0600 all the same.
    std::fs::set_permissions(
        admin_dir.join("admin.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    assert_eq!(
        key_mode_after_issue(),
        0o600,
        "an existing admin.key does not keep its mode"
    );

    let addr = server.addr.to_string();
    let remote = [
        "--server",
        addr.as_str(),
        "--admin-dir",
        admin_dir.to_str().unwrap(),
    ];
    // A data dir that does not exist proves the command used the API, not the local store.
    let nowhere = ["--data-dir", "/nonexistent-tapproof"];
    let run = |args: &[&str]| {
        let all: Vec<&str> = args
            .iter()
            .chain(nowhere.iter())
            .chain(remote.iter())
            .copied()
            .collect();
        run_tapproof(EXE, &all)
    };
    let (code, out, err) = run(&["server", "node", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("web-1") && out.contains("active") && out.contains("web"),
        "{out}"
    );
    let (code, out, err) = run(&[
        "server",
        "revoke",
        "--node",
        "web-1",
        "--reason",
        "decommissioned",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked node web-1"), "{out}");
    let (code, out, err) = run(&[
        "server",
        "registration",
        "add",
        "--node",
        "web-1",
        "--service",
        "api",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("changed"), "{out}");
    let (_, out, _) = run(&["server", "registration", "list"]);
    assert!(out.contains("api"), "{out}");
    let (code, out, err) = run(&["server", "audit-log", "show"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("spiffe://example.org/admin/alice") && out.contains("revocation.add"),
        "{out}"
    );

    // A node identity is not an admin; no identity at all is refused too.
    let bundle = vec![std::fs::read_to_string(admin_dir.join("bundle.pem")).unwrap()];
    let chain = std::fs::read_to_string(web_dir.join("node.pem")).unwrap();
    let key = std::fs::read_to_string(web_dir.join("node.key")).unwrap();
    // The revoked node cannot renew.
    let (csr, _) = tapproof_identity::new_csr(None).unwrap();
    let body = serde_json::json!({ "csrs": [{ "id": "spiffe://example.org/node/web-1", "csr": csr }] });
    let (status, v) = control_request(
        server.addr,
        tapproof_tls::ServerTrust::Bundle(bundle.clone()),
        Some((&chain, &key)),
        "POST",
        "/v1/sign",
        serde_json::to_vec(&body).unwrap(),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("node_revoked")),
        "{v}"
    );
    // Revoked, it is refused as revoked on admin endpoints too (the revocation is checked first;
    // a live node gets admin_required: crates/server/tests/api.rs).
    let (status, v) = control_request(
        server.addr,
        tapproof_tls::ServerTrust::Bundle(bundle.clone()),
        Some((&chain, &key)),
        "GET",
        "/v1/nodes",
        vec![],
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("node_revoked")),
        "{v}"
    );
    let (status, _) = control_request(
        server.addr,
        tapproof_tls::ServerTrust::Bundle(bundle),
        None,
        "GET",
        "/v1/audit-log",
        vec![],
    );
    assert_eq!(status, 401);
}

/// The control plane's policy decides who may open a service whose config lists no `allow`:
/// agents apply a new policy within seconds.
#[test]
fn policy_from_the_control_plane_is_applied_within_seconds() {
    let dir = tempfile::Builder::new()
        .prefix("tapproof-policy-")
        .tempdir()
        .unwrap();
    let data = init(EXE, dir.path(), TD);
    let server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "1h");
    let echo = EchoServer::start();
    let db_token = server.token(EXE, "db-1", &["db"], "5m");
    let db_config = format!(
        "trust_domain = \"{TD}\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n[tunnel]\nlisten = \"127.0.0.1:0\"\n\
         [[inbound]]\nservice = \"db\"\nforward = \"{}\"\n",
        control_section(&dir.path().join("db-1"), &db_token),
        echo.addr
    );
    let db = AgentProcess::start(EXE, dir.path(), "db-1", &db_config);
    let web_token = server.token(EXE, "web-1", &[], "5m");
    let web = AgentProcess::start(
        EXE,
        dir.path(),
        "web-1",
        &web_config(&dir.path().join("web-1"), &web_token, db.tunnel()),
    );
    let works = || {
        round_trip(web.outbound(0), b"hello")
            .map(|b| b == b"hello")
            .unwrap_or(false)
    };
    assert!(!works(), "no policy and no allow list: denied");
    assert!(db.metric("tapproof_policy_denials_total", &["reason=\"not_allowed\""]) >= 1.0);

    let d = data.to_str().unwrap();
    let file = dir.path().join("policy.toml");
    let set_policy = || {
        run_tapproof(
            EXE,
            &[
                "server",
                "policy",
                "set",
                "--data-dir",
                d,
                "--file",
                file.to_str().unwrap(),
            ],
        )
    };
    std::fs::write(
        &file,
        format!("[services.db]\nallow = [\"spiffe://{TD}/node/web-1\"]\n"),
    )
    .unwrap();
    let (code, out, err) = set_policy();
    assert_eq!(code, 0, "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !works() {
        assert!(
            Instant::now() < deadline,
            "policy not applied within 5 s; db log:\n{}",
            db.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    std::fs::write(&file, "[services.db]\nallow = []\n").unwrap();
    let (code, _, err) = set_policy();
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while works() {
        assert!(Instant::now() < deadline, "emptied policy not applied within 5 s");
        std::thread::sleep(Duration::from_millis(100));
    }

    std::fs::write(&file, "[services.db]\nallow = [\"spiffe://evil.org/node/x\"]\n").unwrap();
    let (code, _, err) = set_policy();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not in trust domain"), "{err}");
    let (_, out, _) = run_tapproof(EXE, &["server", "policy", "show", "--data-dir", d]);
    assert!(
        out.contains("\"db\"") && !out.contains("evil.org"),
        "a refused policy changes nothing: {out}"
    );
}

/// With --root-max-age the server rolls its root over by itself (prepare, activate, retire),
/// while a client keeps sending requests: zero failures.
#[test]
fn scheduled_root_rollover_under_load() {
    let s = setup_with("30s", &["--root-max-age", "5s", "--rollover-propagation", "4s"]);
    let (server, db, web) = (&s.server, &s.db, &s.web);
    let data = server.data_dir.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, handle) = load(web.outbound(0), stop.clone());
    let d = data.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, out, _) = run_tapproof(
            EXE,
            &["server", "audit-log", "show", "--data-dir", d, "--limit", "1000"],
        );
        if out.contains("ca.retire") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no full scheduled rollover in 120 s:\n{out}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // Keep going until both agents have renewed again under whatever root signs now.
    let (db_r, web_r) = (
        db.metric("tapproof_renewals_total", &[]),
        web.metric("tapproof_renewals_total", &[]),
    );
    db.wait_for("a renewal after retirement", Duration::from_secs(40), |a| {
        a.metric("tapproof_renewals_total", &[]) > db_r
    });
    web.wait_for("a renewal after retirement", Duration::from_secs(40), |a| {
        a.metric("tapproof_renewals_total", &[]) > web_r
    });
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request may fail during scheduled rollover"
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    assert!(server.log().contains("scheduled root rollover"));
}

/// Fault case: web-1's wall clock jumps (libfaketime on its process only; its monotonic clock
/// runs on, as when NTP steps a clock). 40 s ahead (past half-life of its 60 s certificate):
/// it renews at once and no request fails. 10 min ahead (past every certificate): it says its
/// clock is off, and renews at most every tenth of a lifetime instead of in a loop. Set right
/// again: it renews and carries traffic with no new token.
#[test]
fn a_clock_that_jumps_is_survived() {
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
    if !std::path::Path::new(lib).exists() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the clock test (apt-get install faketime)"
        );
        eprintln!("skipped: needs libfaketime (apt-get install faketime)");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("tapproof-clock-")
        .tempdir()
        .unwrap();
    let data = init(EXE, dir.path(), TD);
    let server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "60s");
    let echo = EchoServer::start();
    let db = AgentProcess::start(
        EXE,
        dir.path(),
        "db-1",
        &db_config(
            &dir.path().join("db-1"),
            &server.token(EXE, "db-1", &["db"], "5m"),
            echo.addr,
            "127.0.0.1:0",
        ),
    );
    let clock = dir.path().join("web-1.faketime");
    std::fs::write(&clock, "+0\n").unwrap();
    let preload = format!("LD_PRELOAD={lib}");
    let clock_file = format!("FAKETIME_TIMESTAMP_FILE={}", clock.display());
    let web = AgentProcess::start_with(
        EXE,
        dir.path(),
        "web-1",
        &web_config(
            &dir.path().join("web-1"),
            &server.token(EXE, "web-1", &[], "5m"),
            db.tunnel(),
        ),
        &[
            "env",
            &preload,
            &clock_file,
            "FAKETIME_NO_CACHE=1",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
        ],
    );
    assert_eq!(round_trip(web.outbound(0), b"before").unwrap(), b"before");
    let renewals = |a: &AgentProcess| a.metric("tapproof_renewals_total", &[]);

    // 1. 40 s ahead.
    let legit = tapproof_test_util::traffic::Legit::start(web.outbound(0));
    let r0 = renewals(&web);
    std::fs::write(&clock, "+40\n").unwrap();
    let jumped = Instant::now();
    web.wait_for("a renewal after the jump", Duration::from_secs(20), |a| {
        renewals(a) > r0
    });
    let renewed_in = jumped.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failed) = legit.finish();
    assert_eq!(failed, 0, "requests failed after a 40 s clock jump ({ok} ok)");

    // 2. 10 min ahead: every certificate looks expired on web-1.
    std::fs::write(&clock, "+600\n").unwrap();
    web.wait_for("the clock warning", Duration::from_secs(30), |a| {
        a.log().contains("s ahead of the control plane's")
    });
    let r1 = renewals(&web);
    std::thread::sleep(Duration::from_secs(12));
    let in_12s = renewals(&web) - r1;
    assert!(
        in_12s <= 3.0,
        "{in_12s} renewals in 12 s with the clock 10 min ahead: a loop"
    );
    assert!(
        web.status()["certificate"]["seconds_to_expiry"]
            .as_i64()
            .unwrap_or(0)
            < 0,
        "status does not show the certificate expired by this host's clock: {}",
        web.status()
    );

    // 3. Set right: renews and carries traffic.
    std::fs::write(&clock, "+0\n").unwrap();
    let back = Instant::now();
    let r2 = renewals(&web);
    web.wait_for("a renewal with the clock right", Duration::from_secs(45), |a| {
        renewals(a) > r2
    });
    tapproof_test_util::traffic::wait_for_round_trip(
        web.outbound(0),
        b"after",
        Duration::from_secs(20),
        "no traffic with the clock set right",
    );
    eprintln!(
        "fault: clock +40 s -> renewed in {:.1} s, {ok} requests, 0 failed; +10 min -> {in_12s} renewals in 12 s; \
         set right -> serving {:.1} s later",
        renewed_in.as_secs_f64(),
        back.elapsed().as_secs_f64()
    );
}

/// A host that boots before its control plane: the first join retries with backoff while the
/// server is unreachable (the token stays unused), and succeeds once the server is up, with no
/// restart of the agent.
#[test]
fn a_first_join_waits_for_a_control_plane_that_is_not_up_yet() {
    let dir = tempfile::Builder::new().prefix("tapproof-cp-").tempdir().unwrap();
    let data = init(EXE, dir.path(), TD);
    let mut server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "1h");
    let addr = server.addr;
    let token = server.token(EXE, "web-1", &[], "5m");
    server.stop_ref();
    let config = web_config(&dir.path().join("web-1"), &token, "127.0.0.1:9".parse().unwrap());
    let path = dir.path().to_owned();
    let agent = std::thread::spawn(move || AgentProcess::start(EXE, &path, "web-1", &config));
    let log = dir.path().join("web-1.log");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("cannot join yet; retrying")
    {
        assert!(
            Instant::now() < deadline,
            "no retry logged:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _server = ServerProcess::start(EXE, &data, &addr.to_string(), "1h");
    let web = agent.join().expect("the agent joins once the server is up");
    assert_eq!(web.metric("tapproof_control_plane_up", &[]), 1.0);
    assert!(dir.path().join("web-1").join("node.key").exists());
}

/// A DaemonSet's way in: one reusable token (`--node-pattern k8s-* --uses 2`) joins two agents,
/// each under the name in its `[control] node`; a third agent is refused at once (exit 2, the
/// token's uses are spent) and the CLI refuses `--uses` without a pattern.
#[test]
fn one_reusable_token_joins_a_bounded_number_of_named_agents() {
    let dir = tempfile::Builder::new().prefix("tapproof-cp-").tempdir().unwrap();
    let data = init(EXE, dir.path(), TD);
    let server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "1h");
    let addr = server.addr.to_string();
    let base = [
        "server",
        "token",
        "create",
        "--data-dir",
        data.to_str().unwrap(),
        "--server",
        &addr,
    ];
    let (code, _, err) = run_tapproof(EXE, &[&base[..], &["--node", "k8s-a", "--uses", "3"]].concat());
    assert_eq!(code, 2, "--uses needs --node-pattern: {err}");
    let (code, token, err) = run_tapproof(
        EXE,
        &[&base[..], &["--node-pattern", "k8s-*", "--uses", "2"]].concat(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("REUSABLE join token: up to 2 nodes named k8s-*"),
        "{err}"
    );
    let token = token.trim();
    let config = |name: &str| {
        format!(
            "trust_domain = \"{TD}\"\n{}node = \"{name}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            control_section(&dir.path().join(name), token)
        )
    };
    let a = AgentProcess::start(EXE, dir.path(), "k8s-a", &config("k8s-a"));
    let b = AgentProcess::start(EXE, dir.path(), "k8s-b", &config("k8s-b"));
    assert_eq!(a.status()["id"], format!("spiffe://{TD}/node/k8s-a"));
    assert_eq!(b.status()["id"], format!("spiffe://{TD}/node/k8s-b"));
    let path = dir.path().join("k8s-c.toml");
    std::fs::write(&path, config("k8s-c")).unwrap();
    let (code, _, err) = run_tapproof(EXE, &["agent", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "a spent token is a configuration problem: {err}");
    assert!(
        err.contains("token_used") && err.contains("all of its 2 uses"),
        "{err}"
    );
}

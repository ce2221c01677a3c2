//! Attacks and faults against real processes, each with a legitimate client measured at the same
//! time (issue 11). Agents and servers start with a soft limit of 1,024 open files, as a fresh
//! install gets; the attacked agent here also has a hard limit of 1,024.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use tapproof_test_util::fixture::{db_config, web_config};
use tapproof_test_util::pki::{IdentityPaths, TestPki};
use tapproof_test_util::process::{fd_limits, open_fds, rss_kib, run_tapproof, AgentProcess};
use tapproof_test_util::server::ServerProcess;
use tapproof_test_util::traffic::{round_trip, EchoServer, Legit};
use tapproof_test_util::{in_ci, is_root};

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An HTTP/2 tunnel to `addr` as `identity` (an allowed peer with its own certificate).
async fn tunnel(
    addr: SocketAddr,
    identity: &IdentityPaths,
    pki: &TestPki,
    server: &str,
) -> h2::client::SendRequest<bytes::Bytes> {
    let files = tapproof_tls::IdentityFiles {
        cert: identity.cert.clone(),
        key: identity.key.clone(),
        bundle: identity.bundle.clone(),
    };
    let material = tapproof_tls::Material::load(&files, &pki.td).unwrap();
    let tls = tapproof_tls::ClientTls::new(
        &material,
        pki.id(server),
        tapproof_tls::CryptoPolicy::PreferPostQuantum,
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tapproof_tls::connect(&tls, tcp, addr).await.unwrap();
    let (sender, conn) = h2::client::Builder::new()
        .max_concurrent_reset_streams(100_000)
        .handshake(stream)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

fn connect_request(service: &str) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(service)
        .body(())
        .unwrap()
}

/// One peer identity or one source address costs only itself: a flood of idle connections on
/// the tunnel port from one address, an allowed peer opening a stream per slot it can get, 300
/// made-up service names and an oversized header block, while web-1's app is served without a
/// failure and the attacked agent stays under its 1,024-fd hard limit.
#[test]
fn one_peer_or_one_source_costs_only_itself() {
    let pki = TestPki::new();
    let echo = EchoServer::start();
    let db_id = pki.node("db-1");
    let web_id = pki.node("web-1");
    // spiffe://example.org/svc/* is allowed by db_config: an allowed, misbehaving peer.
    let evil = pki.service("evil");
    let db = AgentProcess::start_with(
        EXE,
        pki.path(),
        "db-1",
        &db_config(&pki, &db_id, echo.addr, "max_handshakes_per_source = 8"),
        &["prlimit", "--nofile=1024:1024"],
    );
    let web = AgentProcess::start(
        EXE,
        pki.path(),
        "web-1",
        &web_config(&pki, &web_id, &[db.tunnel()], "db-1", ""),
    );
    // Started at 1,024 soft: web-1 raised itself to its hard limit; db-1's hard limit is 1,024.
    let (soft, hard) = fd_limits(web.pid());
    assert_eq!(soft, hard, "the agent did not raise its soft fd limit");
    assert_eq!(fd_limits(db.pid()), (1024, 1024));
    assert_eq!(round_trip(web.outbound(0), b"warm").unwrap(), b"warm");
    let (fds_before, rss_before) = (open_fds(db.pid()), rss_kib(db.pid()));
    let legit = Legit::start(web.outbound(0));

    // 1. Idle connections on the tunnel port from one source (127.0.0.2): 8 are let in (and
    //    closed after the handshake timeout), the rest are closed at once.
    let mut idle = Vec::new();
    for _ in 0..60 {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        sock.connect(&db.tunnel().into()).unwrap();
        idle.push(TcpStream::from(sock));
    }
    db.wait_for("per-source refusals", Duration::from_secs(10), |a| {
        a.metric(
            "tapproof_limit_refusals_total",
            &["limit=\"handshakes_per_source\""],
        ) >= 52.0
    });

    let rt = runtime();
    let (accepted, refused, unknown_404, big_header) = rt.block_on(async {
        // 2. An allowed peer opens as many streams as it can and holds them.
        let mut sender = tunnel(db.tunnel(), &evil, &pki, "db-1").await;
        let mut held = Vec::new();
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..700 {
            sender = sender.ready().await.unwrap();
            let (response, send) = sender.send_request(connect_request("db"), false).unwrap();
            match tokio::time::timeout(Duration::from_secs(5), response).await {
                Ok(Ok(r)) if r.status() == 200 => {
                    accepted += 1;
                    held.push((r, send));
                }
                Ok(Ok(r)) if r.status() == 503 => refused += 1,
                other => panic!("unexpected answer to a stream: {other:?}"),
            }
        }
        // 3. Names of services nobody serves.
        let mut unknown_404 = 0;
        for i in 0..300 {
            sender = sender.ready().await.unwrap();
            let (response, _send) = sender
                .send_request(connect_request(&format!("made-up-{i}")), false)
                .unwrap();
            if response.await.map(|r| r.status() == 404).unwrap_or(false) {
                unknown_404 += 1;
            }
        }
        // 4. A 64 KiB header block, on a tunnel of its own.
        let mut other = tunnel(db.tunnel(), &evil, &pki, "db-1").await;
        let mut req = connect_request("db");
        req.headers_mut().insert(
            "x-filler",
            http::HeaderValue::from_str(&"a".repeat(64 * 1024)).unwrap(),
        );
        other = other.ready().await.unwrap();
        let big_header = match other.send_request(req, false) {
            Ok((response, _)) => match response.await {
                Ok(r) => format!("status {}", r.status()),
                Err(e) => format!("error {e}"),
            },
            Err(e) => format!("error {e}"),
        };
        drop(held);
        (accepted, refused, unknown_404, big_header)
    });
    drop(idle);
    let (ok, failed) = legit.finish();

    assert_eq!(
        failed, 0,
        "legitimate requests failed during the attacks ({ok} ok)"
    );
    assert!(ok >= 5, "the legitimate client made only {ok} requests");
    // Half of the fd budget (1,024 - 128 reserved) per peer identity.
    assert_eq!(accepted, 448, "streams of one peer ({refused} refused)");
    assert_eq!(refused, 700 - 448);
    assert!(db.metric("tapproof_limit_refusals_total", &["limit=\"streams_per_peer\""]) >= 252.0);
    assert_eq!(unknown_404, 300);
    let metrics = db.metrics();
    assert!(metrics.contains("service=\"(unknown)\""), "{metrics}");
    assert!(
        !metrics.contains("made-up-"),
        "a peer-chosen name became a metric label"
    );
    assert!(
        !big_header.starts_with("status 200"),
        "a 64 KiB header block was served: {big_header}"
    );
    // Bounded: descriptors and memory come back once the attackers are gone.
    db.wait_for("descriptors to come back", Duration::from_secs(20), |a| {
        open_fds(a.pid()) <= fds_before + 20
    });
    let rss_after = rss_kib(db.pid());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS {rss_before} KiB -> {rss_after} KiB after the attacks"
    );
    assert!(
        db.log().contains("one line per 10 s"),
        "refusals were not throttled in the log"
    );
    assert_eq!(round_trip(web.outbound(0), b"after").unwrap(), b"after");
}

/// When the peer agent dies mid-stream, the app sees a reset, not a clean end of stream: a
/// close-delimited protocol must not take a cut response for a whole one.
#[test]
fn a_cut_stream_reaches_the_app_as_a_reset() {
    // A service that sends a first part and then holds the connection open.
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let service_addr = service.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in service.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.write_all(b"first part of the response;");
            held.push(conn);
        }
    });
    let pair = tapproof_test_util::fixture::Pair::forwarding_to(EXE, service_addr);
    let mut app = TcpStream::connect(pair.app_addr()).unwrap();
    app.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    app.write_all(b"request").unwrap();
    let mut buf = [0u8; 27];
    app.read_exact(&mut buf).unwrap();
    pair.db.signal(nix::sys::signal::Signal::SIGKILL);
    let mut rest = [0u8; 64];
    match app.read(&mut rest) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("the app saw a clean end of stream ({n} bytes) after its peer agent died"),
    }
}

fn root_or_skip(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(!in_ci(), "{what} must run under CI but needs root");
    eprintln!("skipped: {what} needs root");
    false
}

/// `server init` in `dir`; returns the data dir and the root pin.
fn init_server(dir: &std::path::Path) -> (std::path::PathBuf, [u8; 32]) {
    let data = dir.join("server");
    let (code, out, err) = run_tapproof(
        EXE,
        &[
            "server",
            "init",
            "--trust-domain",
            "example.org",
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let hex = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("root sha256 "))
        .unwrap()
        .trim()
        .to_owned();
    let mut pin = [0u8; 32];
    for (i, byte) in pin.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    (data, pin)
}

fn bogus_join(server: SocketAddr, pin: [u8; 32]) -> u16 {
    let body =
        serde_json::to_vec(&serde_json::json!({ "token": "tp1.nonsense.nonsense", "csr": "x" })).unwrap();
    tapproof_test_util::server::control_request(
        server,
        tapproof_tls::ServerTrust::Pin(pin),
        None,
        "POST",
        "/v1/join",
        body,
    )
    .0
}

fn audit_rows(data: &std::path::Path, action: &str) -> usize {
    let (code, out, err) = run_tapproof(
        EXE,
        &[
            "server",
            "audit-log",
            "show",
            "--data-dir",
            data.to_str().unwrap(),
            "--limit",
            "100000",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    out.lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["action"] == action))
        .count()
}

/// SQLite on a full filesystem (a 6 MiB tmpfs): while full, writes fail (and say so); once there
/// is room again, every audit row is written (a failed COMMIT used to leave pooled connections
/// unusable, and ~75% of later rows were lost while `audit-log verify` said intact).
#[test]
fn a_full_disk_loses_no_audit_row_once_there_is_room() {
    if !root_or_skip("the full-disk test (mounts a tmpfs)") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("tapproof-full-")
        .tempdir()
        .unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=6m",
            "tapproof-test-full",
            disk.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(mounted.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(disk.clone());
    let (data, pin) = init_server(&disk);
    let mut server = ServerProcess::start_with_args(
        EXE,
        &data,
        "127.0.0.1:0",
        "1h",
        None,
        &["--joins-per-minute", "100000"],
    );
    for _ in 0..5 {
        assert_eq!(bogus_join(server.addr, pin), 400);
    }
    assert_eq!(audit_rows(&data, "join.refused"), 5);

    // Fill the disk.
    let filler = disk.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    // While it is full a join may fail any way it likes (an answer, a reset stream): the
    // server must not crash, and nothing must be lost once there is room.
    let body =
        serde_json::to_vec(&serde_json::json!({ "token": "tp1.nonsense.nonsense", "csr": "x" })).unwrap();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..30 {
        let outcome = match tapproof_test_util::server::try_control_request(
            server.addr,
            tapproof_tls::ServerTrust::Pin(pin),
            None,
            "POST",
            "/v1/join",
            body.clone(),
        ) {
            Ok((status, _)) => format!("status {status}"),
            Err(e) => e,
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    eprintln!("joins while the disk was full: {outcomes:?}");
    assert!(
        !server.log().contains("panicked"),
        "the server panicked on a full disk: {}",
        server.log()
    );
    std::fs::remove_file(&filler).unwrap();
    let during = audit_rows(&data, "join.refused");
    assert!(
        server.log().contains("cannot append to the audit log"),
        "the failed appends were silent"
    );

    // Room again: every row is written.
    for _ in 0..50 {
        assert_eq!(bogus_join(server.addr, pin), 400);
    }
    let after = audit_rows(&data, "join.refused");
    assert_eq!(after - during, 50, "rows lost after the disk had room again");
    let (code, out, err) = run_tapproof(
        EXE,
        &[
            "server",
            "audit-log",
            "verify",
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    server.stop_ref();
}

/// The SQLite file removed under a running server: the server stops within seconds and says
/// why, and a later CLI command refuses instead of creating an empty store.
#[test]
fn a_store_file_removed_under_the_server_stops_it() {
    let dir = tempfile::Builder::new()
        .prefix("tapproof-gone-")
        .tempdir()
        .unwrap();
    let (data, _) = init_server(dir.path());
    let mut server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "1h");
    for name in ["tapproof.db", "tapproof.db-wal", "tapproof.db-shm"] {
        let _ = std::fs::remove_file(data.join(name));
    }
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server kept running on a removed store");
    assert!(!status.success());
    assert!(
        server.log().contains("the store file is gone"),
        "{}",
        server.log()
    );
    let (code, _, err) = run_tapproof(
        EXE,
        &[
            "server",
            "token",
            "create",
            "--data-dir",
            data.to_str().unwrap(),
            "--node",
            "n",
            "--server",
            "127.0.0.1:1",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");
    assert!(
        !data.join("tapproof.db").exists(),
        "a CLI command created an empty store"
    );
}

/// Host B (a network namespace) joined to this test's namespace by a veth pair: db-1 and its
/// echo service live in B, web-1 and the app here. Faults are applied inside B only (nftables
/// `numgen` drops in B's own table, B's end of the link set down), so nothing outside the test's
/// own namespace and interfaces is touched; all of it goes when B is deleted.
struct HostB {
    ns: tapproof_test_util::netns::Netns,
    host_if: String,
    b_ip: String,
}

impl HostB {
    fn new() -> Self {
        let pid = std::process::id();
        let ns = tapproof_test_util::netns::Netns::create(format!("tp-fault-{pid}"));
        let (host_if, b_if) = (
            format!("tpfh{}", pid % 1_000_000),
            format!("tpfb{}", pid % 1_000_000),
        );
        let subnet = 1 + pid % 250;
        let (host_ip, b_ip) = (format!("10.251.{subnet}.1"), format!("10.251.{subnet}.2"));
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &b_if, "netns", &ns.name,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{b_ip}/24"), "dev", &b_if]);
        ns.exec_ok(&["ip", "link", "set", &b_if, "up"]);
        Self { ns, host_if, b_ip }
    }

    /// Drops `percent`% of the tunnel's packets both ways (0: removes the rule).
    fn loss(&self, percent: u32) {
        let _ = self
            .ns
            .command(&["nft", "delete", "table", "inet", "tapproof_fault"])
            .output();
        if percent == 0 {
            return;
        }
        let rules = format!(
            "table inet tapproof_fault {{\n chain i {{ type filter hook input priority 0; tcp dport 15008 numgen random mod 100 < {percent} counter drop; }}\n \
             chain o {{ type filter hook output priority 0; tcp sport 15008 numgen random mod 100 < {percent} counter drop; }}\n}}\n"
        );
        let mut child = self
            .ns
            .command(&["nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft rules in the test namespace");
    }

    /// Packets the loss rules dropped so far.
    fn dropped(&self) -> u64 {
        let out = self
            .ns
            .exec_ok(&["nft", "list", "table", "inet", "tapproof_fault"]);
        out.split("counter packets ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    fn link(&self, up: bool) {
        let b_if = self.host_if.replace("tpfh", "tpfb");
        self.ns
            .exec_ok(&["ip", "link", "set", &b_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for HostB {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
    }
}

/// Sends `payload` through `app` and checks every byte came back: the seconds it took.
fn transfer(app: SocketAddr, payload: &[u8]) -> f64 {
    transfer_within(app, payload, Duration::from_secs(60))
}

/// `transfer`, waiting up to `quiet` for the next byte.
fn transfer_within(app: SocketAddr, payload: &[u8], quiet: Duration) -> f64 {
    let t = std::time::Instant::now();
    let back =
        tapproof_test_util::traffic::round_trip_within(app, payload, quiet).expect("the transfer failed");
    assert!(
        back == payload,
        "{} of {} bytes came back, or different ones",
        back.len(),
        payload.len()
    );
    t.elapsed().as_secs_f64()
}

/// The link between two hosts under packet loss (5%, 20%), cut for 30 s, and a peer that takes
/// TCP connections but never completes TLS. Each case says what the app saw, that no byte was
/// lost or changed, and how long it took.
#[test]
fn link_faults_lose_no_byte() {
    if !root_or_skip("the link fault cases (network namespaces, nftables)") {
        return;
    }
    let b = HostB::new();
    let pki = TestPki::new();
    let (db_id, web_id) = (pki.node("db-1"), pki.node("web-1"));
    let bench = tapproof_test_util::bench_exe(EXE);
    let (_echo, _) = tapproof_test_util::netns::spawn_ready(
        &b.ns,
        &[&bench, "echo-server", "--listen", "127.0.0.1:7000"],
        "listening",
    );
    // A peer that accepts TCP and never answers: first in web-1's list.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let blackhole_addr = blackhole.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in blackhole.incoming().flatten() {
            held.push(c);
        }
    });
    let td = &pki.td;
    let db_config = format!(
        "trust_domain = \"{td}\"\n{}[admin]\nlisten = \"127.0.0.1:15000\"\n[tunnel]\nlisten = \"{}:15008\"\n\
         [[inbound]]\nservice = \"db\"\nforward = \"127.0.0.1:7000\"\nallow = [\"spiffe://{td}/node/web-1\"]\n",
        tapproof_test_util::process::identity_section(&db_id),
        b.b_ip
    );
    let _db = AgentProcess::start_with(EXE, pki.path(), "db-1", &db_config, &b.ns.prefix());
    let web_config = format!(
        "trust_domain = \"{td}\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n[tunnel]\nhandshake_timeout = \"2s\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:0\"\nservice = \"db\"\npeers = [\"{blackhole_addr}\", \"{}:15008\"]\nserver_id = \"spiffe://{td}/node/db-1\"\n",
        tapproof_test_util::process::identity_section(&web_id),
        b.b_ip
    );
    let web = AgentProcess::start(EXE, pki.path(), "web-1", &web_config);
    let app = web.outbound(0);

    // A peer that answers TCP and never completes TLS: web-1 gives up on it after the handshake
    // timeout and dials the next peer; the app only waits.
    let took = transfer(app, b"first");
    eprintln!("fault: first peer never completes TLS -> the app waited {took:.1} s (handshake_timeout 2 s), 0 bytes lost");
    assert!(took < 10.0);
    assert!(web.metric("tapproof_handshake_failures_total", &["reason=\"timeout\""]) >= 1.0);

    let mb = tapproof_test_util::traffic::random_bytes(2 << 20);
    let clean = transfer(app, &mb);
    eprintln!("fault: none -> 2 MiB round trip in {clean:.2} s");
    // Heavy loss: 20% each way. At 30% about half of all round trips fail, TCP's retransmission
    // timer doubles per lost retransmission (and grows with the RTT variance of a busy machine),
    // and a segment unacknowledged for 60 s ends the tunnel (TCP_USER_TIMEOUT, socket.rs): in
    // clean-clone CI runs with the other fault tests beside it that reset the connection 2 runs of
    // 2 (1 in 8 before). At 20% the same backoff is about 16 times rarer. No byte may be lost.
    for (percent, payload) in [
        (5, mb.clone()),
        (20, tapproof_test_util::traffic::random_bytes(256 << 10)),
    ] {
        b.loss(percent);
        let took = transfer_within(app, &payload, Duration::from_secs(150));
        let dropped = b.dropped();
        assert!(dropped > 0, "{percent}% loss dropped nothing");
        eprintln!(
            "fault: {percent}% packet loss both ways ({dropped} packets dropped) -> {} KiB intact in {took:.2} s (the app saw only delay)",
            payload.len() >> 10
        );
    }
    b.loss(0);

    // The link down for 30 s in the middle of a connection, then up: the connection survives.
    let mut tcp = TcpStream::connect(app).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    tcp.write_all(b"before the cut;").unwrap();
    let mut buf = [0u8; 15];
    tcp.read_exact(&mut buf).unwrap();
    b.link(false);
    tcp.write_all(b"during the cut;").unwrap();
    std::thread::sleep(Duration::from_secs(30));
    b.link(true);
    let up = std::time::Instant::now();
    let mut buf = [0u8; 15];
    tcp.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"during the cut;");
    eprintln!(
        "fault: link down 30 s -> the open connection stalled, then carried on {:.1} s after the link came back, 0 bytes lost",
        up.elapsed().as_secs_f64()
    );
    let after = transfer(app, &mb);
    eprintln!("fault: after the cut -> 2 MiB intact in {after:.2} s");
}

/// CPU time (user + system) process `pid` has used, in clock ticks (1/100 s).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The tunnel limits not hit elsewhere, each once and each counted under its own name:
/// handshakes in progress in total, tunnels per peer identity, backend connects in progress per
/// service, and a listener out of descriptors (EMFILE), which backs off instead of spinning and
/// serves again once descriptors are back.
#[test]
fn every_tunnel_limit_bites_once_and_is_counted() {
    let pki = TestPki::new();
    let echo = EchoServer::start();
    let db_id = pki.node("db-1");
    let web_id = pki.node("web-1");
    let evil = pki.service("evil");
    // A backend whose accept queue is full: connects to it stay in progress (SYNs dropped).
    let blackhole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    blackhole
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    blackhole.listen(0).unwrap();
    let hole = blackhole.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        // Fill the queue (backlog 0 takes one or two) before the agent tries.
        if let Ok(s) = TcpStream::connect_timeout(&hole, Duration::from_millis(300)) {
            fillers.push(s);
        }
    }
    let extra = format!(
        "max_handshakes_in_progress = 4\nmax_tunnels_per_peer = 2\nmax_connects_per_service = 2\n\
         connect_timeout = \"20s\"\n\
         [[inbound]]\nservice = \"hole\"\nforward = \"{hole}\"\nallow = [\"spiffe://{}/svc/*\"]\n",
        pki.td
    );
    let db = AgentProcess::start(
        EXE,
        pki.path(),
        "db-1",
        &db_config(&pki, &db_id, echo.addr, &extra),
    );
    let web = AgentProcess::start(
        EXE,
        pki.path(),
        "web-1",
        &web_config(&pki, &web_id, &[db.tunnel()], "db-1", ""),
    );
    assert_eq!(round_trip(web.outbound(0), b"warm").unwrap(), b"warm");
    let refusals = |limit: &str| db.metric("tapproof_limit_refusals_total", &[&format!("limit=\"{limit}\"")]);
    let fds_base = open_fds(db.pid());
    let legit = Legit::start(web.outbound(0));

    let rt = runtime();
    let (third_tunnel, hole_answers) = rt.block_on(async {
        // Tunnels per peer: two are served, a third is closed before it carries anything.
        let mut first = tunnel(db.tunnel(), &evil, &pki, "db-1").await;
        let _second = tunnel(db.tunnel(), &evil, &pki, "db-1").await;
        let third = async {
            let mut t = tunnel(db.tunnel(), &evil, &pki, "db-1").await;
            t = t.ready().await.map_err(|e| e.to_string())?;
            let (r, _) = t
                .send_request(connect_request("db"), false)
                .map_err(|e| e.to_string())?;
            r.await.map(|r| r.status().to_string()).map_err(|e| e.to_string())
        };
        let third_tunnel = tokio::time::timeout(Duration::from_secs(10), third)
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        // Connects per service: two connects to the full backend hang; the rest get 503 at once.
        let mut held = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..5 {
            first = first.ready().await.unwrap();
            let (r, s) = first.send_request(connect_request("hole"), false).unwrap();
            held.push(s);
            match tokio::time::timeout(Duration::from_secs(2), r).await {
                Ok(Ok(r)) => answers.push(r.status().as_u16()),
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => answers.push(0),
            }
        }
        (third_tunnel, answers)
    });
    let (ok, failed) = legit.finish();
    assert_eq!(failed, 0, "legitimate requests failed ({ok} ok)");
    assert!(
        refusals("tunnels_per_peer") >= 1.0,
        "a third tunnel of one peer was not refused: {third_tunnel:?}"
    );
    assert!(
        third_tunnel.as_deref() != Ok("200"),
        "a third tunnel of one peer carried a stream"
    );
    assert_eq!(
        hole_answers.iter().filter(|&&a| a == 0).count(),
        2,
        "connects in progress to one service: {hole_answers:?} (0: still waiting)"
    );
    assert_eq!(
        hole_answers.iter().filter(|&&a| a == 503).count(),
        3,
        "{hole_answers:?}"
    );
    assert!(refusals("connects_per_service") >= 3.0);
    // Handshakes in progress: 8 idle connections from four sources (2 each, under the
    // per-source cap); 4 are let in, 4 refused by the total.
    let mut idle = Vec::new();
    for i in 0..8 {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let source: SocketAddr = format!("127.0.0.{}:0", 2 + i / 2).parse().unwrap();
        sock.bind(&source.into()).unwrap();
        sock.connect(&db.tunnel().into()).unwrap();
        idle.push(TcpStream::from(sock));
    }
    db.wait_for("handshakes_in_progress refusals", Duration::from_secs(10), |_| {
        refusals("handshakes_in_progress") >= 4.0
    });
    drop(idle);
    drop(rt);
    drop(fillers);
    // Everything the attacks held is returned (the hanging connects end with their streams).
    db.wait_for("descriptors to come back", Duration::from_secs(25), |a| {
        open_fds(a.pid()) <= fds_base + 1
    });

    // Out of descriptors: the agent's limit is lowered under it (prlimit on the running
    // process), connections wait in the backlog; accept() fails with EMFILE and backs off.
    let fds = open_fds(db.pid()) as u64;
    let set_limit = |n: u64| {
        let out = std::process::Command::new("prlimit")
            .args(["--pid", &db.pid().to_string(), &format!("--nofile={n}:20000")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "prlimit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let before = refusals("accept_failed");
    let started = std::time::Instant::now();
    set_limit(fds);
    let waiting: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(db.tunnel()).unwrap()).collect();
    let cpu0 = cpu_ticks(db.pid());
    std::thread::sleep(Duration::from_secs(3));
    let cpu = cpu_ticks(db.pid()) - cpu0;
    set_limit(20000);
    let low_for = started.elapsed().as_secs_f64();
    // (The admin listener fails its accepts too while the limit is low: read metrics after.)
    let failed_accepts = refusals("accept_failed") - before;
    assert!(failed_accepts >= 5.0, "accept() did not fail: {failed_accepts}");
    // One try per ACCEPT_BACKOFF (100 ms), and some slack for this machine's scheduling.
    assert!(
        failed_accepts <= low_for * 15.0,
        "{failed_accepts} failed accepts in {low_for:.1} s: the listener does not back off"
    );
    assert!(
        cpu < 60,
        "{cpu} ticks of CPU in 3 s while out of descriptors: it spins"
    );
    drop(waiting);
    assert!(
        db.log().contains("accept failed, backing off"),
        "the failed accepts were not logged"
    );
    assert_eq!(round_trip(web.outbound(0), b"after").unwrap(), b"after");
    // A new tunnel is accepted again once there are descriptors.
    let web2 = AgentProcess::start(
        EXE,
        pki.path(),
        "web-2",
        &web_config(&pki, &web_id, &[db.tunnel()], "db-1", ""),
    );
    assert_eq!(round_trip(web2.outbound(0), b"again").unwrap(), b"again");
}

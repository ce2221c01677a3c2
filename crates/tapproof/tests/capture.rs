//! Transparent capture and inbound enforcement with real nftables, across network namespaces:
//! A (client, agent capturing B's web port), B (a web server on 0.0.0.0/[::]:8080, agent
//! enforcing), C (no agent). A plain `curl` from A reaches B through the tunnel and the fibre
//! carries only TLS; C is dropped (enforce) or let through and counted (monitor); with A's agent
//! killed A's request fails and nothing crosses in plaintext; the rules go only by
//! `tapproof capture remove`, and no other table is ever touched.
//!
//! Needs root, nft, tcpdump, curl and python3. Under CI (CI=true) it runs and fails loudly.

use std::process::Command;
use std::time::{Duration, Instant};
use tapproof_test_util::netns::{spawn_ready, Netns, Tcpdump};
use tapproof_test_util::pcap::{contains, tcp_segments};
use tapproof_test_util::pki::TestPki;
use tapproof_test_util::process::{identity_section, metric_value, run_tapproof_in, AgentProcess};
use tapproof_test_util::wait_until;

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");

/// An HTTP server on [::]:8080 that takes IPv4 too (as a service bound to 0.0.0.0 would).
const WEB_SERVER: &str = r#"
import functools, http.server, socket, sys
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
server = Server(("::", 8080), handler)
print("ready", flush=True)
server.serve_forever()
"#;

fn can_run() -> bool {
    tapproof_test_util::root_with(
        "capture test",
        &[
            ("nft", "--version"),
            ("tcpdump", "--version"),
            ("curl", "--version"),
            ("python3", "--version"),
            ("ip", "-V"),
        ],
    )
}

/// A-B and C-B veth pairs; A and B also on IPv6.
struct Three {
    a: Netns,
    b: Netns,
    c: Netns,
    a_if: String,
    a_ip: String,
    b_ip: String,
    b6: String,
    /// B's address on the C link.
    b_for_c: String,
    c_ip: String,
}

impl Three {
    /// `tag` tells apart the topologies of tests that run at once in this process.
    fn new(tag: u32) -> Self {
        let pid = std::process::id();
        let n = 1 + pid % 250;
        let (a, b, c) = (
            Netns::create(format!("tp-cap{tag}-{pid}-a")),
            Netns::create(format!("tp-cap{tag}-{pid}-b")),
            Netns::create(format!("tp-cap{tag}-{pid}-c")),
        );
        let t = pid % 10_000;
        let (a_if, ba_if, c_if, bc_if) = (
            format!("tc{tag}a{t}"),
            format!("tc{tag}ba{t}"),
            format!("tc{tag}c{t}"),
            format!("tc{tag}bc{t}"),
        );
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&[
            "link", "add", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &ba_if, "netns", &b.name,
        ]);
        ip(&[
            "link", "add", &c_if, "netns", &c.name, "type", "veth", "peer", "name", &bc_if, "netns", &b.name,
        ]);
        let (ab, cb) = (240 + 2 * tag, 241 + 2 * tag);
        let (a_ip, b_ip) = (format!("10.{ab}.{n}.1"), format!("10.{ab}.{n}.2"));
        let (c_ip, b_for_c) = (format!("10.{cb}.{n}.1"), format!("10.{cb}.{n}.2"));
        let (a6, b6) = (format!("fd00:{ab}:{n:x}::1"), format!("fd00:{ab}:{n:x}::2"));
        for (ns, dev, v4, v6) in [
            (&a, &a_if, &a_ip, Some(&a6)),
            (&b, &ba_if, &b_ip, Some(&b6)),
            (&c, &c_if, &c_ip, None),
            (&b, &bc_if, &b_for_c, None),
        ] {
            ns.exec_ok(&["ip", "addr", "add", &format!("{v4}/24"), "dev", dev]);
            if let Some(v6) = v6 {
                ns.exec_ok(&[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    dev,
                    "nodad",
                ]);
            }
            ns.exec_ok(&["ip", "link", "set", dev, "up"]);
        }
        Self {
            a,
            b,
            c,
            a_if,
            a_ip,
            b_ip,
            b6,
            b_for_c,
            c_ip,
        }
    }
}

/// `curl` from `ns`: (exit code, body).
fn curl(ns: &Netns, url: &str) -> (i32, String) {
    let out = ns
        .command(&["curl", "-g", "-s", "-S", "--max-time", "4", url])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn metrics(ns: &Netns) -> String {
    ns.exec_ok(&["curl", "-s", "http://127.0.0.1:15000/metrics"])
}

/// Plaintext attempts `ns`'s agent counts from `source` (a `source="IP"` label) in `mode`.
fn attempts(ns: &Netns, source: &str, mode: &str) -> f64 {
    metric_value(
        &metrics(ns),
        "tapproof_capture_plaintext_attempts",
        &[source, &format!("mode=\"{mode}\"")],
    )
}

/// The tables nftables holds in `ns`, as `family name`.
fn tables(ns: &Netns) -> Vec<String> {
    ns.exec_ok(&["nft", "list", "tables"])
        .lines()
        .map(|l| l.trim_start_matches("table ").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The capture of A's link at `pcap`: the tunnel's packets are there, none to or from the
/// service's port 8080, and the canary never.
fn only_the_tunnel_crossed(pcap: &std::path::Path, canary: &str) {
    let captured = std::fs::read(pcap).unwrap();
    let segments = tcp_segments(&captured);
    assert!(
        segments.iter().any(|s| s.dst.port() == 15008),
        "the tunnel's packets are in the capture"
    );
    assert!(
        segments
            .iter()
            .all(|s| s.dst.port() != 8080 && s.src.port() != 8080),
        "a packet to or from port 8080 crossed the link"
    );
    assert!(
        !contains(&captured, canary.as_bytes()),
        "the canary crossed the link in the clear"
    );
}

/// `tapproof ARGS` in `ns`: (exit code, stdout, stderr).
fn tapproof(ns: &Netns, args: &[&str]) -> (i32, String, String) {
    run_tapproof_in(&ns.prefix(), EXE, args)
}

#[test]
fn capture_and_enforcement_across_three_hosts() {
    if !can_run() {
        return;
    }
    let h = Three::new(1);
    let pki = TestPki::new();
    let (web_id, client_id) = (pki.node("web-b"), pki.node("client-a"));
    let td = pki.td.clone();
    let canary = format!("TAPPROOF-CAPTURE-CANARY-{}", std::process::id());
    let docroot = pki.path().join("www");
    std::fs::create_dir_all(&docroot).unwrap();
    std::fs::write(docroot.join("canary.txt"), &canary).unwrap();

    // B: a web server on every address (dual-stack), fronted by its agent.
    let server = pki.path().join("web.py");
    std::fs::write(&server, WEB_SERVER).unwrap();
    let _web = spawn_ready(
        &h.b,
        &[
            "python3",
            "-u",
            server.to_str().unwrap(),
            docroot.to_str().unwrap(),
        ],
        "ready",
    )
    .0;
    let b_config = |mode: &str| {
        format!(
            "trust_domain = \"{td}\"\n{}[tunnel]\nlisten = \"[::]:15008\"\n[capture]\ninbound = \"{mode}\"\n\
             [[inbound]]\nservice = \"web\"\nforward = \"127.0.0.1:8080\"\nallow = [\"spiffe://{td}/node/client-a\"]\n",
            identity_section(&web_id)
        )
    };
    let mut b_agent = AgentProcess::start_with(EXE, pki.path(), "web-b", &b_config("enforce"), &h.b.prefix());
    // A: no client config anywhere; its agent captures B's real addresses and port.
    let a_config = format!(
        "trust_domain = \"{td}\"\n{}\
         [[outbound]]\ncapture = \"{b}:8080\"\nservice = \"web\"\npeers = [\"{b}:15008\"]\nserver_id = \"spiffe://{td}/node/web-b\"\n\
         [[outbound]]\ncapture = \"[{b6}]:8080\"\nservice = \"web\"\npeers = [\"[{b6}]:15008\"]\nserver_id = \"spiffe://{td}/node/web-b\"\n",
        identity_section(&client_id),
        b = h.b_ip,
        b6 = h.b6
    );
    let mut a_agent = AgentProcess::start_with(EXE, pki.path(), "client-a", &a_config, &h.a.prefix());
    for ns in [&h.a, &h.b, &h.c] {
        let t = tables(ns);
        assert!(
            t.is_empty() || t == ["inet tapproof"],
            "{}: tables {t:?}",
            ns.name
        );
    }
    assert_eq!(tables(&h.a), ["inet tapproof"]);
    assert_eq!(tables(&h.b), ["inet tapproof"]);

    // 1. A's plain curl to B's real address goes through the tunnel; the fibre sees only TLS.
    let pcap = pki.path().join("a-b.pcap");
    let dump = Tcpdump::start(&h.a, &h.a_if, &pcap);
    let url = format!("http://{}:8080/canary.txt", h.b_ip);
    assert_eq!(curl(&h.a, &url), (0, canary.clone()), "A's curl through capture");
    let url6 = format!("http://[{}]:8080/canary.txt", h.b6);
    assert_eq!(
        curl(&h.a, &url6),
        (0, canary.clone()),
        "A's curl over IPv6 through capture"
    );
    dump.stop();
    only_the_tunnel_crossed(&pcap, &canary);
    assert!(
        metric_value(
            &metrics(&h.a),
            "tapproof_capture_connections_total",
            &["result=\"accepted\""]
        ) >= 2.0
    );

    // 2. Enforce: C, without tapproof, gets nothing; B counts the drop with C's address.
    let direct = format!("http://{}:8080/canary.txt", h.b_for_c);
    let (code, body) = curl(&h.c, &direct);
    assert_ne!(code, 0, "C reached B's service in plaintext: {body}");
    assert!(!body.contains(&canary));
    let source = format!("source=\"{}\"", h.c_ip);
    wait_until("B to count C's attempt", Duration::from_secs(15), || {
        let m = metrics(&h.b);
        metric_value(&m, "tapproof_capture_enforce_dropped_packets", &[]) > 0.0
            && metric_value(
                &m,
                "tapproof_capture_plaintext_attempts",
                &[&source, "mode=\"enforce\""],
            ) > 0.0
    });
    // 3. The audit on B: the exposed [::]:8080 is not a finding; exit 0 at 100%.
    let b_toml = b_agent.config_path.to_str().unwrap().to_owned();
    let (code, out, err) = tapproof(&h.b, &["audit", "--config", &b_toml, "--json"]);
    assert_eq!(code, 0, "audit on B in enforce mode: {out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["summary"]["coverage_percent"], 100.0, "{out}");
    assert!(
        report["exposed_listeners"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| !l["local"].as_str().unwrap().ends_with(":8080")),
        "an enforced port is reported as exposed: {out}"
    );
    assert_eq!(report["capture"]["inbound"], "enforce");
    let (code, status, _) = tapproof(&h.b, &["capture", "status"]);
    assert_eq!(code, 0);
    assert!(status.contains("inbound: enforce on ports [8080]"), "{status}");
    assert!(
        status.contains(&format!("plaintext from {} to port 8080", h.c_ip)),
        "{status}"
    );

    // 4. A's agent killed: A's request fails at once and nothing crosses in plaintext.
    a_agent.signal(nix::sys::signal::Signal::SIGKILL);
    a_agent.wait(Duration::from_secs(5));
    let pcap = pki.path().join("a-b-down.pcap");
    let dump = Tcpdump::start(&h.a, &h.a_if, &pcap);
    let started = Instant::now();
    let (code, body) = curl(&h.a, &url);
    assert_eq!(
        code, 7,
        "with A's agent down curl must be refused (7), got {code}: {body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the refusal was not quick"
    );
    // tcpdump needs a packet to flush; send one harmless ping on the link.
    let _ = h.a.command(&["ping", "-c", "1", "-W", "1", &h.b_ip]).output();
    dump.stop();
    let down = std::fs::read(&pcap).unwrap();
    assert!(
        tcp_segments(&down).iter().all(|s| s.dst.port() != 8080),
        "plaintext to 8080 left A while its agent was down"
    );
    assert!(!contains(&down, canary.as_bytes()));
    assert_eq!(tables(&h.a), ["inet tapproof"], "the rules outlive the agent");
    // Restarted (same config, no operator action): it works again.
    drop(a_agent);
    let mut a_agent = AgentProcess::start_with(EXE, pki.path(), "client-a", &a_config, &h.a.prefix());
    assert_eq!(
        curl(&h.a, &url),
        (0, canary.clone()),
        "A's curl after the agent's restart"
    );

    // 5. B's agent down: enforcement stays (the kernel holds the rules).
    b_agent.signal(nix::sys::signal::Signal::SIGKILL);
    b_agent.wait(Duration::from_secs(5));
    assert_ne!(curl(&h.c, &direct).0, 0, "C reached B while B's agent was down");
    drop(b_agent);

    // 6. Monitor: C gets through, and is reported as a plaintext attempt.
    let b_agent = AgentProcess::start_with(EXE, pki.path(), "web-b", &b_config("monitor"), &h.b.prefix());
    assert_eq!(curl(&h.c, &direct), (0, canary.clone()), "monitor lets C through");
    wait_until(
        "B to count C's monitored attempt",
        Duration::from_secs(15),
        || attempts(&h.b, &source, "monitor") > 0.0,
    );
    let (code, out, _) = tapproof(&h.b, &["audit", "--config", &b_toml, "--json"]);
    assert_eq!(code, 1, "monitor attempts are findings: {out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["summary"]["plaintext_attempts"], 1, "{out}");
    let attempts = report["capture"]["attempts"].as_array().unwrap();
    assert!(
        attempts
            .iter()
            .any(|a| a["source"] == h.c_ip.as_str() && a["port"] == 8080),
        "{out}"
    );
    let (_, text, _) = tapproof(&h.b, &["audit", "--config", &b_toml]);
    assert!(
        text.contains(&format!("attempt    {} -> port 8080", h.c_ip)),
        "{text}"
    );

    // 7. Removal is explicit: refused while the agent runs, then done and logged.
    let (code, _, err) = tapproof(&h.b, &["capture", "remove", "--config", &b_toml]);
    assert_ne!(code, 0);
    assert!(err.contains("is running with capture"), "{err}");
    assert_eq!(tables(&h.b), ["inet tapproof"]);
    b_agent.terminate(Duration::from_secs(10));
    assert_eq!(tables(&h.b), ["inet tapproof"], "a clean stop leaves the rules");
    let (code, out, err) = tapproof(
        &h.b,
        &[
            "capture",
            "remove",
            "--config",
            &b_toml,
            "--reason",
            "test teardown",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("removed table inet tapproof") && out.contains("test teardown"),
        "{out}"
    );
    assert!(
        err.contains("capture rules removed"),
        "the removal is logged: {err}"
    );
    assert!(tables(&h.b).is_empty());
    let (code, _, _) = tapproof(&h.b, &["capture", "status"]);
    assert_eq!(code, 1, "status without rules");
    a_agent.terminate_ref(Duration::from_secs(10));
    let (code, out, err) = tapproof(&h.a, &["capture", "remove"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(tables(&h.a).is_empty() && tables(&h.c).is_empty());
    // With the rules gone, A's curl goes out in plaintext again (and B's service answers).
    assert_eq!(curl(&h.a, &url), (0, canary));
}

/// Runs `tapproof agent` in `ns` with `config` (prefixed by `wrap`) to its exit; its stderr.
fn agent_refuses(ns: &Netns, dir: &std::path::Path, wrap: &[&str], config: &str) -> String {
    let path = dir.join("refused.toml");
    std::fs::write(&path, config).unwrap();
    let mut argv: Vec<&str> = wrap.to_vec();
    argv.extend([EXE, "agent", "--config", path.to_str().unwrap()]);
    let mut child = ns
        .command(&argv)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn capture_refuses_what_it_cannot_do_and_fails_fast() {
    if !can_run() {
        return;
    }
    let h = Three::new(2);
    let pki = TestPki::new();
    let id = pki.node("client-a");
    let td = pki.td.clone();
    let outbound = |capture: &str, peer: &str| {
        format!(
            "trust_domain = \"{td}\"\n{}[[outbound]]\ncapture = \"{capture}\"\nservice = \"web\"\npeers = [\"{peer}\"]\nserver_id = \"spiffe://{td}/node/web-b\"\n",
            identity_section(&id)
        )
    };
    // Without CAP_NET_ADMIN (root with it dropped from the bounding set): refused, and said so.
    let config = outbound(&format!("{}:8080", h.b_ip), &format!("{}:15008", h.b_ip));
    let err = agent_refuses(
        &h.a,
        pki.path(),
        &["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"],
        &config,
    );
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    assert!(tables(&h.a).is_empty(), "nothing installed by a refused start");
    // A captured address of this host itself: refused, naming the key.
    let config = outbound(&format!("{}:8080", h.b_ip), &format!("{}:15008", h.b_ip));
    let err = agent_refuses(&h.b, pki.path(), &[], &config);
    assert!(
        err.contains("outbound[0].capture") && err.contains("address of this host"),
        "{err}"
    );
    assert!(tables(&h.b).is_empty());

    // A captured destination whose peer agent is unreachable: the app's connection is reset
    // at once (not left hanging, never sent in plaintext), counted and logged.
    let config = outbound(&format!("{}:8080", h.b_ip), &format!("{}:15999", h.b_ip));
    let a = AgentProcess::start_with(EXE, pki.path(), "client-a", &config, &h.a.prefix());
    let started = Instant::now();
    let (code, _) = curl(&h.a, &format!("http://{}:8080/", h.b_ip));
    assert!(
        // 52/56: reset after the connect; 7: the reset came so fast that curl counts it against
        // the connect. The agent's log and metrics below show it was the agent that reset it.
        matches!(code, 7 | 52 | 56),
        "curl must see the connection reset, got {code}; agent log:\n{}",
        a.log()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the failure was not quick"
    );
    assert!(
        metric_value(
            &metrics(&h.a),
            "tapproof_stream_failures_total",
            &["reason=\"no_tunnel\""]
        ) >= 1.0
    );
    assert!(
        a.log().contains(&format!("destination={}:8080", h.b_ip)),
        "the log names the destination"
    );
    // Someone dialling the capture port itself is not a captured connection: reset.
    let (code, _) = curl(&h.a, "http://127.0.0.1:15006/");
    assert_ne!(code, 0);
    assert!(
        metric_value(
            &metrics(&h.a),
            "tapproof_capture_connections_total",
            &["result=\"no_original_destination\""]
        ) >= 1.0
    );
    drop(a);
    let _ = tapproof(&h.a, &["capture", "remove"]);
}

/// `tapproof server ARGS` against `data` (the local store, as an operator on the server's host).
fn server_cli(data: &std::path::Path, args: &[&str]) -> String {
    let mut argv = vec!["server"];
    argv.extend_from_slice(&args[..args.len().min(2)]);
    argv.extend(["--data-dir", data.to_str().unwrap()]);
    argv.extend_from_slice(&args[args.len().min(2)..]);
    let (code, out, err) = tapproof_test_util::process::run_tapproof(EXE, &argv);
    assert_eq!(code, 0, "tapproof {argv:?}: {out}{err}");
    out
}

/// The control plane drives capture: B's agent announces where clients reach its service, A's
/// agent (`capture.directory`, no outbound of its own) captures those addresses and carries them
/// to B with B's node ID expected; the policy sets B's inbound mode fleet-wide (enforce) and then
/// per node (monitor), each change an audit row; A's agent restarted holds the capture until the
/// control plane answers again, so nothing leaves in plaintext meanwhile.
#[test]
fn capture_from_the_directory_and_modes_from_the_policy() {
    if !can_run() {
        return;
    }
    use tapproof_test_util::server::{control_section, init, ServerProcess};
    let h = Three::new(3);
    let pki = TestPki::new();
    let td = "example.org";
    let canary = format!("TAPPROOF-DIRECTORY-CANARY-{}", std::process::id());
    let docroot = pki.path().join("www");
    std::fs::create_dir_all(&docroot).unwrap();
    std::fs::write(docroot.join("canary.txt"), &canary).unwrap();
    let web = pki.path().join("web.py");
    std::fs::write(&web, WEB_SERVER).unwrap();
    let _web = spawn_ready(
        &h.b,
        &["python3", "-u", web.to_str().unwrap(), docroot.to_str().unwrap()],
        "ready",
    )
    .0;
    // The control plane runs on A's host; B's agent reaches it across the link.
    let data = init(EXE, pki.path(), td);
    let listen = format!("{}:15443", h.a_ip);
    let server = ServerProcess::start_in(&h.a.prefix(), EXE, &data, &listen, "1h", None, &[]);
    let b_token = server.token(EXE, "web-b", &["web"], "10m");
    let a_token = server.token(EXE, "client-a", &[], "10m");
    let b_config = format!(
        "trust_domain = \"{td}\"\n{}[tunnel]\nlisten = \"[::]:15008\"\nadvertise = \"{b}:15008\"\n\
         [[inbound]]\nservice = \"web\"\nforward = \"127.0.0.1:8080\"\naddresses = [\"{b}:8080\", \"[{b6}]:8080\"]\n\
         allow = [\"spiffe://{td}/node/client-a\"]\n",
        control_section(&pki.path().join("b-data"), &b_token),
        b = h.b_ip,
        b6 = h.b6
    );
    let b_agent = AgentProcess::start_with(EXE, pki.path(), "web-b", &b_config, &h.b.prefix());
    // A also serves a local port in monitor mode (its own config), so that its plaintext
    // attempts can be watched across a change of its captured destinations.
    let a_config = format!(
        "trust_domain = \"{td}\"\n{}[capture]\ndirectory = true\ninbound = \"monitor\"\n\
         [[inbound]]\nservice = \"a-local\"\nforward = \"127.0.0.1:9\"\n",
        control_section(&pki.path().join("a-data"), &a_token)
    );
    let mut a_agent = AgentProcess::start_with(EXE, pki.path(), "client-a", &a_config, &h.a.prefix());

    // 1. A captures both of B's announced addresses, from the directory alone.
    wait_until("A to capture B's two addresses", Duration::from_secs(30), || {
        metric_value(&metrics(&h.a), "tapproof_capture_destinations", &[]) == 2.0
    });
    let listed = server_cli(&data, &["registration", "list"]);
    assert!(
        listed.contains(&format!("{}:8080", h.b_ip)) && listed.contains(&format!("[{}]:8080", h.b6)),
        "the registration lists where clients reach web: {listed}"
    );
    let pcap = pki.path().join("dir.pcap");
    let dump = Tcpdump::start(&h.a, &h.a_if, &pcap);
    let url = format!("http://{}:8080/canary.txt", h.b_ip);
    assert_eq!(
        curl(&h.a, &url),
        (0, canary.clone()),
        "A's curl, captured from the directory"
    );
    let url6 = format!("http://[{}]:8080/canary.txt", h.b6);
    assert_eq!(curl(&h.a, &url6), (0, canary.clone()), "the same over IPv6");
    dump.stop();
    only_the_tunnel_crossed(&pcap, &canary);
    // B's agent runs no capture of its own: C reaches the service in plaintext for now.
    let direct = format!("http://{}:8080/canary.txt", h.b_for_c);
    assert_eq!(
        curl(&h.c, &direct),
        (0, canary.clone()),
        "no mode yet: C gets through"
    );
    assert!(
        tables(&h.b).is_empty(),
        "B installed nothing before the policy asked"
    );

    // B sends plaintext to A's monitored port: A counts it.
    let _ =
        h.b.command(&["curl", "-s", "--max-time", "2", &format!("http://{}:9/", h.a_ip)])
            .output();
    let from_b = format!("source=\"{}\"", h.b_ip);
    let a_attempts = || attempts(&h.a, &from_b, "monitor");
    wait_until("A to count B's attempt", Duration::from_secs(15), || {
        a_attempts() > 0.0
    });
    // B announces one more address, and one of A's host (a mistake in its config), taken by
    // SIGHUP and announced at once: A captures the first, refuses the second and says so, and
    // its captured set is updated in place (its attempts stay counted, no reinstall).
    std::fs::write(
        &b_agent.config_path,
        b_config.replace(
            &format!("\"[{}]:8080\"]", h.b6),
            &format!("\"[{}]:8080\", \"{}:8081\", \"{}:9999\"]", h.b6, h.b_ip, h.a_ip),
        ),
    )
    .unwrap();
    b_agent.signal(nix::sys::signal::Signal::SIGHUP);
    let refused = format!("destination=\"{}:9999\"", h.a_ip);
    wait_until("A to refuse its own address", Duration::from_secs(15), || {
        metric_value(
            &metrics(&h.a),
            "tapproof_capture_destinations_refused",
            &[&refused],
        ) == 1.0
    });
    wait_until("A to capture B's third address", Duration::from_secs(15), || {
        metric_value(&metrics(&h.a), "tapproof_capture_destinations", &[]) == 3.0
    });
    assert!(a_attempts() > 0.0, "A's attempt counters were lost by the update");
    assert_eq!(
        metric_value(&metrics(&h.a), "tapproof_capture_rules_reinstalled_total", &[]),
        0.0
    );
    let a_toml = a_agent.config_path.to_str().unwrap().to_owned();
    let (_, out, _) = tapproof(&h.a, &["audit", "--config", &a_toml, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let listed = &report["capture"]["refused"][0];
    assert_eq!(listed["destination"], format!("{}:9999", h.a_ip), "{out}");
    assert_eq!(listed["claimed_by"][0], "web-b/web");
    assert!(
        listed["reason"]
            .as_str()
            .unwrap()
            .contains("address of this host"),
        "{out}"
    );
    assert!(a_agent.log().contains("a directory destination is not captured"));
    assert_eq!(
        curl(&h.a, &url),
        (0, canary.clone()),
        "the other addresses are still captured"
    );

    // 2. The policy sets enforce fleet-wide: B's agent installs it; C is dropped and counted.
    let policy = pki.path().join("policy.toml");
    std::fs::write(&policy, "[capture]\ninbound = \"enforce\"\n").unwrap();
    server_cli(&data, &["policy", "set", "--file", policy.to_str().unwrap()]);
    let mode = |ns: &Netns, m: &str| {
        metric_value(
            &metrics(ns),
            "tapproof_capture_inbound_mode",
            &[&format!("mode=\"{m}\""), "set_by=\"policy\""],
        ) == 1.0
    };
    wait_until("B to enforce, by policy", Duration::from_secs(30), || {
        mode(&h.b, "enforce") && metric_value(&metrics(&h.b), "tapproof_capture_rules_installed", &[]) == 1.0
    });
    assert_eq!(tables(&h.b), ["inet tapproof"]);
    let (code, body) = curl(&h.c, &direct);
    assert_ne!(code, 0, "C reached B in plaintext under enforce: {body}");
    let source = format!("source=\"{}\"", h.c_ip);
    wait_until("B to count C's dropped attempt", Duration::from_secs(15), || {
        attempts(&h.b, &source, "enforce") > 0.0
    });
    assert_eq!(
        curl(&h.a, &url),
        (0, canary.clone()),
        "A still gets through the tunnel"
    );
    let b_toml = b_agent.config_path.to_str().unwrap().to_owned();
    let (code, out, err) = tapproof(&h.b, &["audit", "--config", &b_toml, "--json"]);
    assert_eq!(code, 0, "audit on B, enforced by policy: {out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["capture"]["inbound"], "enforce");
    assert_eq!(report["capture"]["inbound_from"], "policy");

    // 3. A node's own entry wins: B to monitor. C gets through and is reported with its address.
    std::fs::write(
        &policy,
        "[capture]\ninbound = \"enforce\"\n[capture.nodes]\nweb-b = \"monitor\"\n",
    )
    .unwrap();
    server_cli(&data, &["policy", "set", "--file", policy.to_str().unwrap()]);
    wait_until("B to monitor, by policy", Duration::from_secs(30), || {
        mode(&h.b, "monitor")
    });
    assert_eq!(curl(&h.c, &direct), (0, canary.clone()), "monitor lets C through");
    wait_until(
        "B to count C's monitored attempt",
        Duration::from_secs(15),
        || attempts(&h.b, &source, "monitor") > 0.0,
    );
    let (code, out, _) = tapproof(&h.b, &["audit", "--config", &b_toml, "--json"]);
    assert_eq!(code, 1, "a monitored attempt is a finding: {out}");
    assert!(out.contains(&h.c_ip), "{out}");
    // Both changes are in the audit log, with the modes before and after.
    let log = server_cli(&data, &["audit-log", "show", "--json"]);
    let changes: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["action"] == "capture.mode.set")
        .collect();
    assert_eq!(changes.len(), 2, "{log}");
    let last: serde_json::Value = serde_json::from_str(changes[1]["details"].as_str().unwrap()).unwrap();
    assert_eq!(last["after"]["nodes"]["web-b"], "monitor", "{last}");

    // 4. A's agent killed, and restarted while the control plane is down too: its captures stay
    //    (held over until the control plane answers), so nothing leaves A in plaintext even
    //    though B now lets plaintext through; it works again with no operator action.
    a_agent.signal(nix::sys::signal::Signal::SIGKILL);
    a_agent.wait(Duration::from_secs(5));
    let mut server = server;
    server.stop_ref();
    let pcap = pki.path().join("restart.pcap");
    let dump = Tcpdump::start(&h.a, &h.a_if, &pcap);
    assert_eq!(
        curl(&h.a, &url).0,
        7,
        "with A's agent down the connection is refused"
    );
    drop(a_agent);
    let a_agent = AgentProcess::start_with(EXE, pki.path(), "client-a", &a_config, &h.a.prefix());
    let (code, body) = curl(&h.a, &url);
    assert_ne!(
        code, 0,
        "before the control plane answers, a held-over capture is reset: {body}"
    );
    assert!(
        metric_value(
            &metrics(&h.a),
            "tapproof_capture_connections_total",
            &["result=\"unknown_destination\""]
        ) >= 1.0,
        "{}",
        a_agent.log()
    );
    let server = ServerProcess::start_in(&h.a.prefix(), EXE, &data, &listen, "1h", None, &[]);
    let mut codes = Vec::new();
    wait_until(
        "A's curl to work after the restarts",
        Duration::from_secs(30),
        || {
            let (code, body) = curl(&h.a, &url);
            codes.push(code);
            code == 0 && body == canary
        },
    );
    let _ = h.a.command(&["ping", "-c", "1", "-W", "1", &h.b_ip]).output();
    dump.stop();
    let restart = std::fs::read(&pcap).unwrap();
    assert!(
        tcp_segments(&restart).iter().all(|s| s.dst.port() != 8080),
        "plaintext to 8080 left A around its agent's restart (curl exits {codes:?})"
    );
    assert!(!contains(&restart, canary.as_bytes()));

    // The rules go only by the explicit command, once the agents are stopped; it is recorded in
    // the control plane's audit log with the node as actor, and refused when it cannot be
    // (unless --force).
    a_agent.terminate(Duration::from_secs(10));
    b_agent.terminate(Duration::from_secs(10));
    for ns in [&h.a, &h.b] {
        assert_eq!(
            tables(ns),
            ["inet tapproof"],
            "{}: a stop leaves the rules",
            ns.name
        );
    }
    let (code, out, err) = tapproof(
        &h.b,
        &[
            "capture",
            "remove",
            "--config",
            &b_toml,
            "--reason",
            "test teardown",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("recorded in the control plane's audit log"), "{out}");
    assert!(tables(&h.b).is_empty());
    let log = server_cli(&data, &["audit-log", "show", "--json"]);
    let row = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["action"] == "capture.removed")
        .unwrap_or_else(|| panic!("no capture.removed row: {log}"));
    assert_eq!(row["actor"], format!("spiffe://{td}/node/web-b"));
    let details: serde_json::Value = serde_json::from_str(row["details"].as_str().unwrap()).unwrap();
    assert_eq!(details["reason"], "test teardown");
    assert_eq!(details["inbound"], "monitor");
    assert!(details["by"].as_str().unwrap().contains("uid 0"), "{details}");
    let mut server = server;
    server.stop_ref();
    let (code, _, err) = tapproof(&h.a, &["capture", "remove", "--config", &a_toml]);
    assert_ne!(
        code, 0,
        "a removal the control plane cannot record must be refused"
    );
    assert!(err.contains("could not record the removal"), "{err}");
    assert_eq!(tables(&h.a), ["inet tapproof"], "the rules stay");
    let (code, out, err) = tapproof(&h.a, &["capture", "remove", "--config", &a_toml, "--force"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("NOT recorded"), "{out}");
    assert!(tables(&h.a).is_empty() && tables(&h.c).is_empty());
}

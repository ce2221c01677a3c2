//! Site gateways across an interconnect, with real nftables in five namespaces: host A1 (no
//! agent) -- gateway GA == interconnect == gateway GB -- host B1 (no agent). A1 routes site B's
//! network via GA and needs nothing else: a plain `curl` and a `dig` (against dnsmasq on B1) to
//! B1's real address are carried GA -> GB through the tunnel (TCP as CONNECT streams, UDP as
//! CONNECT-UDP) and opened to B1 by GB, over IPv4 and IPv6; the interconnect carries only TLS
//! between the gateways and never the HTTP canary or the DNS query name; another IP protocol
//! routed to site B is dropped at GA, not forwarded in plaintext. A second test puts two gateways
//! in site A and stops, kills and silences them in turn while B1 opens new connections; in it a
//! host of site A with its own agent (`[[remote]]`) reaches B1 by TCP and UDP as itself. A third runs the gateways on control-plane
//! certificates (30 s leaves) through rotations and a root rollover while A1 keeps connecting and
//! one download outlives the certificates its tunnel was made with.
//!
//! Needs root, nft, tcpdump, curl, python3, dig and dnsmasq. Under CI (CI=true) it runs and fails loudly.

use std::process::Command;
use std::time::Duration;
use tapproof_test_util::netns::{spawn_ready, Netns, Tcpdump};
use tapproof_test_util::pcap::{contains, tcp_segments};
use tapproof_test_util::pki::TestPki;
use tapproof_test_util::process::{identity_section, metric_value, run_tapproof_in, AgentProcess};
use tapproof_test_util::server::{control_section, init, ServerProcess};
use tapproof_test_util::wait_until;

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");

fn can_run() -> bool {
    tapproof_test_util::root_with(
        "gateway test",
        &[
            ("nft", "--version"),
            ("tcpdump", "--version"),
            ("curl", "--version"),
            ("python3", "--version"),
            ("ip", "-V"),
            ("dig", "-v"),
            ("dnsmasq", "--version"),
        ],
    )
}

fn link(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    let out = Command::new("ip")
        .args([
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn addr(ns: &Netns, dev: &str, cidr: &str) {
    ns.exec_ok(&["ip", "addr", "add", cidr, "dev", dev]);
    ns.exec_ok(&["ip", "link", "set", dev, "up"]);
}

/// Python's HTTP server on port 8080 (all addresses, IPv4 and IPv6) serving `docroot` in `ns`.
fn web_server(ns: &Netns, docroot: &std::path::Path) -> tapproof_test_util::netns::Background {
    let dir = docroot.to_str().unwrap();
    let args = [
        "python3",
        "-u",
        "-m",
        "http.server",
        "8080",
        "--bind",
        "::",
        "--directory",
        dir,
    ];
    spawn_ready(ns, &args, "Serving HTTP").0
}

/// A DNS server in `ns` on `addresses` (dnsmasq, in the foreground, logging to stdout): every
/// name under .test is 10.9.8.7 / fd00::9.
fn dns_server(ns: &Netns, addresses: &[&str]) -> tapproof_test_util::netns::Background {
    let listen: Vec<String> = addresses
        .iter()
        .map(|a| format!("--listen-address={a}"))
        .collect();
    let dnsmasq = format!(
        "exec dnsmasq -k --log-facility=- --user=root --no-resolv --no-hosts --bind-interfaces \
         {} --port=53 --address=/test/10.9.8.7 --address=/test/fd00::9 2>&1",
        listen.join(" ")
    );
    spawn_ready(ns, &["sh", "-c", &dnsmasq], "dnsmasq[").0
}

/// `dig +short` in `ns` for `name` (record type `kind`) at `server`: the answer, or why there
/// is none.
fn dig(ns: &Netns, server: &str, name: &str, kind: &str) -> Result<String, String> {
    let out = ns
        .command(&[
            "dig",
            "+short",
            "+time=3",
            "+tries=1",
            &format!("@{server}"),
            name,
            kind,
        ])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() && !answer.is_empty() {
        Ok(answer)
    } else {
        Err(format!("{answer} {}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn metrics(ns: &Netns) -> String {
    ns.exec_ok(&["curl", "-s", "http://127.0.0.1:15000/metrics"])
}

/// A `[gateway]` section fronting `local`, with one `[[gateway.remote]]` site `name`: its
/// `networks`, its gateways' tunnel addresses and the identity they prove. Keys of that site
/// (`allow`, `[[gateway.remote.policy]]`) may follow.
fn gateway_section(
    local: &[&str],
    name: &str,
    networks: &[&str],
    gateways: &[&str],
    server_id: &str,
) -> String {
    let list = |items: &[&str]| {
        items
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[gateway]\nnetworks = [{}]\n[[gateway.remote]]\nname = \"{name}\"\nnetworks = [{}]\n\
         gateways = [{}]\nserver_id = \"{server_id}\"\n",
        list(local),
        list(networks),
        list(gateways)
    )
}

/// Host A1 -- gateway GA == interconnect == gateway GB -- host B1, IPv4: site A
/// 10.71.N.0/24, site B 10.72.N.0/24, the interconnect 10.79.N.0/30 (GA .1, GB .2). The hosts
/// route the other site's network via their gateway and the gateways route it across the
/// interconnect, as ordinary static routes (so anything the gateways' rules did not take would be
/// forwarded there in plaintext). `tag` tells apart the namespaces and links of two tests of one
/// process.
struct Line {
    a1: Netns,
    ga: Netns,
    gb: Netns,
    b1: Netns,
    a1_if: String,
    ga_a: String,
    ga_x: String,
    gb_b: String,
    b1_if: String,
    n: u32,
    site_a: String,
    site_b: String,
    ga_ip: String,
    gb_ip: String,
}

fn line(tag: &str) -> Line {
    let pid = std::process::id();
    let t = pid % 10_000;
    let ns = |n: &str| Netns::create(format!("tp-gw{tag}-{pid}-{n}"));
    let (a1, ga, gb, b1) = (ns("a1"), ns("ga"), ns("gb"), ns("b1"));
    let (a1_if, ga_a, ga_x, gb_x, gb_b, b1_if) = (
        format!("gw{tag}a1{t}"),
        format!("gw{tag}gaa{t}"),
        format!("gw{tag}gax{t}"),
        format!("gw{tag}gbx{t}"),
        format!("gw{tag}gbb{t}"),
        format!("gw{tag}b1{t}"),
    );
    link(&a1, &a1_if, &ga, &ga_a);
    link(&ga, &ga_x, &gb, &gb_x);
    link(&gb, &gb_b, &b1, &b1_if);
    let n = 1 + pid % 250;
    let (site_a, site_b) = (format!("10.71.{n}"), format!("10.72.{n}"));
    let (ga_ip, gb_ip) = (format!("10.79.{n}.1"), format!("10.79.{n}.2"));
    addr(&a1, &a1_if, &format!("{site_a}.2/24"));
    addr(&ga, &ga_a, &format!("{site_a}.1/24"));
    addr(&ga, &ga_x, &format!("{ga_ip}/30"));
    addr(&gb, &gb_x, &format!("{gb_ip}/30"));
    addr(&gb, &gb_b, &format!("{site_b}.1/24"));
    addr(&b1, &b1_if, &format!("{site_b}.2/24"));
    // Ordinary static routes: the hosts send the other site's network to their gateway, and the
    // gateways route it across the interconnect (so anything the rules did not take would be
    // forwarded there in plaintext).
    a1.exec_ok(&[
        "ip",
        "route",
        "add",
        &format!("{site_b}.0/24"),
        "via",
        &format!("{site_a}.1"),
    ]);
    b1.exec_ok(&[
        "ip",
        "route",
        "add",
        &format!("{site_a}.0/24"),
        "via",
        &format!("{site_b}.1"),
    ]);
    ga.exec_ok(&["ip", "route", "add", &format!("{site_b}.0/24"), "via", &gb_ip]);
    gb.exec_ok(&["ip", "route", "add", &format!("{site_a}.0/24"), "via", &ga_ip]);
    for g in [&ga, &gb] {
        g.exec_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    }

    Line {
        a1,
        ga,
        gb,
        b1,
        a1_if,
        ga_a,
        ga_x,
        gb_b,
        b1_if,
        n,
        site_a,
        site_b,
        ga_ip,
        gb_ip,
    }
}

#[test]
fn routed_tcp_crosses_the_interconnect_only_inside_the_gateways_tunnel() {
    if !can_run() {
        return;
    }
    let pid = std::process::id();
    let Line {
        a1,
        ga,
        gb,
        b1,
        a1_if,
        ga_a,
        ga_x,
        gb_b,
        b1_if,
        n,
        site_a,
        site_b,
        ga_ip,
        gb_ip,
        ..
    } = line("");
    // IPv6 on the same links: site A fd71:N::/64, site B fd72:N::/64 (the interconnect stays
    // IPv4: the tunnel runs over it either way).
    let (six_a, six_b) = (format!("fd71:{n:x}:"), format!("fd72:{n:x}:"));
    for (host, dev, ip) in [
        (&a1, &a1_if, format!("{six_a}:2/64")),
        (&ga, &ga_a, format!("{six_a}:1/64")),
        (&gb, &gb_b, format!("{six_b}:1/64")),
        (&b1, &b1_if, format!("{six_b}:2/64")),
    ] {
        host.exec_ok(&["ip", "-6", "addr", "add", &ip, "dev", dev, "nodad"]);
    }
    a1.exec_ok(&[
        "ip",
        "-6",
        "route",
        "add",
        &format!("{six_b}:/64"),
        "via",
        &format!("{six_a}:1"),
    ]);
    b1.exec_ok(&[
        "ip",
        "-6",
        "route",
        "add",
        &format!("{six_a}:/64"),
        "via",
        &format!("{six_b}:1"),
    ]);
    for g in [&ga, &gb] {
        g.exec_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]);
    }
    let pki = TestPki::new();
    let td = pki.td.clone();
    let (ga_id, gb_id) = (pki.node("gw-a"), pki.node("gw-b"));
    let canary = format!("TAPPROOF-GATEWAY-CANARY-{pid}");
    let docroot = pki.path().join("www");
    std::fs::create_dir_all(&docroot).unwrap();
    std::fs::write(docroot.join("canary.txt"), &canary).unwrap();
    let _web = web_server(&b1, &docroot);
    let _dns = dns_server(&b1, &[&format!("{site_b}.2"), &format!("{six_b}:2")]);
    let gateway = |me: &tapproof_test_util::pki::IdentityPaths,
                   listen: &str,
                   local: &str,
                   remote: &str,
                   peer: &str,
                   peer_name: &str| {
        let six = |site: &str| if site == site_a { &six_a } else { &six_b };
        format!(
            "trust_domain = \"{td}\"\n{}[tunnel]\nlisten = \"{listen}:15008\"\n{}",
            identity_section(me),
            gateway_section(
                &[&format!("{local}.0/24"), &format!("{}:/64", six(local))],
                "other",
                &[&format!("{remote}.0/24"), &format!("{}:/64", six(remote))],
                &[&format!("{peer}:15008")],
                &format!("spiffe://{td}/node/{peer_name}"),
            )
        )
    };
    let ga_agent = AgentProcess::start_with(
        EXE,
        pki.path(),
        "gw-a",
        &gateway(&ga_id, &ga_ip, &site_a, &site_b, &gb_ip, "gw-b"),
        &ga.prefix(),
    );
    let gb_agent = AgentProcess::start_with(
        EXE,
        pki.path(),
        "gw-b",
        // Site A's flows may reach only B1's web and DNS ports here.
        &format!(
            "{}[[gateway.remote.policy]]\nfrom = [\"{site_a}.0/24\", \"{six_a}:/64\"]\nto = [\"{site_b}.2/32\", \"{six_b}:2/128\"]\nports = [8080, 53]\n",
            gateway(&gb_id, &gb_ip, &site_b, &site_a, &ga_ip, "gw-a")
        ),
        &gb.prefix(),
    );

    // 1. A1's plain curl to B1's real address: through GA's and GB's tunnel, only TLS on the
    //    interconnect.
    let pcap = pki.path().join("interconnect.pcap");
    let dump = Tcpdump::start(&ga, &ga_x, &pcap);
    let url = format!("http://{site_b}.2:8080/canary.txt");
    let out = a1
        .command(&["curl", "-s", "-S", "--max-time", "5", &url])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        canary,
        "A1's curl through the gateways: {}\nGA: {}\nGB: {}",
        String::from_utf8_lossy(&out.stderr),
        ga_agent.log(),
        gb_agent.log()
    );
    let url6 = format!("http://[{six_b}:2]:8080/canary.txt");
    let out = a1
        .command(&["curl", "-g", "-s", "-S", "--max-time", "5", &url6])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        canary,
        "the same over IPv6: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 1b. A port the site policy does not list: GB refuses the stream, A1 sees it reset.
    let out = a1
        .command(&[
            "curl",
            "-s",
            "--max-time",
            "5",
            &format!("http://{site_b}.2:8081/"),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "A1 reached B1:8081 against GB's site policy"
    );
    assert!(
        metric_value(
            &metrics(&gb),
            "tapproof_policy_denials_total",
            &["reason=\"not_in_site_policy\""]
        ) >= 1.0,
        "GB counted the refusal by its site policy\n{}",
        gb_agent.log()
    );
    // 2. A DNS query from A1 to B1's server: UDP through the gateways (CONNECT-UDP), answered
    //    from B1's address, over IPv4 and IPv6.
    let qname = format!("tapproof-dns-canary-{pid}");
    for (server, kind, want) in [
        (format!("{site_b}.2"), "A", "10.9.8.7"),
        (format!("{six_b}:2"), "AAAA", "fd00::9"),
    ] {
        assert_eq!(
            dig(&a1, &server, &format!("{qname}.test"), kind).as_deref(),
            Ok(want),
            "dig @{server} through the gateways\nGA: {}\nGB: {}",
            ga_agent.log(),
            gb_agent.log()
        );
    }
    let m = metrics(&ga);
    assert!(
        metric_value(
            &m,
            "tapproof_udp_flows_total",
            &["side=\"outbound\"", "result=\"opened\""]
        ) >= 2.0,
        "{m}"
    );
    wait_until(
        "GA's rules to count the routed datagrams (read every 5 s)",
        Duration::from_secs(15),
        || metric_value(&metrics(&ga), "tapproof_gateway_routed_datagrams", &[]) >= 2.0,
    );
    // 2b. A UDP flood from one host: 400 flows (source ports) from A1 meet the 256-flow limit
    //     per source; the rest are dropped and counted, and another host of site A (A1's second
    //     address) still gets its DNS answer.
    let flood = format!(
        "import socket\nsocks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(400)]\n\
         for s in socks: s.sendto(b'flood', ('{site_b}.2', 53))\n"
    );
    a1.exec_ok(&["python3", "-c", &flood]);
    let limited = || {
        metric_value(
            &metrics(&ga),
            "tapproof_udp_dropped_datagrams_total",
            &["reason=\"flow_limit\""],
        )
    };
    for _ in 0..150 {
        if limited() >= 100.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        limited() >= 100.0,
        "GA counted the flows over the limit:\n{}\n{}",
        metrics(&ga)
            .lines()
            .filter(|l| l.contains("udp"))
            .collect::<Vec<_>>()
            .join("\n"),
        ga_agent
            .log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    a1.exec_ok(&["ip", "addr", "add", &format!("{site_a}.3/24"), "dev", &a1_if]);
    let out = a1
        .command(&[
            "dig",
            "+short",
            "+time=3",
            "+tries=1",
            "-b",
            &format!("{site_a}.3"),
            &format!("@{site_b}.2"),
            &format!("{qname}.test"),
            "A",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "10.9.8.7",
        "another host's DNS during A1's flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What each gateway reports per site (its coverage report's capture.gateway, published at
    // each look at the rules): GA carried TCP and UDP flows to site "other" with the HTTP bytes
    // (counted as flows end); GB counted the flow its policy refused.
    let site_report = |g: &Netns, direction: &str| -> serde_json::Value {
        let sockets: serde_json::Value =
            serde_json::from_str(&g.exec_ok(&["curl", "-s", "http://127.0.0.1:15000/v1/sockets"])).unwrap();
        sockets["capture"]["gateway"]["sites"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|t| t["site"] == "other" && t["direction"] == direction)
                    .cloned()
            })
            .unwrap_or_default()
    };
    wait_until("GA's site report", Duration::from_secs(15), || {
        let t = site_report(&ga, "to");
        t["tcp_flows"].as_u64() >= Some(3)
            && t["udp_flows"].as_u64() >= Some(2)
            && t["bytes_received"].as_u64() >= Some(2 * canary.len() as u64)
            && t["refused"].as_u64() >= Some(1)
    });
    wait_until("GB's site report", Duration::from_secs(15), || {
        let t = site_report(&gb, "from");
        t["tcp_flows"].as_u64() >= Some(2)
            && t["udp_flows"].as_u64() >= Some(2)
            && t["refused"].as_u64() >= Some(1)
    });
    // 3. Another IP protocol routed to site B (253, for experiments) is dropped at GA, never
    //    forwarded in plaintext.
    let send_raw = format!(
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 253); [s.sendto(b'{canary}-raw', ('{site_b}.2', 0)) for _ in range(3)]"
    );
    a1.exec_ok(&["python3", "-c", &send_raw]);
    wait_until("GA to count the dropped packets", Duration::from_secs(15), || {
        metric_value(&metrics(&ga), "tapproof_gateway_dropped_packets", &[]) >= 3.0
    });
    dump.stop();
    let captured = std::fs::read(&pcap).unwrap();
    let protocols = tapproof_test_util::pcap::ipv4_protocols(&captured);
    assert!(
        protocols.iter().all(|p| *p == 6),
        "only TCP (the tunnel) crossed the interconnect, not IP protocols {:?}",
        protocols.iter().filter(|p| **p != 6).collect::<Vec<_>>()
    );
    assert!(
        !contains(&captured, qname.as_bytes()),
        "the DNS query name crossed the interconnect in the clear"
    );
    let segments = tcp_segments(&captured);
    assert!(
        segments.iter().any(|s| s.dst.port() == 15008),
        "the gateways' tunnel is in the capture"
    );
    assert!(
        segments
            .iter()
            .all(|s| s.dst.port() == 15008 || s.src.port() == 15008),
        "a TCP segment other than the tunnel crossed the interconnect"
    );
    assert!(
        !contains(&captured, canary.as_bytes()),
        "the canary (HTTP body or raw IP payload) crossed the interconnect in the clear"
    );
    assert!(metric_value(&metrics(&ga), "tapproof_gateway_routed_connections", &[]) >= 1.0);
    assert!(
        metric_value(
            &metrics(&gb),
            "tapproof_streams_total",
            &["service=\"(gateway)\""]
        ) >= 1.0,
        "GB carried the stream under the gateway label:\n{}",
        metrics(&gb)
    );

    // The kernel's table reads back as the agent planned it: no reinstall loop.
    for g in [&ga, &gb] {
        let m = metrics(g);
        assert_eq!(
            metric_value(&m, "tapproof_capture_rules_installed", &[]),
            1.0,
            "{m}"
        );
        assert_eq!(
            metric_value(&m, "tapproof_capture_rules_reinstalled_total", &[]),
            0.0,
            "{m}"
        );
    }

    // The rules stay when the gateways stop (routed TCP fails, nothing leaks) until removed.
    ga_agent.terminate(Duration::from_secs(10));
    let out = a1
        .command(&["curl", "-s", "--max-time", "3", &url])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&canary),
        "with GA down, A1 reached B1"
    );
    gb_agent.terminate(Duration::from_secs(10));
    for g in [&ga, &gb] {
        let (code, out, err) = run_tapproof_in(
            &g.prefix(),
            EXE,
            &["capture", "remove", "--reason", "test teardown"],
        );
        assert_eq!(code, 0, "{out}{err}");
    }
    for host in [&a1, &ga, &gb, &b1] {
        assert!(
            host.exec_ok(&["nft", "list", "tables"]).trim().is_empty(),
            "{}",
            host.name
        );
    }
}

/// One HTTP GET from `host` with curl; whether it got 200.
fn fetch(host: &Netns, url: &str, max_time: &str) -> bool {
    let out = host
        .command(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            max_time,
            url,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout) == "200"
}

/// New connections from `host` every 100 ms until one succeeds; how long that took.
fn until_a_fetch_succeeds(host: &Netns, url: &str, give_up: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < give_up {
        if fetch(host, url, "1") {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn bridge(ns: &Netns, ports: &[&str], cidr: &str) {
    ns.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
    for port in ports {
        ns.exec_ok(&["ip", "link", "set", port, "master", "br0"]);
        ns.exec_ok(&["ip", "link", "set", port, "up"]);
    }
    addr(ns, "br0", cidr);
}

/// Two gateways in site A (GA1, GA2, one LAN and one interconnect), one in site B. A host of
/// site A with its own agent (A2, `[[remote]]`) reaches B1 as itself (a curl and a dig),
/// admitted by GB under its node identity. Site B's gateway lists both site-A gateways and B1 opens new connections to
/// A1 all along: a planned restart of GA1
/// (SIGTERM) drains its open download to the end with no new connection failing; a GA1 killed
/// outright (SIGKILL) and a GA2 whose link goes silent (no FIN, no RST: a dead host) are each
/// replaced by the other for new connections within 5 s.
#[test]
fn a_second_gateway_takes_over_when_one_drains_dies_or_goes_silent() {
    if !can_run() {
        return;
    }
    let pid = std::process::id();
    let t = pid % 10_000;
    let ns = |n: &str| Netns::create(format!("tp-gwha-{pid}-{n}"));
    let (a1, ga1, ga2, gb, b1) = (ns("a1"), ns("ga1"), ns("ga2"), ns("gb"), ns("b1"));
    // A2: a host of site A that runs an agent of its own.
    let a2 = ns("a2");
    let n = 1 + pid % 250;
    let (site_a, ix, site_b) = (format!("10.73.{n}"), format!("10.74.{n}"), format!("10.75.{n}"));
    let name = |s: &str| format!("{s}{t}");
    // Site A's LAN: a bridge in A1 with a port to each gateway; the interconnect: a bridge in GB.
    link(&a1, &name("hal1"), &ga1, &name("hag1"));
    link(&a1, &name("hal2"), &ga2, &name("hag2"));
    link(&gb, &name("hxb1"), &ga1, &name("hxg1"));
    link(&gb, &name("hxb2"), &ga2, &name("hxg2"));
    link(&gb, &name("hbb"), &b1, &name("hbh"));
    link(&a1, &name("hal3"), &a2, &name("ha2"));
    bridge(
        &a1,
        &[&name("hal1"), &name("hal2"), &name("hal3")],
        &format!("{site_a}.2/24"),
    );
    addr(&a2, &name("ha2"), &format!("{site_a}.3/24"));
    bridge(&gb, &[&name("hxb1"), &name("hxb2")], &format!("{ix}.1/24"));
    addr(&ga1, &name("hag1"), &format!("{site_a}.11/24"));
    addr(&ga2, &name("hag2"), &format!("{site_a}.12/24"));
    addr(&ga1, &name("hxg1"), &format!("{ix}.11/24"));
    addr(&ga2, &name("hxg2"), &format!("{ix}.12/24"));
    addr(&gb, &name("hbb"), &format!("{site_b}.1/24"));
    addr(&b1, &name("hbh"), &format!("{site_b}.2/24"));
    let route = |host: &Netns, net: &str, via: &str| {
        host.exec_ok(&["ip", "route", "add", &format!("{net}.0/24"), "via", via]);
    };
    route(&b1, &site_a, &format!("{site_b}.1"));
    route(&a1, &site_b, &format!("{site_a}.11"));
    route(&a2, &site_b, &format!("{site_a}.11"));
    route(&a2, &ix, &format!("{site_a}.11"));
    route(&ga1, &site_b, &format!("{ix}.1"));
    route(&ga2, &site_b, &format!("{ix}.1"));
    route(&gb, &site_a, &format!("{ix}.11"));
    for g in [&ga1, &ga2, &gb] {
        g.exec_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    }

    let pki = TestPki::new();
    let td = pki.td.clone();
    // Both site-A gateways prove the one identity site B expects of them, each with its own key.
    let (ga1_id, ga2_id, gb_id) = (
        pki.node_as("gw-a", "gw-a1"),
        pki.node_as("gw-a", "gw-a2"),
        pki.node("gw-b"),
    );
    let a2_id = pki.node("host-a2");
    let docroot = pki.path().join("www");
    std::fs::create_dir_all(&docroot).unwrap();
    std::fs::write(docroot.join("small.txt"), "ok").unwrap();
    let big = tapproof_test_util::traffic::random_bytes(4 * 1024 * 1024);
    std::fs::write(docroot.join("big.bin"), &big).unwrap();
    let _web = web_server(&a1, &docroot);
    let _b1_web = web_server(&b1, &docroot);
    let _b1_dns = dns_server(&b1, &[&format!("{site_b}.2")]);
    // Quick liveness so a silent gateway is noticed in about two seconds.
    let tunnel = |listen: &str| {
        format!("[tunnel]\nlisten = \"{listen}:15008\"\nping_interval = \"1s\"\nping_timeout = \"1s\"\n")
    };
    let site_a_gateway = |me: &tapproof_test_util::pki::IdentityPaths, listen: &str| {
        format!(
            "trust_domain = \"{td}\"\n{}{}{}",
            identity_section(me),
            tunnel(listen),
            gateway_section(
                &[&format!("{site_a}.0/24")],
                "dc-b",
                &[&format!("{site_b}.0/24")],
                &[&format!("{ix}.1:15008")],
                &format!("spiffe://{td}/node/gw-b"),
            )
        )
    };
    let start = |ns: &Netns, name: &str, config: &str| {
        AgentProcess::start_with(EXE, pki.path(), name, config, &ns.prefix())
    };
    let ga1_config = site_a_gateway(&ga1_id, &format!("{ix}.11"));
    let ga2_config = site_a_gateway(&ga2_id, &format!("{ix}.12"));
    let mut ga1_agent = start(&ga1, "gw-a1", &ga1_config);
    let mut ga2_agent = start(&ga2, "gw-a2", &ga2_config);
    let gb_agent = start(
        &gb,
        "gw-b",
        &format!(
            "trust_domain = \"{td}\"\n{}{}{}allow = [\"spiffe://{td}/node/host-a2\"]\n",
            identity_section(&gb_id),
            tunnel(&format!("{ix}.1")),
            gateway_section(
                &[&format!("{site_b}.0/24")],
                "dc-a",
                &[&format!("{site_a}.0/24")],
                &[&format!("{ix}.11:15008"), &format!("{ix}.12:15008")],
                &format!("spiffe://{td}/node/gw-a"),
            )
        ),
    );
    let carried = |g: &Netns| metric_value(&metrics(g), "tapproof_streams_total", &["service=\"(gateway)\""]);
    let small = format!("http://{site_a}.2:8080/small.txt");
    // The agents' log files (a restarted agent starts its file afresh).
    let logs = || {
        let read = |n: &str| std::fs::read_to_string(pki.path().join(format!("{n}.log"))).unwrap_or_default();
        format!(
            "GA1:\n{}\nGA2:\n{}\nGB:\n{}",
            read("gw-a1"),
            read("gw-a2"),
            read("gw-b")
        )
    };

    // 1. GB dials the first listed gateway.
    assert!(fetch(&b1, &small, "5"), "B1 to A1 through GB and GA1\n{}", logs());
    assert_eq!(carried(&ga1), 1.0, "{}", logs());

    // 1b. A2 runs an agent with [[remote]]: its own connection to B1 goes in its own tunnel,
    //     routed through GA1 as TLS, to GB, which admits A2's node identity (dc-a's allow). GA1
    //     carries no stream for it: it never sees that traffic in plaintext.
    let a2_agent = start(
        &a2,
        "host-a2",
        &format!(
            "trust_domain = \"{td}\"\n{}[[remote]]\nname = \"dc-b\"\nnetworks = [\"{site_b}.0/24\"]\ngateways = [\"{ix}.1:15008\"]\nserver_id = \"spiffe://{td}/node/gw-b\"\n",
            identity_section(&a2_id),
        ),
    );
    let from_a2 = a2
        .command(&[
            "curl",
            "-s",
            "--max-time",
            "5",
            &format!("http://{site_b}.2:8080/small.txt"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&from_a2.stdout),
        "ok",
        "A2 to B1 as itself: {}\nA2:\n{}\n{}",
        String::from_utf8_lossy(&from_a2.stderr),
        a2_agent.log(),
        logs()
    );
    let decisions: Vec<String> = logs()
        .lines()
        .filter(|l| {
            l.contains("gateway stream admitted") && l.contains(&format!("spiffe://{td}/node/host-a2"))
        })
        .map(str::to_owned)
        .collect();
    assert_eq!(
        decisions.len(),
        1,
        "GB's decision names A2's own identity\n{}",
        logs()
    );
    assert!(
        decisions[0].contains("host"),
        "admitted as a host of dc-a: {}",
        decisions[0]
    );
    assert_eq!(carried(&ga1), 1.0, "GA1 carried no stream for A2\n{}", logs());
    // 1c. A2's own DNS query to B1 (UDP): marked on its way out, round through lo to A2's agent,
    //     a CONNECT-UDP stream in A2's tunnel, admitted by GB as A2 again.
    let qname = format!("tapproof-a2-udp-{pid}.test");
    assert_eq!(
        dig(&a2, &format!("{site_b}.2"), &qname, "A").as_deref(),
        Ok("10.9.8.7"),
        "A2's dig to B1 as itself\nA2:\n{}\n{}",
        a2_agent.log(),
        logs()
    );
    let udp_decisions = logs()
        .lines()
        .filter(|l| {
            l.contains("gateway stream admitted")
                && l.contains("udp")
                && l.contains(&format!("spiffe://{td}/node/host-a2"))
                && l.contains("host")
        })
        .count();
    assert_eq!(udp_decisions, 1, "GB's UDP decision names A2\n{}", logs());
    assert_eq!(
        metric_value(
            &metrics(&a2),
            "tapproof_udp_flows_total",
            &["side=\"outbound\"", "result=\"opened\""]
        ),
        1.0,
        "A2's agent carried the flow"
    );
    assert_eq!(
        metric_value(
            &metrics(&ga1),
            "tapproof_udp_flows_total",
            &["side=\"outbound\"", "result=\"opened\""]
        ),
        0.0,
        "GA1 carried no flow for A2's UDP (it routed A2's tunnel only)"
    );
    wait_until(
        "A2's rules to count its captured connection to site B (read every 5 s)",
        Duration::from_secs(15),
        || metric_value(&metrics(&a2), "tapproof_gateway_routed_connections", &[]) >= 1.0,
    );
    drop(a2_agent);
    // With A2's agent gone its rules stay: its UDP to site B meets no socket and is dropped on
    // A2 (fails closed), it does not leave A2 for GA1 in plaintext.
    assert!(
        dig(&a2, &format!("{site_b}.2"), &qname, "A").is_err(),
        "A2's dig without its agent"
    );
    let (code, out, err) = run_tapproof_in(
        &a2.prefix(),
        EXE,
        &["capture", "remove", "--reason", "test teardown"],
    );
    assert_eq!(code, 0, "A2: {out}{err}");
    let rules = a2.command(&["ip", "rule", "show"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("lookup 15006"),
        "capture remove took A2's policy route: {}",
        String::from_utf8_lossy(&rules.stdout)
    );
    // Without tapproof on A2, its UDP is an ordinary routed flow: GA1 carries it.
    assert_eq!(
        dig(&a2, &format!("{site_b}.2"), &qname, "A").as_deref(),
        Ok("10.9.8.7"),
        "A2's dig through GA1\n{}\nGA1 metrics:\n{}\nA2 nft: {:?}",
        logs(),
        metrics(&ga1),
        a2.command(&["nft", "list", "ruleset"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    );
    assert_eq!(
        metric_value(
            &metrics(&ga1),
            "tapproof_udp_flows_total",
            &["side=\"outbound\"", "result=\"opened\""]
        ),
        1.0,
        "GA1 carried A2's UDP once A2's rules were gone"
    );

    // 2. Planned restart: SIGTERM to GA1 while B1 downloads 4 MiB through it at 1 MB/s. The
    //    download finishes whole, no new connection fails meanwhile (they go to GA2), and GA1
    //    exits 0 once the download is done.
    let mut download = b1
        .command(&[
            "curl",
            "-s",
            "--limit-rate",
            "1000k",
            "--max-time",
            "30",
            "-o",
            "-",
            &format!("http://{site_a}.2:8080/big.bin"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    ga1_agent.signal(nix::sys::signal::Signal::SIGTERM);
    let mut failed = 0;
    for _ in 0..20 {
        if !fetch(&b1, &small, "3") {
            failed += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(failed, 0, "new connections failed while GA1 drained\n{}", logs());
    let mut body = Vec::new();
    std::io::Read::read_to_end(download.stdout.as_mut().unwrap(), &mut body).unwrap();
    assert!(download.wait().unwrap().success());
    assert!(
        body == big,
        "the download through the draining GA1 came back with {} of {} bytes\n{}",
        body.len(),
        big.len(),
        logs()
    );
    let status = ga1_agent.wait(Duration::from_secs(20));
    assert!(status.success(), "GA1 after draining: {status}\n{}", logs());
    assert!(carried(&ga2) >= 20.0, "GA2 took the new connections\n{}", logs());

    // 3. GA1 back; GA2 (which GB now uses) killed outright: its kernel resets the tunnel.
    ga1_agent = start(&ga1, "gw-a1", &ga1_config);
    assert!(fetch(&b1, &small, "5"));
    let before = carried(&ga1);
    ga2_agent.signal(nix::sys::signal::Signal::SIGKILL);
    let took = until_a_fetch_succeeds(&b1, &small, Duration::from_secs(15));
    eprintln!("GA2 killed: new connections succeeded again after {took:?}");
    assert!(
        took.is_some_and(|d| d <= Duration::from_secs(5)),
        "after GA2 was killed, new connections succeeded again after {took:?}\n{}",
        logs()
    );
    assert!(carried(&ga1) > before, "GA1 took over\n{}", logs());
    let _ = ga2_agent.wait(Duration::from_secs(5));

    // 4. GA2 back; GA1 (in use) goes silent: its interconnect port stops passing packets, so GB
    //    hears neither FIN nor RST and notices only by its unanswered PING.
    ga2_agent = start(&ga2, "gw-a2", &ga2_config);
    assert!(fetch(&b1, &small, "5"));
    let before = carried(&ga2);
    ga1.exec_ok(&["ip", "link", "set", &name("hxg1"), "down"]);
    let took = until_a_fetch_succeeds(&b1, &small, Duration::from_secs(20));
    eprintln!("GA1 silent: new connections succeeded again after {took:?}");
    assert!(
        took.is_some_and(|d| d <= Duration::from_secs(5)),
        "after GA1 went silent, new connections succeeded again after {took:?}\n{}",
        logs()
    );
    assert!(carried(&ga2) > before, "GA2 took over\n{}", logs());
    assert!(
        metric_value(
            &metrics(&gb),
            "tapproof_tunnel_errors_total",
            &["reason=\"ping_timeout\""]
        ) >= 1.0,
        "GB counted the unanswered PING\n{}",
        logs()
    );

    drop((ga1_agent, ga2_agent, gb_agent));
    for g in [&ga1, &ga2, &gb] {
        let (code, out, err) = run_tapproof_in(
            &g.prefix(),
            EXE,
            &["capture", "remove", "--reason", "test teardown"],
        );
        assert_eq!(code, 0, "{}: {out}{err}", g.name);
    }
}

/// The admin API of the agent in `ns` (default admin address), as JSON.
fn status(ns: &Netns) -> serde_json::Value {
    serde_json::from_str(&ns.exec_ok(&["curl", "-s", "http://127.0.0.1:15000/v1/status"])).unwrap()
}

/// Gateways whose identities come from the control plane (30 s leaves; the server runs on GB's
/// interconnect address, GA reaches it across the interconnect). Web servers on A1 and B1; new
/// connections alternate A1 -> B1 and B1 -> A1 every 100 ms while the gateways' certificates
/// rotate, then while the root rolls over (prepare, activate, retire), and one rate-limited
/// download outlives the certificates its tunnel was made with: no connection fails, the download
/// arrives whole, and both gateways make new tunnels under the rotated certificates and, at the
/// end, under the new root alone.
#[test]
fn gateway_tunnels_follow_rotation_and_a_root_rollover_without_a_failed_connection() {
    if !can_run() {
        return;
    }
    let Line {
        a1,
        ga,
        gb,
        b1,
        site_a,
        site_b,
        ga_ip,
        gb_ip,
        ..
    } = line("r");
    let pki = TestPki::new();
    let td = "example.org";
    let docroot = pki.path().join("www");
    std::fs::create_dir_all(&docroot).unwrap();
    std::fs::write(docroot.join("small.txt"), "small").unwrap();
    // 12 MiB at 256 KiB/s: ~48 s, longer than a 30 s certificate.
    let big: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(docroot.join("big.bin"), &big).unwrap();
    let _web_b = web_server(&b1, &docroot);
    let _web_a = web_server(&a1, &docroot);

    let data = init(EXE, pki.path(), td);
    let data_s = data.to_str().unwrap().to_owned();
    let server = ServerProcess::start_in(
        &gb.prefix(),
        EXE,
        &data,
        &format!("{gb_ip}:15443"),
        "30s",
        None,
        &[],
    );
    let gateway =
        |me: &str, token: &str, listen: &str, local: &str, remote: &str, peer: &str, peer_name: &str| {
            format!(
                "trust_domain = \"{td}\"\n{}[tunnel]\nlisten = \"{listen}:15008\"\n{}",
                control_section(&pki.path().join(format!("{me}-data")), token),
                gateway_section(
                    &[&format!("{local}.0/24")],
                    "other",
                    &[&format!("{remote}.0/24")],
                    &[&format!("{peer}:15008")],
                    &format!("spiffe://{td}/node/{peer_name}"),
                )
            )
        };
    let ga_token = server.token(EXE, "gw-a", &[], "5m");
    let gb_token = server.token(EXE, "gw-b", &[], "5m");
    let ga_agent = AgentProcess::start_with(
        EXE,
        pki.path(),
        "gw-a",
        &gateway("gw-a", &ga_token, &ga_ip, &site_a, &site_b, &gb_ip, "gw-b"),
        &ga.prefix(),
    );
    let gb_agent = AgentProcess::start_with(
        EXE,
        pki.path(),
        "gw-b",
        &gateway("gw-b", &gb_token, &gb_ip, &site_b, &site_a, &ga_ip, "gw-a"),
        &gb.prefix(),
    );
    let to_b = format!("http://{site_b}.2:8080/small.txt");
    let to_a = format!("http://{site_a}.2:8080/small.txt");
    for (from, url) in [(&a1, &to_b), (&b1, &to_a)] {
        assert!(
            until_a_fetch_succeeds(from, url, Duration::from_secs(30)).is_some(),
            "{url} through the joined gateways\nGA: {}\nGB: {}",
            ga_agent.log(),
            gb_agent.log()
        );
    }
    let counter = |ns: &Netns, name: &str, labels: &[&str]| metric_value(&metrics(ns), name, labels);
    let outbound = ["side=\"outbound\""];
    let renewals = |ns: &Netns| counter(ns, "tapproof_renewals_total", &[]);
    let roots = |ns: &Netns| status(ns)["certificate"]["bundle_roots"].as_u64().unwrap_or(0);
    let rotate =
        |step: &str| run_tapproof_in(&[], EXE, &["server", "ca", "rotate", step, "--data-dir", &data_s]);

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ok, failed) = (
        std::sync::atomic::AtomicU64::new(0),
        std::sync::Mutex::new(Vec::new()),
    );
    let fetched = pki.path().join("big.fetched");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let started = std::time::Instant::now();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (from, url) = if i % 2 == 0 { (&a1, &to_b) } else { (&b1, &to_a) };
                if fetch(from, url, "3") {
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    failed
                        .lock()
                        .unwrap()
                        .push(format!("{url} at {:?}", started.elapsed()));
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let download = scope.spawn(|| {
            a1.command(&[
                "curl",
                "-s",
                "-S",
                "--limit-rate",
                "256k",
                "--max-time",
                "180",
                "-o",
                fetched.to_str().unwrap(),
                &format!("http://{site_b}.2:8080/big.bin"),
            ])
            .output()
            .unwrap()
        });

        // 1. Rotations: two renewals on each side, and GA dials a new tunnel once the
        //    certificates of its first one expired (the download stays on the old one).
        let (ga_dials, gb_dials) = (
            counter(&ga, "tapproof_handshakes_total", &outbound),
            counter(&gb, "tapproof_handshakes_total", &outbound),
        );
        let (ga_renewed, gb_renewed) = (renewals(&ga), renewals(&gb));
        wait_until("two renewals on each gateway", Duration::from_secs(90), || {
            renewals(&ga) >= ga_renewed + 2.0 && renewals(&gb) >= gb_renewed + 2.0
        });
        wait_until(
            "both gateways to dial new tunnels with rotated certificates",
            Duration::from_secs(40),
            || {
                counter(&ga, "tapproof_handshakes_total", &outbound) > ga_dials
                    && counter(&gb, "tapproof_handshakes_total", &outbound) > gb_dials
            },
        );

        // 2. Root rollover through the interconnect.
        let (code, out, err) = rotate("prepare");
        assert_eq!(code, 0, "{out}{err}");
        wait_until(
            "the new root in both gateways' bundles",
            Duration::from_secs(30),
            || roots(&ga) == 2 && roots(&gb) == 2,
        );
        let (code, out, err) = rotate("activate");
        assert_eq!(code, 0, "{out}{err}");
        let (ga_renewed, gb_renewed) = (renewals(&ga), renewals(&gb));
        wait_until(
            "a renewal under the new root on each gateway",
            Duration::from_secs(40),
            || renewals(&ga) > ga_renewed && renewals(&gb) > gb_renewed,
        );
        wait_until(
            "the old root's certificates to expire",
            Duration::from_secs(60),
            || {
                let (code, out, err) = rotate("retire");
                assert!(code == 0 || err.contains("still valid"), "{out}{err}");
                code == 0
            },
        );
        wait_until(
            "the old root out of both bundles",
            Duration::from_secs(30),
            || roots(&ga) == 1 && roots(&gb) == 1,
        );
        let (ga_dials, gb_dials) = (
            counter(&ga, "tapproof_handshakes_total", &outbound),
            counter(&gb, "tapproof_handshakes_total", &outbound),
        );
        wait_until(
            "new tunnels under the new root alone",
            Duration::from_secs(40),
            || {
                counter(&ga, "tapproof_handshakes_total", &outbound) > ga_dials
                    && counter(&gb, "tapproof_handshakes_total", &outbound) > gb_dials
            },
        );
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let out = download.join().unwrap();
        assert!(
            out.status.success(),
            "the download across the rotations: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let failed = failed.into_inner().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed across rotations and the rollover: {failed:?}\nGA: {}\nGB: {}",
        failed.len(),
        failed.len() as u64 + ok.load(std::sync::atomic::Ordering::Relaxed),
        ga_agent.log(),
        gb_agent.log()
    );
    assert!(ok.load(std::sync::atomic::Ordering::Relaxed) > 100);
    let got = std::fs::read(&fetched).unwrap();
    assert!(
        got == big,
        "the download arrived whole ({} of {} bytes)",
        got.len(),
        big.len()
    );
    let (_, log, _) = run_tapproof_in(&[], EXE, &["server", "audit-log", "show", "--data-dir", &data_s]);
    assert!(log.contains("ca.activate") && log.contains("ca.retire"), "{log}");
}

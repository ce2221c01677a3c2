//! The coverage audit on two "hosts" (network namespaces joined by a veth): one plaintext link
//! (a plain TCP client and server) and one through tapproof. The audit flags exactly the
//! plaintext one and exits 1; once that traffic goes through tapproof it reports 100% and exits 0.
//! Plus the probe against real listeners, the allow-list, and bad input.
//!
//! The namespace test needs root; under CI (CI=true) it runs and fails loudly, elsewhere it says
//! it was skipped.

use serde_json::Value;
use std::os::unix::fs::symlink;
use std::path::Path;
use tapproof_test_util::netns::{spawn_ready, Netns, TwoHosts};
use tapproof_test_util::pki::TestPki;
use tapproof_test_util::process::{identity_section, run_tapproof, AgentProcess};

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");

fn can_run() -> bool {
    tapproof_test_util::root_with("audit namespace test", &[("ip", "-V")])
}

/// Runs `tapproof audit` in `ns` with `args`; returns the exit code and the parsed JSON report.
fn audit(ns: &Netns, args: &[&str]) -> (i32, Value, String) {
    let mut cmd = ns.command(&[EXE, "audit", "--json"]);
    cmd.args(args);
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "audit printed no JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report, text)
}

fn links_of<'a>(report: &'a Value, class: &str) -> Vec<&'a Value> {
    report["links"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["class"] == class)
        .collect()
}

/// The bench tools binary under another name (plain apps, whatever they are called).
fn alias(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    symlink(tapproof_test_util::bench_exe(EXE), &path).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn the_audit_flags_exactly_the_plaintext_link_until_it_goes_through_tapproof() {
    if !can_run() {
        return;
    }
    let hosts = TwoHosts::new("aud");
    let pki = TestPki::new();
    let (db_id, web_id) = (pki.node("db-1"), pki.node("web-1"));
    let td = &pki.td;
    let plain_echo = alias(pki.path(), "plain-echo");
    let plain_client = alias(pki.path(), "plain-client");

    // Host B: a plain service listening on the fibre (and on loopback), fronted by agent db-1.
    let (_service, _) = spawn_ready(
        &hosts.b,
        &[&plain_echo, "echo-server", "--listen", "0.0.0.0:7000"],
        "listening",
    );
    let db_config = format!(
        "trust_domain = \"{td}\"\n{}[admin]\nlisten = \"127.0.0.1:15000\"\n[tunnel]\nlisten = \"{}:15008\"\n\
         [[inbound]]\nservice = \"svc\"\nforward = \"127.0.0.1:7000\"\nallow = [\"spiffe://{td}/node/web-1\"]\n",
        identity_section(&db_id),
        hosts.b_ip
    );
    let _db = AgentProcess::start_with(EXE, pki.path(), "db-1", &db_config, &hosts.b.prefix());
    // Host A: agent web-1 with an outbound to svc.
    let web_config = format!(
        "trust_domain = \"{td}\"\n{}[admin]\nlisten = \"127.0.0.1:15000\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:17000\"\nservice = \"svc\"\npeers = [\"{}:15008\"]\nserver_id = \"spiffe://{td}/node/db-1\"\n",
        identity_section(&web_id),
        hosts.b_ip
    );
    let web = AgentProcess::start_with(EXE, pki.path(), "web-1", &web_config, &hosts.a.prefix());
    let web_toml = pki.path().join("web-1.toml");
    std::fs::write(&web_toml, &web_config).unwrap();

    // Two app connections from A: one straight across the fibre, one through tapproof.
    let direct = format!("{}:7000", hosts.b_ip);
    let (plain_link, _) = spawn_ready(&hosts.a, &[&plain_client, "hold", "--connect", &direct], "held");
    let (_tunneled, _) = spawn_ready(
        &hosts.a,
        &[&plain_client, "hold", "--connect", "127.0.0.1:17000"],
        "held",
    );

    // On A: exactly one plaintext link, to B's port 7000, owned by plain-client; the tunnel is
    // tapproof's. Exit code 1.
    let web_toml_arg = web_toml.to_str().unwrap();
    let (code, report, _) = audit(&hosts.a, &["--config", web_toml_arg]);
    assert_eq!(code, 1, "a plaintext link must fail the audit: {report:#}");
    let plain = links_of(&report, "plaintext");
    assert_eq!(plain.len(), 1, "{report:#}");
    assert_eq!(plain[0]["remote"], direct.as_str());
    assert_eq!(plain[0]["process"], "plain-client");
    assert_eq!(plain[0]["role"], "client");
    let tunnels = links_of(&report, "tapproof");
    assert_eq!(tunnels.len(), 1, "{report:#}");
    assert_eq!(tunnels[0]["remote"], format!("{}:15008", hosts.b_ip).as_str());
    assert_eq!(report["summary"]["coverage_percent"], 50.0);

    // On B: the same link seen from the server side, and the plain listener on the fibre.
    let (code, report_b, _) = audit(&hosts.b, &[]);
    assert_eq!(code, 1, "{report_b:#}");
    let plain = links_of(&report_b, "plaintext");
    assert_eq!(plain.len(), 1, "{report_b:#}");
    assert_eq!(plain[0]["local"], direct.as_str());
    assert_eq!(
        (plain[0]["role"].as_str(), plain[0]["process"].as_str()),
        (Some("server"), Some("plain-echo"))
    );
    assert!(
        report_b["exposed_listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["local"] == "0.0.0.0:7000" && l["process"] == "plain-echo"),
        "{report_b:#}"
    );

    // --probe tells what the plaintext peer answered to a ClientHello (the echo server sends it
    // straight back, which is not a TLS server's answer).
    let (code, probed, _) = audit(
        &hosts.a,
        &["--config", web_toml_arg, "--probe", "--probe-timeout", "2s"],
    );
    assert_eq!(code, 1);
    let detail = links_of(&probed, "plaintext")[0]["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        detail.contains("without TLS") || detail.contains("no TLS answer"),
        "{detail}"
    );

    // An accepted exception: the link is reported with its reason and no longer fails the gate.
    let excepted = pki.path().join("excepted.toml");
    std::fs::write(
        &excepted,
        format!("{web_config}[[audit.allow]]\nport = 7000\nprocess = \"plain-client\"\nreason = \"legacy batch feed, retired in Q1\"\n"),
    )
    .unwrap();
    let (code, report, _) = audit(&hosts.a, &["--config", excepted.to_str().unwrap()]);
    assert_eq!(code, 0, "{report:#}");
    let allowed = links_of(&report, "allowed");
    assert_eq!(allowed.len(), 1);
    assert!(allowed[0]["detail"]
        .as_str()
        .unwrap()
        .contains("legacy batch feed"));
    let table = hosts
        .a
        .exec_ok(&[EXE, "audit", "--config", excepted.to_str().unwrap()]);
    assert!(table.contains("legacy batch feed, retired in Q1"), "{table}");

    // Move the traffic through tapproof: 100%, exit 0.
    drop(plain_link);
    let (_moved, _) = spawn_ready(
        &hosts.a,
        &[&plain_client, "hold", "--connect", "127.0.0.1:17000"],
        "held",
    );
    let (code, report, _) = audit(&hosts.a, &["--config", web_toml_arg]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["summary"]["coverage_percent"], 100.0);
    assert!(links_of(&report, "plaintext").is_empty(), "{report:#}");
    let out = hosts.a.command(&[EXE, "audit"]).output().unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("100.0% of"),
        "{out:?}"
    );

    // Without the agent's word nothing is tapproof: asked at an address where no agent listens,
    // the audit counts the tunnel as plaintext and says why in "not seen".
    let (code, report, _) = audit(&hosts.a, &["--config", web_toml_arg, "--agent", "127.0.0.1:1"]);
    assert_eq!(code, 1, "{report:#}");
    assert!(links_of(&report, "tapproof").is_empty(), "{report:#}");
    assert!(
        report["not_seen"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("no tapproof agent vouched")),
        "{report:#}"
    );

    // A plaintext echo server that is called `tapproof` (a copy of a binary under that name),
    // serving a client across the fibre: plaintext on both hosts, exit 1. Only the agent's own
    // list of its sockets makes a link tapproof's, never a process name.
    let impostor = pki.path().join("impostor");
    std::fs::create_dir_all(&impostor).unwrap();
    let impostor = impostor.join("tapproof");
    std::fs::copy(tapproof_test_util::bench_exe(EXE), &impostor).unwrap();
    let (_impostor, _) = spawn_ready(
        &hosts.b,
        &[
            impostor.to_str().unwrap(),
            "echo-server",
            "--listen",
            "0.0.0.0:7001",
        ],
        "listening",
    );
    let to_impostor = format!("{}:7001", hosts.b_ip);
    let (_fooled, _) = spawn_ready(
        &hosts.a,
        &[&plain_client, "hold", "--connect", &to_impostor],
        "held",
    );
    let (code, report_b, _) = audit(&hosts.b, &[]);
    assert_eq!(code, 1, "{report_b:#}");
    let fooled: Vec<_> = links_of(&report_b, "plaintext")
        .into_iter()
        .filter(|l| l["local"] == to_impostor.as_str())
        .collect();
    assert_eq!(fooled.len(), 1, "{report_b:#}");
    assert_eq!(fooled[0]["process"], "tapproof");
    assert!(
        links_of(&report_b, "tapproof")
            .iter()
            .all(|l| l["local"] == format!("{}:15008", hosts.b_ip).as_str()),
        "only the agent's tunnel is tapproof's: {report_b:#}"
    );
    let (code, report, _) = audit(&hosts.a, &["--config", web_toml_arg]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(links_of(&report, "plaintext")[0]["remote"], to_impostor.as_str());
    drop(web);
}

/// The probe against real listeners on loopback: a tapproof tunnel (TLS 1.3, post-quantum group,
/// client certificate required), a plain HTTP-ish answer, and a listener that never answers.
#[test]
fn the_probe_tells_tls_from_plaintext_and_gives_up_on_silence() {
    use std::time::Duration;
    use tapproof_tls::probe::{probe, ProbeOutcome};
    let pki = TestPki::new();
    let id = pki.node("db-1");
    let td = &pki.td;
    let agent = AgentProcess::start(
        EXE,
        pki.path(),
        "db-1",
        &format!(
            "trust_domain = \"{td}\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n[tunnel]\nlisten = \"127.0.0.1:0\"\n\
             [[inbound]]\nservice = \"svc\"\nforward = \"127.0.0.1:9\"\nallow = [\"spiffe://{td}/node/web-1\"]\n",
            identity_section(&id)
        ),
    );
    match probe(agent.tunnel(), Duration::from_secs(3)) {
        ProbeOutcome::Tls(t) => {
            assert_eq!(t.version, "TLS 1.3");
            assert_eq!(t.group, "X25519MLKEM768");
            assert!(t.client_cert_required, "{t:?}");
            assert!(
                t.subject.unwrap_or_default().contains("spiffe://"),
                "the SVID's URI names it"
            );
            assert!(t.not_after.is_some());
        }
        other => panic!("a tapproof tunnel is TLS: {other:?}"),
    }

    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let plain_addr = plain.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut s, _)) = plain.accept() {
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    match probe(plain_addr, Duration::from_secs(3)) {
        ProbeOutcome::NotTls { answer } => assert!(answer.contains("HTTP/1.1 400"), "{answer}"),
        other => panic!("plain HTTP is not TLS: {other:?}"),
    }

    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let started = std::time::Instant::now();
    match probe(silent.local_addr().unwrap(), Duration::from_millis(500)) {
        ProbeOutcome::NoAnswer { .. } => {}
        other => panic!("a silent listener gives no answer: {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the probe must give up on its timeout"
    );
    drop(silent);
}

#[test]
fn a_malformed_allow_list_is_a_config_error_naming_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let id = pki.node("web-1");
    let base = format!("trust_domain = \"{}\"\n{}", pki.td, identity_section(&id));
    for (rule, expect) in [
        ("peer = \"10.0.0.0/33\"\nreason = \"x\"", "audit.allow[0]"),
        ("port = 80\nreason = \"\"", "reason is empty"),
        (
            "reason = \"everything\"",
            "give at least one of peer, port, process",
        ),
        ("port = 80\nreason = \"x\"\nhost = \"a\"", "unknown field"),
    ] {
        let path = dir.path().join("a.toml");
        std::fs::write(&path, format!("{base}[[audit.allow]]\n{rule}\n")).unwrap();
        let (code, out, err) = run_tapproof(EXE, &["audit", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{rule}: {out}{err}");
        assert!(err.contains(expect), "{rule}: {err}");
    }
}

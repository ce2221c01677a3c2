//! The fleet dashboard in a real headless browser (Debian's chromium through chromedriver): a
//! server, two agents that join and report their coverage, an admin identity, and
//! `tapproof server dashboard` serving the pages on loopback. The page must show the nodes and the
//! coverage figure the API reports; a screenshot is saved to target/test-artifacts/dashboard.png.
//! Also: only admins read the dashboard, and a revoked node's report is refused.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tapproof_test_util::in_ci;
use tapproof_test_util::netns::Background;
use tapproof_test_util::process::{run_tapproof, AgentProcess};
use tapproof_test_util::server::{control_request, control_section, init, ServerProcess};
use tapproof_test_util::webdriver::{self, Browser};
use tapproof_tls::ServerTrust;

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");
const TD: &str = "example.org";

fn agent_config(dir: &std::path::Path, token: &str) -> String {
    format!(
        "trust_domain = \"{TD}\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n[audit]\nreport_interval_secs = 2\n",
        control_section(dir, token)
    )
}

#[test]
fn the_dashboard_shows_the_nodes_and_coverage_the_api_reports() {
    let Some((chromium, chromedriver)) = webdriver::find() else {
        assert!(
            !in_ci(),
            "the dashboard test must run under CI: install chromium and chromium-driver"
        );
        eprintln!("SKIPPED dashboard test: chromium and chromedriver are not installed");
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("tapproof-dash-")
        .tempdir()
        .unwrap();
    let data = init(EXE, dir.path(), TD);
    let server = ServerProcess::start(EXE, &data, "127.0.0.1:0", "1h");
    let mut agents = Vec::new();
    for node in ["db-1", "web-1"] {
        let token = server.token(EXE, node, &[], "5m");
        agents.push(AgentProcess::start(
            EXE,
            dir.path(),
            node,
            &agent_config(&dir.path().join(node), &token),
        ));
    }
    let admin_dir = dir.path().join("admin");
    server.admin_cert(EXE, "ops", &admin_dir);
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let bundle = vec![read(&admin_dir.join("bundle.pem"))];
    let admin = (
        read(&admin_dir.join("admin.pem")),
        read(&admin_dir.join("admin.key")),
    );
    let api = |path: &str| {
        control_request(
            server.addr,
            ServerTrust::Bundle(bundle.clone()),
            Some((&admin.0, &admin.1)),
            "GET",
            path,
            vec![],
        )
    };

    // Both agents report within a few seconds of joining.
    let deadline = Instant::now() + Duration::from_secs(30);
    let data_now = loop {
        let (status, v) = api("/v1/dashboard");
        assert_eq!(status, 200, "{v}");
        if v["fleet"]["nodes_reporting"] == 2 {
            break v;
        }
        assert!(Instant::now() < deadline, "agents did not report: {v}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(data_now["fleet"]["nodes"], 2);
    assert!(!data_now["history"].as_array().unwrap().is_empty());

    // The proxy serves the pages on loopback with the admin identity.
    let mut proxy = Command::new(EXE)
        .args([
            "server",
            "dashboard",
            "--server",
            &server.addr.to_string(),
            "--admin-dir",
            admin_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(proxy.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _proxy = Background(proxy);
    let url = line
        .trim()
        .strip_prefix("dashboard: ")
        .unwrap_or_else(|| panic!("no URL: {line:?}"))
        .to_owned();

    // A page of another site whose name was rebound to 127.0.0.1 sends its own Host: refused.
    let proxy_addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/dashboard")
        .to_owned();
    for (host, expected) in [
        (
            format!("rebound.example:{}", proxy_addr.rsplit(':').next().unwrap()),
            "421",
        ),
        (proxy_addr.clone(), "200"),
    ] {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(&proxy_addr).unwrap();
        write!(
            tcp,
            "GET /v1/dashboard HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        let status = answer.split_whitespace().nth(1).unwrap_or("");
        assert_eq!(status, expected, "Host {host}: {answer}");
    }

    let browser = Browser::start(&chromium, &chromedriver);
    browser.open(&url);
    let shown = browser.wait_for(
        "return document.body.dataset.loaded === 'true' ? {
            coverage: document.getElementById('coverage').textContent,
            nodes: document.querySelector('#nodes tbody').innerText,
            reporting: document.getElementById('nodes-reporting').textContent,
            ca: document.querySelector('#ca tbody').innerText,
            alarm: document.getElementById('selftest-alarm').hidden,
            title: document.title
         } : null;",
        Duration::from_secs(30),
    );
    // Compare with what the API says now (reports keep arriving; the figure is per report).
    let (_, now) = api("/v1/dashboard");
    let expected: Vec<String> = [&data_now, &now]
        .iter()
        .map(|v| {
            let f = &v["fleet"];
            if f["links"].as_u64().unwrap() == 0 {
                // 100% of nothing is not shown as coverage.
                "no links seen yet".to_owned()
            } else {
                format!("{:.1}%", f["coverage_percent"].as_f64().unwrap())
            }
        })
        .collect();
    let coverage = shown["coverage"].as_str().unwrap();
    assert!(
        expected.iter().any(|e| e == coverage),
        "page shows {coverage}, API {expected:?}"
    );
    let nodes = shown["nodes"].as_str().unwrap();
    for n in now["nodes"].as_array().unwrap() {
        assert!(nodes.contains(n["name"].as_str().unwrap()), "{nodes}");
        assert!(nodes.contains(n["spiffe_id"].as_str().unwrap()), "{nodes}");
    }
    assert_eq!(shown["reporting"], "2 of 2");
    let ca = shown["ca"].as_str().unwrap();
    assert!(
        ca.contains("root") && ca.contains("intermediate") && ca.contains("active"),
        "{ca}"
    );
    assert_eq!(shown["title"], "tapproof fleet");
    assert_eq!(
        shown["alarm"], true,
        "no self-test alarm without an accepted probe"
    );

    let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(artifacts.join("dashboard.png"), &png).unwrap();
    drop(browser);

    // Only admins: a node identity is refused, no identity too.
    let node_dir = dir.path().join("web-1");
    let (chain, key) = (read(&node_dir.join("node.pem")), read(&node_dir.join("node.key")));
    for path in ["/v1/dashboard", "/dashboard"] {
        let (status, v) = control_request(
            server.addr,
            ServerTrust::Bundle(bundle.clone()),
            Some((&chain, &key)),
            "GET",
            path,
            vec![],
        );
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (403, Some("admin_required")),
            "{path}"
        );
        let (status, _) = control_request(
            server.addr,
            ServerTrust::Bundle(bundle.clone()),
            None,
            "GET",
            path,
            vec![],
        );
        assert_eq!(status, 401, "{path}");
    }

    // A malformed report is refused with a clear code; a revoked node's report is refused.
    let post = |body: Vec<u8>| {
        control_request(
            server.addr,
            ServerTrust::Bundle(bundle.clone()),
            Some((&chain, &key)),
            "POST",
            "/v1/coverage",
            body,
        )
    };
    let (status, v) = post(b"{\"report\": 7}".to_vec());
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("bad_json")),
        "{v}"
    );
    let (code, out, err) = run_tapproof(
        EXE,
        &[
            "server",
            "revoke",
            "--data-dir",
            data.to_str().unwrap(),
            "--node",
            "web-1",
            "--reason",
            "test",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let valid = serde_json::json!({
        "report": {
            "host": "h", "generated_at": 1,
            "summary": {"links": 0, "tapproof": 0, "other_tls": 0, "plaintext": 0, "allowed": 0,
                        "coverage_percent": 100.0, "exposed_listeners": 0},
            "links": [], "exposed_listeners": [], "not_seen": [], "exceptions": []
        },
        "denials": []
    });
    // A revocation made with the CLI reaches the running server through its change watch
    // (SQLite: within a second).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (status, v) = loop {
        let (status, v) = post(serde_json::to_vec(&valid).unwrap());
        if status != 204 || std::time::Instant::now() > deadline {
            break (status, v);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("node_revoked")),
        "{v}"
    );
    drop(agents);
}

//! The SPIFFE Workload API with a real client: py-spiffe (PyPI `spiffe`) against a real agent
//! process on a real Unix socket. File identities hand out the node's SVID and bundle, a rotation
//! reaches an open stream, a caller the config does not name gets nothing, a request without the
//! spec's security header is refused (py-spiffe sends the socket path as `:authority`, which h2
//! alone would reset); with the control plane a caller gets the identity of a
//! service registered to the node.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tapproof_test_util::pki::TestPki;
use tapproof_test_util::process::{identity_section, AgentProcess};
use tapproof_test_util::server::{control_section, init, ServerProcess};

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workload/client.py");

/// One run of the client; its one JSON line.
fn client(python: &Path, prefix: &[&str], args: &[&str]) -> Value {
    let mut argv: Vec<&str> = prefix.to_vec();
    let py = python.to_str().unwrap();
    argv.extend([py, CLIENT]);
    argv.extend(args);
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "client {args:?}: {e}: stdout {text} stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn agent_config(identity: &str, socket: &Path, callers: &str) -> String {
    format!(
        "trust_domain = \"example.org\"\n{identity}[admin]\nlisten = \"127.0.0.1:0\"\n\
         [workload_api]\nsocket = \"{}\"\n{callers}",
        socket.display()
    )
}

#[test]
fn a_local_workload_gets_the_node_svid_and_bundle_and_follows_rotation() {
    let Some(python) = tapproof_test_util::python::test_python("the Workload API test") else {
        return;
    };
    let pki = TestPki::new();
    let id = pki.node("db-1");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/workload.sock");
    // A federated trust domain: its bundle goes to workloads too.
    let partner = TestPki::for_domain("partner.org");
    let federation = format!(
        "[[federation]]\ntrust_domain = \"partner.org\"\nbundle = \"{}\"\n",
        partner.bundle().display()
    );
    // No [[workload_api.caller]]: root and the agent's own user (this test's) get the node's.
    let agent = AgentProcess::start(
        EXE,
        dir.path(),
        "db-1",
        &agent_config(&identity_section(&id), &socket, &federation),
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o666);

    let got = client(&python, &[], &["fetch", socket.to_str().unwrap()]);
    assert_eq!(got["svids"].as_array().map(Vec::len), Some(1), "{got}");
    let svid = &got["svids"][0];
    assert_eq!(svid["id"], "spiffe://example.org/node/db-1", "{got}");
    assert_eq!(
        svid["key_matches"], true,
        "the key handed out is the certificate's: {got}"
    );
    assert!(
        svid["chain"].as_u64().unwrap() >= 2,
        "leaf and intermediate: {got}"
    );
    let both = serde_json::json!(["example.org", "partner.org"]);
    assert_eq!(got["trust_domains"], both, "{got}");
    assert_eq!(got["context_trust_domains"], both, "{got}");
    assert!(got["bundle_roots"].as_u64().unwrap() >= 1, "{got}");
    let first_serial = svid["serial"].as_str().unwrap().to_owned();

    // An open stream gets the rotated identity without asking again.
    let mut watch = Command::new(&python)
        .args([CLIENT, "watch", socket.to_str().unwrap(), "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["svids"][0]["serial"], first_serial.as_str(), "{first}");
    pki.node("db-1");
    let rotated = std::sync::mpsc::channel();
    let tx = rotated.0;
    std::thread::spawn(move || {
        let _ = tx.send(lines.next().map(|l| l.unwrap()));
    });
    let line = rotated
        .1
        .recv_timeout(Duration::from_secs(15))
        .unwrap_or_else(|_| panic!("no update within 15 s; agent log:\n{}", agent.log()))
        .expect("the watch client printed a second context");
    let second: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        second["svids"][0]["id"], "spiffe://example.org/node/db-1",
        "{second}"
    );
    assert_ne!(second["svids"][0]["serial"], first_serial.as_str(), "{second}");
    let _ = watch.wait();

    // The spec's guard: no `workload.spiffe.io: true` header, no answer.
    let refused = client(&python, &[], &["noheader", socket.to_str().unwrap()]);
    assert_eq!(refused["status"], "INVALID_ARGUMENT", "{refused}");

    let metrics = agent.metrics();
    assert!(
        agent.metric(
            "tapproof_workload_api_requests_total",
            &["method=\"fetch_x509_svid\"", "result=\"ok\""]
        ) >= 2.0,
        "{metrics}"
    );
    assert_eq!(
        agent.metric(
            "tapproof_workload_api_requests_total",
            &["result=\"no_security_header\""]
        ),
        1.0
    );
    agent.terminate(Duration::from_secs(10));
    assert!(!socket.exists(), "the socket is removed at exit");
}

#[test]
fn a_caller_the_config_does_not_name_gets_nothing() {
    let Some(python) = tapproof_test_util::python::test_python("the Workload API test") else {
        return;
    };
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");
    // Once callers are listed, only they get anything: not this test's user, not even root.
    let other = nix::unistd::geteuid().as_raw().wrapping_add(4242);
    let callers = format!("[[workload_api.caller]]\nuid = {other}\nnode = true\n");
    let agent = AgentProcess::start(
        EXE,
        dir.path(),
        "db-1",
        &agent_config(&identity_section(&pki.node("db-1")), &socket, &callers),
    );
    let got = client(&python, &[], &["fetch", socket.to_str().unwrap()]);
    assert!(
        got["detail"]
            .as_str()
            .unwrap_or("")
            .contains("no identity issued"),
        "{got}"
    );
    assert_eq!(
        agent.metric(
            "tapproof_workload_api_requests_total",
            &["method=\"fetch_x509_svid\"", "result=\"no_identity\""]
        ),
        1.0,
        "{}",
        agent.metrics()
    );
}

#[test]
fn with_the_control_plane_a_caller_gets_its_registered_service_identity() {
    let Some(python) = tapproof_test_util::python::test_python("the Workload API test") else {
        return;
    };
    let dir = tempfile::Builder::new().prefix("tapproof-wl-").tempdir().unwrap();
    let data = init(EXE, dir.path(), "example.org");
    let server = ServerProcess::start_with_args(EXE, &data, "127.0.0.1:0", "1h", None, &[]);
    let token = server.token(EXE, "db-1", &["db"], "5m");
    let socket = dir.path().join("workload.sock");
    let uid = nix::unistd::geteuid().as_raw();
    let callers = format!("[[workload_api.caller]]\nuid = {uid}\nservices = [\"db\", \"web\"]\n");
    let agent = AgentProcess::start(
        EXE,
        dir.path(),
        "db-1",
        &agent_config(
            &control_section(&dir.path().join("db-1"), &token),
            &socket,
            &callers,
        ),
    );
    let got = client(&python, &[], &["fetch", socket.to_str().unwrap()]);
    // Only db: web is named for the caller but not registered to this node; the node's own
    // identity is not given (node = false).
    let ids: Vec<&str> = got["svids"]
        .as_array()
        .unwrap_or_else(|| panic!("{got}; agent log:\n{}", agent.log()))
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["spiffe://example.org/svc/db"], "{got}");
    assert_eq!(got["svids"][0]["key_matches"], true, "{got}");
    assert_eq!(got["trust_domains"], serde_json::json!(["example.org"]), "{got}");
    drop(agent);
    drop(server);
}

//! The OpenAPI document against the live server: schemathesis (PyPI) generates requests from
//! `/v1/openapi.json` (examples from the schemas, boundary values, then random ones, valid and
//! invalid) and sends them over mTLS with an admin identity to a real `tapproof server` on
//! SQLite; every check must pass: no 5xx, every status and content type documented, every body
//! as its schema says, schema-violating requests refused.
//!
//! One check is left out: `positive_data_acceptance` (a request the schema allows must succeed).
//! The schemas cannot say what makes a join token signed by this server, a CSR valid, or a
//! node name, SPIFFE ID or hex serial well-formed (dots, segments, lengths, the trust domain), so
//! such requests are refused with a 400 that names the field, which that check counts as a
//! failure.

use std::process::Command;
use tapproof_test_util::server::{init, ServerProcess};

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");

#[test]
fn schemathesis_finds_nothing_against_a_live_server() {
    let Some(python) = tapproof_test_util::python::test_python("the schemathesis run") else {
        return;
    };
    let schemathesis = python.with_file_name("schemathesis");
    let dir = tempfile::Builder::new().prefix("tapproof-st-").tempdir().unwrap();
    let data = init(EXE, dir.path(), "example.org");
    let server = ServerProcess::start_with_args(EXE, &data, "127.0.0.1:0", "1h", None, &[]);
    let admin = dir.path().join("admin");
    server.admin_cert(EXE, "fuzz", &admin);
    let url = format!("https://{}", server.addr);
    let out = Command::new(&schemathesis)
        .current_dir(dir.path())
        .env("SCHEMATHESIS_HOOKS", "")
        .args(["run", &format!("{url}/v1/openapi.json"), "--url", &url])
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        .args([
            "--max-examples",
            "40",
            "--workers",
            "2",
            "--request-timeout",
            "10",
        ])
        // The server's certificate names spiffe://example.org/server (a URI, no DNS name), which
        // Python's TLS cannot match against a host; the connection is to the loopback server this
        // test started, and the client side is the real mTLS.
        .args(["--tls-verify", "false"])
        .arg("--request-cert")
        .arg(admin.join("admin.pem"))
        .arg("--request-cert-key")
        .arg(admin.join("admin.key"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{text}\nserver log:\n{}",
        server.log()
    );
    // Every operation the document describes was tested (none skipped for want of a schema).
    let bundle = std::fs::read_to_string(admin.join("bundle.pem")).unwrap();
    let trust = tapproof_tls::ServerTrust::Bundle(vec![bundle]);
    let (status, doc) = tapproof_test_util::server::control_request(
        server.addr,
        trust,
        None,
        "GET",
        "/v1/openapi.json",
        Vec::new(),
    );
    assert_eq!(status, 200);
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    // Loaded from the server, schemathesis leaves out the operation that served the document.
    let n = operations - 1;
    assert!(
        text.contains(&format!("Selected: {n}/{n}")) && text.contains(&format!("Tested: {n}")),
        "all {n} operations tested:\n{text}"
    );
}

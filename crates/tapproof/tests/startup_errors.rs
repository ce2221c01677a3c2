//! Bad configuration or identity files: the agent refuses to start, exits 2, and says which key
//! or file is wrong and why.

use tapproof_test_util::fixture::db_config;
use tapproof_test_util::pki::{write_file, TestPki};
use tapproof_test_util::process::run_tapproof;

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");

/// Writes `config`, runs `tapproof agent` on it, expects exit 2 with every `needles` in stderr.
fn refuses(pki: &TestPki, name: &str, config: &str, needles: &[&str]) {
    let path = pki.path().join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let (code, _, stderr) = run_tapproof(EXE, &["agent", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{name}: exit code; stderr: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{name}: stderr lacks {n:?}:\n{stderr}");
    }
    // check-config agrees.
    let (code, _, _) = run_tapproof(EXE, &["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{name}: check-config exit code");
}

#[test]
fn bad_config_and_identity_files_are_named() {
    let pki = TestPki::new();
    let db = pki.node("db-1");
    let forward = "127.0.0.1:9".parse().unwrap();
    let good = db_config(&pki, &db, forward, "");

    // The good one starts (check-config only, so no ports are taken).
    let path = pki.path().join("good.toml");
    std::fs::write(&path, &good).unwrap();
    let (code, stdout, stderr) = run_tapproof(EXE, &["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("spiffe://example.org/node/db-1"));

    refuses(
        &pki,
        "unknown-key",
        &good.replace("[tunnel]\n", "[tunnel]\nlisten_port = 1\n"),
        &["listen_port"],
    );
    refuses(
        &pki,
        "bad-address",
        &good.replace("127.0.0.1:9", "127.0.0.1:99999"),
        &["forward"],
    );
    refuses(
        &pki,
        "missing-file",
        &good.replace("db-1.pem", "nope.pem"),
        &["nope.pem", "No such file"],
    );
    refuses(&pki, "not-a-config", "this is not toml", &["not-a-config.toml"]);
    // An ECDSA identity on the cnsa2 profile, and a profile this build cannot honour.
    refuses(
        &pki,
        "cnsa2-with-ecdsa",
        &good.replace("[tunnel]\n", "[tunnel]\ncrypto_profile = \"cnsa2\"\n"),
        &["does not fit crypto profile cnsa2", "ML-DSA-87"],
    );
    refuses(
        &pki,
        "fips-without-module",
        &good.replace("[tunnel]\n", "[tunnel]\ncrypto_profile = \"fips\"\n"),
        &["tunnel.crypto_profile", "no FIPS module"],
    );

    // Key not matching the certificate.
    let other = pki.node("other");
    refuses(
        &pki,
        "key-mismatch",
        &good.replace(db.key.to_str().unwrap(), other.key.to_str().unwrap()),
        &["does not match", "other.key"],
    );

    // Key readable by others.
    let loose = pki.node_as("db-1", "loose");
    std::fs::set_permissions(&loose.key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    refuses(
        &pki,
        "key-mode",
        &good
            .replace(db.key.to_str().unwrap(), loose.key.to_str().unwrap())
            .replace(db.cert.to_str().unwrap(), loose.cert.to_str().unwrap()),
        &["chmod 600", "loose.key"],
    );

    let swap = |id: &tapproof_test_util::pki::IdentityPaths| {
        good.replace(db.key.to_str().unwrap(), id.key.to_str().unwrap())
            .replace(db.cert.to_str().unwrap(), id.cert.to_str().unwrap())
    };
    refuses(
        &pki,
        "expired",
        &swap(&pki.expired("db-1")),
        &["expired", "db-1-expired.pem"],
    );
    // What every handshake would refuse, check-config refuses first (the one check in
    // tapproof-tls's Material).
    refuses(
        &pki,
        "server-auth-only",
        &swap(&pki.server_auth_only("db-1")),
        &["lacks clientAuth", "db-1-serverauth.pem"],
    );
    refuses(
        &pki,
        "no-spiffe-id",
        &swap(&pki.without_spiffe_id("db-1")),
        &["no URI SAN", "db-1-nospiffe.pem"],
    );
    refuses(
        &pki,
        "foreign-domain",
        &swap(&pki.foreign_domain("db-1")),
        &[
            "spiffe://evil.example/node/db-1",
            "not in trust domain example.org",
        ],
    );

    // An empty bundle, and a bundle of another CA.
    let empty = pki.path().join("empty-bundle.pem");
    write_file(&empty, "", 0o644);
    refuses(
        &pki,
        "empty-bundle",
        &good.replace(pki.bundle().to_str().unwrap(), empty.to_str().unwrap()),
        &["empty-bundle.pem", "no PEM certificate"],
    );
    let stranger = TestPki::new();
    refuses(
        &pki,
        "wrong-bundle",
        &good.replace(
            pki.bundle().to_str().unwrap(),
            stranger.bundle().to_str().unwrap(),
        ),
        &["does not chain"],
    );
}

#[test]
fn help_and_completions_work() {
    let (code, stdout, _) = run_tapproof(EXE, &["--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("quickstart") && stdout.contains("Exit codes"));
    let (code, stdout, _) = run_tapproof(EXE, &["completions", "bash"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("tapproof"));
    let (code, _, stderr) = run_tapproof(EXE, &["agent"]);
    assert_eq!(code, 2, "missing --config is a usage error: {stderr}");
}

#[test]
fn quickstart_runs_end_to_end() {
    let (code, stdout, stderr) = run_tapproof(EXE, &["quickstart", "--connections", "20"]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("X25519MLKEM768"), "{stdout}");
    assert!(stdout.contains("TLSv1.3"), "{stdout}");
    assert!(stdout.contains("Agents joined"), "{stdout}");
    assert!(
        stdout.contains("Both renewed") && stdout.contains(", 0 failed."),
        "{stdout}"
    );
    assert!(stdout.contains("hash chain verified"), "{stdout}");
}

/// The product binary lists only what an operator runs: the echo server, relay and load
/// generators live in `tapproof-bench`, and no subcommand runs a command given to it.
#[test]
fn the_product_binary_carries_no_test_tools() {
    let (code, help, _) = run_tapproof(EXE, &["--help"]);
    assert_eq!(code, 0);
    for operator in ["agent", "server", "audit", "status", "quickstart"] {
        assert!(help.contains(operator), "--help lacks {operator}: {help}");
    }
    for tool in [
        "dev",
        "echo-server",
        "relay",
        "sign-load",
        "feed-load",
        "handshakes",
    ] {
        let (code, _, err) = run_tapproof(EXE, &[tool, "--help"]);
        assert_eq!(code, 2, "`tapproof {tool}` must not exist: {err}");
        assert!(err.contains("unrecognized subcommand"), "{tool}: {err}");
    }
}

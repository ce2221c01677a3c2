//! Helpers for tapproof's integration tests: certificates minted at run time, `tapproof agent`
//! processes started and waited on through their ready file (never a sleep), raw TLS and HTTP/2
//! clients for the refusal cases, loopback echo services, network namespaces with veth links,
//! a small pcap reader for tap tests, and a WebDriver client for the dashboard test.

pub mod fixture;
pub mod h2_raw;
pub mod netns;
pub mod pcap;
pub mod pki;
pub mod process;
pub mod promtool;
pub mod python;
pub mod server;
pub mod tls_client;
pub mod traffic;
pub mod webdriver;

/// Whether this run must not skip root-only tests (CI sets CI=true).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether the tests run as root (needed for network namespaces and packet captures).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Whether `test` can run here: root and each of `tools` (a program, and an argument it answers,
/// e.g. `("nft", "--version")`). When not, it fails loudly under CI and says it skipped
/// otherwise.
pub fn root_with(test: &str, tools: &[(&str, &str)]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(p, arg)| std::process::Command::new(p).arg(arg).output().is_err())
        .map(|(p, _)| *p)
        .collect();
    if is_root() && missing.is_empty() {
        return true;
    }
    let why = format!("root={} missing={missing:?}", is_root());
    assert!(!in_ci(), "the {test} must run under CI but cannot: {why}");
    eprintln!("SKIPPED {test}: needs root and {tools:?} ({why}); run as root or under CI=true");
    false
}

/// Polls `cond` every 100 ms until it holds; panics naming `what` after `within`.
pub fn wait_until(what: &str, within: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The `tapproof-bench` binary beside `tapproof_exe` (the test's `CARGO_BIN_EXE_tapproof`): the
/// echo server and clients the namespace tests run, which the product binary does not carry.
/// `cargo test --workspace` builds it (its own crate has an integration test).
pub fn bench_exe(tapproof_exe: &str) -> String {
    let path = std::path::Path::new(tapproof_exe).with_file_name("tapproof-bench");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` or build it with `cargo build -p tapproof-bench`",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

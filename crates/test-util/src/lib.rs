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

//! `promtool check metrics` (Debian package `prometheus`) on an exposition: the check Prometheus
//! itself applies (HELP on every family, names, types, units). Skipped with a message where
//! promtool is not installed; under CI it must be (`.ci/run` installs it).

use std::io::Write;
use std::process::{Command, Stdio};

pub fn check_metrics(body: &str) {
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            assert!(!crate::in_ci(), "promtool is required under CI: {e}");
            eprintln!("skipping promtool check metrics: {e} (apt-get install prometheus)");
            return;
        }
    };
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\non:\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

//! The Python that the tests driving real third-party clients use: one with the PyPI packages
//! `spiffe` (the SPIFFE Workload API client) and `schemathesis` (the OpenAPI fuzzer) installed.
//! `TAPPROOF_TEST_PYTHON` names it; otherwise `target/test-venv/bin/python`, which
//! `scripts/test.sh` makes. Without one a test is skipped with a message, except under CI.

use std::path::PathBuf;

/// The test Python, or `None` (after saying so) when there is none outside CI.
pub fn test_python(needed_for: &str) -> Option<PathBuf> {
    let path = std::env::var_os("TAPPROOF_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-venv/bin/python")
        });
    if path.exists() {
        return Some(path);
    }
    assert!(
        !crate::in_ci(),
        "{needed_for} needs {} (scripts/test.sh makes it) or TAPPROOF_TEST_PYTHON",
        path.display()
    );
    eprintln!(
        "skipping {needed_for}: no {} (run scripts/test.sh, or set TAPPROOF_TEST_PYTHON to a python with spiffe and schemathesis)",
        path.display()
    );
    None
}

//! What the audit and the server read from outside: /proc/net/tcp lines (any bytes must parse or
//! be refused, never panic), allow-rule networks, and agents' coverage uploads (JSON from the
//! network).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let _ = tapproof_audit::scan::parse_line(line);
        let _ = tapproof_audit::allow::Network::parse(line.trim());
    }
    if let Ok(upload) = serde_json::from_slice::<tapproof_audit::CoverageUpload>(data) {
        let _ = tapproof_audit::render(&upload.report);
    }
});

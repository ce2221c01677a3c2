//! SPIFFE ID and allow-pattern parsing: never panics; whatever parses prints back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(id) = tapproof_identity::SpiffeId::parse(s) {
            assert_eq!(id.to_string(), s);
        }
        if let Ok(p) = s.parse::<tapproof_agent::policy::AllowPattern>() {
            assert_eq!(p.to_string(), s);
        }
    }
});

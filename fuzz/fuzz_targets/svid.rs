//! X509-SVID inspection of arbitrary DER (peer certificates are bytes from the network).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tapproof_identity::inspect_svid(data);
});

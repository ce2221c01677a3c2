//! Every request document the control plane parses from the network, through the server's own
//! strict parser (size, unknown fields, JSON errors): refused or accepted, never a panic. A
//! policy that parses is also checked the way the server checks it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tapproof_server::fuzzing::parse_documents(data);
});

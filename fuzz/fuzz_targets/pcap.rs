//! The tap test's TLS ServerHello reader on arbitrary bytes (it reads captures of hostile traffic).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tapproof_test_util::pcap::server_hello_group(data);
});

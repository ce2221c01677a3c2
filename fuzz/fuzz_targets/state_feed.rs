//! The state-feed document as the agent reads it: any bytes are refused or read into
//! revocations, directory, policy and bundle, never a panic; what was read holds only usable
//! entries.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_json::from_slice::<tapproof_api::StateResponse>(data) else {
        return;
    };
    let entries = doc.directory.len();
    let view = tapproof_agent::control::read_feed(doc);
    let kept: usize = view.directory.values().map(Vec::len).sum();
    assert!(kept <= entries, "the directory grew while being read");
});

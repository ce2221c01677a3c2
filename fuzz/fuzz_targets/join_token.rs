//! Join tokens (from the operator's paste and from the network in `/v1/join`) and the API's
//! request documents: any text parses or is refused, never panics; a parsed token prints back
//! to the same token.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(token) = tapproof_identity::JoinToken::parse(&text) {
        let again = tapproof_identity::JoinToken::parse(&token.to_string()).expect("a printed token parses");
        assert!(again == token, "a token survives printing and parsing");
    }
    let _ = serde_json::from_slice::<tapproof_api::JoinRequest>(data);
    let _ = serde_json::from_slice::<tapproof_api::SignRequest>(data);
    let _ = serde_json::from_slice::<tapproof_api::RevokeRequest>(data);
    let _ = serde_json::from_slice::<tapproof_api::StateResponse>(data);
    let _ = tapproof_identity::normalize_serial(&text);
});

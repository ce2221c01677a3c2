//! Every request document the control plane parses from the network (its handlers parse with
//! serde_json into these types, refusing unknown fields), the policy's allow patterns, and the
//! addresses an agent announces in the state feed's query: refused or accepted, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fn parse<T: serde::de::DeserializeOwned>(data: &[u8]) {
    let _ = serde_json::from_slice::<T>(data);
}

fuzz_target!(|data: &[u8]| {
    parse::<tapproof_api::JoinRequest>(data);
    parse::<tapproof_api::SignRequest>(data);
    parse::<tapproof_api::RevokeRequest>(data);
    parse::<tapproof_api::RegistrationChange>(data);
    parse::<tapproof_api::Policy>(data);
    parse::<tapproof_audit::CoverageUpload>(data);
    parse::<tapproof_api::NodeEvent>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(a) = tapproof_api::Announced::parse(text) {
            // What parses is written back the same way.
            assert_eq!(
                tapproof_api::Announced::parse(&a.to_query())
                    .map(|b| b.0.len())
                    .ok(),
                Some({
                    let mut q: Vec<String> = a.0.iter().map(|(s, x)| format!("{s}={x}")).collect();
                    q.sort();
                    q.dedup();
                    q.len()
                })
            );
        }
    }
    if let Ok(policy) = serde_json::from_slice::<tapproof_api::Policy>(data) {
        for patterns in policy.services.values() {
            for p in &patterns.allow {
                let _ = p.parse::<tapproof_identity::AllowPattern>();
            }
        }
    }
});

//! Every request document the control plane parses from the network (its handlers parse with
//! serde_json into these types, refusing unknown fields), and the policy's allow patterns:
//! refused or accepted, never a panic.
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
    if let Ok(policy) = serde_json::from_slice::<tapproof_api::Policy>(data) {
        for patterns in policy.services.values() {
            for p in &patterns.allow {
                let _ = p.parse::<tapproof_identity::AllowPattern>();
            }
        }
    }
});

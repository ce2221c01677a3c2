//! The one place the crypto provider is chosen (as linkerd2-proxy does): aws-lc-rs, TLS 1.3
//! suites only, key exchange X25519MLKEM768 first and X25519 next.

use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider, kx_group};
use rustls::crypto::CryptoProvider;
use std::sync::Arc;

/// Name of the post-quantum hybrid group as rustls and Wireshark print it.
pub const POST_QUANTUM_GROUP: &str = "X25519MLKEM768";

/// Which key-exchange groups a peer may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KxPolicy {
    /// X25519MLKEM768, then X25519 for peers without post-quantum support.
    PreferPostQuantum,
    /// X25519MLKEM768 only: a handshake without it fails.
    RequirePostQuantum,
}

pub fn crypto_provider(kx: KxPolicy) -> Arc<CryptoProvider> {
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    provider.kx_groups = match kx {
        KxPolicy::PreferPostQuantum => vec![kx_group::X25519MLKEM768, kx_group::X25519],
        KxPolicy::RequirePostQuantum => vec![kx_group::X25519MLKEM768],
    };
    Arc::new(provider)
}

//! The one place the crypto provider is chosen (as linkerd2-proxy does): aws-lc-rs, TLS 1.3
//! suites only. The default prefers X25519MLKEM768, then X25519; the `cnsa2` profile
//! (`tunnel.crypto_profile`) allows AES-256-GCM, ML-KEM-1024 and ML-DSA-87 signatures only.

use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider, kx_group};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::SignatureScheme;
use std::sync::Arc;

/// Name of the post-quantum hybrid group as rustls and Wireshark print it.
pub const POST_QUANTUM_GROUP: &str = "X25519MLKEM768";

/// Which suites, key-exchange groups and signatures a peer may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptoPolicy {
    /// X25519MLKEM768, then X25519 for peers without post-quantum support (and ML-KEM-1024 for
    /// a `cnsa2` peer); any suite of TLS 1.3; the signatures webpki checks.
    PreferPostQuantum,
    /// The same with X25519MLKEM768 or ML-KEM-1024 only: a handshake without one fails.
    RequirePostQuantum,
    /// CNSA 2.0: TLS_AES_256_GCM_SHA384, ML-KEM-1024 and ML-DSA-87 (every certificate of the
    /// chain and the handshake signature), nothing else; a peer that cannot meet all three is
    /// refused by the handshake, never served something weaker.
    Cnsa2,
}

/// `tunnel.crypto_profile`: the set of algorithms a node uses, and the key it wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CryptoProfile {
    /// Today's: X25519MLKEM768 preferred, ECDSA P-256 keys.
    #[default]
    Default,
    /// CNSA 2.0: AES-256-GCM, ML-KEM-1024, ML-DSA-87 keys and certificates (`CryptoPolicy::Cnsa2`).
    Cnsa2,
    /// The aws-lc-rs FIPS module; this build does not contain it (`CryptoProfile::available`).
    Fips,
}

impl CryptoProfile {
    pub const NAMES: &'static str = "\"default\", \"cnsa2\" or \"fips\"";

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Cnsa2 => "cnsa2",
            Self::Fips => "fips",
        }
    }

    /// Whether this build can honour the profile, and if not why.
    pub fn available(self) -> Result<(), &'static str> {
        match self {
            Self::Default | Self::Cnsa2 => Ok(()),
            Self::Fips => Err("this tapproof build has no FIPS module (aws-lc-rs built without its `fips` feature): it cannot run the fips profile"),
        }
    }

    /// What the TLS configs of this profile allow; `require_post_quantum` drops X25519 from the
    /// default profile (`cnsa2` has only ML-KEM-1024 anyway).
    pub fn policy(self, require_post_quantum: bool) -> CryptoPolicy {
        match self {
            Self::Cnsa2 => CryptoPolicy::Cnsa2,
            _ if require_post_quantum => CryptoPolicy::RequirePostQuantum,
            _ => CryptoPolicy::PreferPostQuantum,
        }
    }

    /// The key algorithm of identities on this profile (what `pki mint --profile` makes).
    pub fn key_algorithm(self) -> tapproof_identity::KeyAlgorithm {
        match self {
            Self::Cnsa2 => tapproof_identity::KeyAlgorithm::MlDsa87,
            Self::Default | Self::Fips => tapproof_identity::KeyAlgorithm::EcdsaP256,
        }
    }
}

impl std::str::FromStr for CryptoProfile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" => Ok(Self::Default),
            "cnsa2" => Ok(Self::Cnsa2),
            "fips" => Ok(Self::Fips),
            other => Err(format!("{other:?} is not a crypto profile: {}", Self::NAMES)),
        }
    }
}

/// The only verification algorithm of the `cnsa2` profile.
static CNSA2_SIGNATURES: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[webpki::aws_lc_rs::ML_DSA_87],
    mapping: &[(SignatureScheme::ML_DSA_87, &[webpki::aws_lc_rs::ML_DSA_87])],
};

pub fn crypto_provider(policy: CryptoPolicy) -> Arc<CryptoProvider> {
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    provider.kx_groups = match policy {
        // ML-KEM-1024 last: offered without a key share (a ClientHello carries one for the
        // first group), chosen only by a peer that allows nothing else.
        CryptoPolicy::PreferPostQuantum => {
            vec![kx_group::X25519MLKEM768, kx_group::X25519, kx_group::MLKEM1024]
        }
        CryptoPolicy::RequirePostQuantum => vec![kx_group::X25519MLKEM768, kx_group::MLKEM1024],
        CryptoPolicy::Cnsa2 => vec![kx_group::MLKEM1024],
    };
    if policy == CryptoPolicy::Cnsa2 {
        provider.cipher_suites = vec![cipher_suite::TLS13_AES_256_GCM_SHA384];
        provider.signature_verification_algorithms = CNSA2_SIGNATURES;
    }
    Arc::new(provider)
}

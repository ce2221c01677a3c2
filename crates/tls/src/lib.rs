//! TLS for tapproof, and the only crate that names rustls: TLS 1.3-only configurations with the
//! aws-lc-rs provider (X25519MLKEM768 preferred), SPIFFE peer verification, identity files loaded
//! and hot-swapped from disk, traffic keys updated on a schedule, handshake failures sorted into stable reasons for metrics, and the
//! audit's TLS probe (the one place that offers every version and trusts nothing).

pub mod admission;
mod classify;
mod config;
mod control;
mod document;
mod federation;
mod material;
pub mod probe;
mod provider;
mod rekey;
pub mod selftest;
mod session;
mod verify;

pub use classify::{failure_reason, failure_text, tls_error_text};
pub use config::{accept, connect, ClientStream, ClientTls, ServerStream, ServerTls};
pub use control::{cert_pin, ControlClientTls, ControlServerTls, ControlTlsError, ServerTrust};
pub use document::{verify_document_signature, DocumentSignatureError};
pub use federation::ForeignRoots;
pub use material::{
    write_identity_file, ExportError, ExportedSvid, IdentityFiles, Material, MaterialError, ReloadingMaterial,
};
pub use provider::{crypto_provider, CryptoPolicy, CryptoProfile, POST_QUANTUM_GROUP};
pub use rekey::{KeySchedule, KeyUpdateReason, OnKeyUpdate, RefreshKeys, Rekeying};
pub use session::{client_session, server_session, SessionInfo};
pub use verify::SpiffeCheckError;

/// Re-exported so callers can build test clients with exactly tapproof's provider; the data plane
/// itself never names rustls.
pub use rustls;

//! Identity for tapproof: SPIFFE IDs and trust domains, the X509-SVID rules a certificate must meet,
//! and the certificate authority that mints identities. Pure logic: this crate does no network or
//! file I/O, so every rule here is testable in memory.

pub mod bundle;
pub mod ca;
pub mod csr;
pub mod pattern;
pub mod revocation;
pub mod spiffe;
pub mod svid;
pub mod token;
pub mod when;

pub use ca::{key_algorithm_of, signed_with_ml_dsa_87, Authority, CaError, IssuedIdentity, KeyAlgorithm};
pub use csr::{check_csr, new_csr, new_csr_with, CsrError};
pub use pattern::{allowed, AllowPattern, PatternError};
pub use revocation::{node_name, normalize_serial, Covered, RevocationSet, RevokedBy};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use svid::{inspect_svid, SvidError, SvidInfo};
pub use token::{valid_chosen_name, JoinToken, NodePattern, TokenFormatError};

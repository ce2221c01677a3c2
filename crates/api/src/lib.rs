//! The control plane's wire contract: every request and response document of the `/v1` API, the
//! error codes as one enum, and the state feed's document. The server answers with these types,
//! the agent and the CLI read them; nothing else defines the JSON. Store rows are not API types:
//! the server maps them here. `openapi.rs` in the server is tested against these types, so the
//! document cannot drift from them.
//!
//! Times are Unix seconds. Unknown fields are refused in requests (`deny_unknown_fields`); in
//! responses they are ignored, so an older agent can read a newer server.

pub mod admin;
pub mod enrol;
pub mod error;
pub mod feed;

pub use admin::{
    AuditEntry, AuditQuery, CapturePolicy, Changed, Handshake, HandshakeQuery, InboundMode, NodeApplied,
    NodeEvent, NodeEventKind, NodeView, Policy, Registration, RegistrationChange, RevocationPropagation,
    RevokeRequest, ServicePolicy, MAX_EVENT_TEXT,
};
pub use enrol::{
    BundleResponse, IssuedIdentity, JoinRequest, JoinResponse, SignItem, SignRequest, SignResponse,
};
pub use error::{ErrorBody, ErrorCode, ErrorDetail};
pub use feed::{
    Announced, DirectoryEntry, Revocation, RevocationKind, StateQuery, StateResponse, MAX_ANNOUNCED,
};

/// Requests are small JSON documents; anything larger is refused before parsing.
pub const MAX_BODY: usize = 64 * 1024;
/// At most this many CSRs in one signing request (a node and its services).
pub const MAX_CSRS: usize = 64;
/// How long `/v1/state` holds a request open when nothing changed (seconds).
pub const LONG_POLL_SECS: u64 = 25;

/// Every path of the API, as the router and the OpenAPI document name them.
pub mod paths {
    pub const HEALTHZ: &str = "/healthz";
    pub const OPENAPI: &str = "/v1/openapi.json";
    pub const BUNDLE: &str = "/v1/bundle";
    /// The same roots as a SPIFFE bundle endpoint serves them (JWK Set), for federation.
    pub const SPIFFE_BUNDLE: &str = "/v1/spiffe-bundle";
    pub const JOIN: &str = "/v1/join";
    pub const SIGN: &str = "/v1/sign";
    pub const STATE: &str = "/v1/state";
    pub const NODES: &str = "/v1/nodes";
    pub const REGISTRATIONS: &str = "/v1/registrations";
    pub const REVOCATIONS: &str = "/v1/revocations";
    /// Per revocation, which nodes applied it and when (admin).
    pub const REVOCATION_PROPAGATION: &str = "/v1/revocations/propagation";
    pub const AUDIT_LOG: &str = "/v1/audit-log";
    /// Agents' handshake records (admin).
    pub const HANDSHAKES: &str = "/v1/handshakes";
    pub const POLICY: &str = "/v1/policy";
    pub const COVERAGE: &str = "/v1/coverage";
    /// What an operator did on a node (`NodeEvent`), for the audit log.
    pub const EVENTS: &str = "/v1/events";
    pub const DASHBOARD_DATA: &str = "/v1/dashboard";
    pub const DASHBOARD: &str = "/dashboard";
}

//! Error documents: `{"error": {"code": "...", "message": "..."}}`. The code is stable and
//! machine-readable; the message says what to do.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Every error code the control plane answers with, and its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No such endpoint.
    NotFound,
    /// The body exceeds the limit.
    BodyTooLarge,
    /// The body could not be read.
    BadBody,
    /// The body is not the JSON document the endpoint takes.
    BadJson,
    /// The query string is malformed.
    BadQuery,
    /// The request is well-formed but asks for something invalid.
    BadRequest,
    /// A SPIFFE ID in the request does not parse.
    BadId,
    /// The token names a node name that is not a valid path segment.
    BadNode,
    /// A policy document does not parse or names IDs outside the trust domain.
    BadPolicy,
    /// The join token is not a tapproof token.
    TokenMalformed,
    /// The join token is unknown or its secret is wrong.
    TokenInvalid,
    /// The join token expired.
    TokenExpired,
    /// The join token was used already.
    TokenUsed,
    /// A CSR failed the checks (key type, requested SANs, signature).
    CsrInvalid,
    /// The CA could not sign.
    CaError,
    /// The endpoint needs a client certificate.
    IdentityRequired,
    /// The endpoint needs an admin identity.
    AdminRequired,
    /// The endpoint needs a node identity.
    NotANode,
    /// The node identity is not registered.
    UnknownNode,
    /// A requested identity is not registered to the calling node.
    NotRegistered,
    /// The caller's node is revoked.
    NodeRevoked,
    /// The caller's SPIFFE ID is revoked.
    IdentityRevoked,
    /// The caller's certificate (serial) is revoked.
    CertificateRevoked,
    /// The caller's certificate expired: only renewal accepts it (within the server's recovery
    /// window, and only the node's newest certificate).
    CertificateExpired,
    /// Too many requests from this source or identity; retry after a while.
    RateLimited,
    /// A coverage report exceeds the limits.
    ReportTooLarge,
    /// The stored policy cannot be read.
    PolicyUnavailable,
    /// The store cannot answer now; retry.
    StoreUnavailable,
    /// A row with that key exists.
    Duplicate,
    /// The store refused the request (read-only, corrupt, query failure).
    StoreFailed,
    /// A bug; the message says more.
    Internal,
    /// A code this build does not know (a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code, for documents and tests.
    pub const ALL: &'static [ErrorCode] = &[
        Self::NotFound,
        Self::BodyTooLarge,
        Self::BadBody,
        Self::BadJson,
        Self::BadQuery,
        Self::BadRequest,
        Self::BadId,
        Self::BadNode,
        Self::BadPolicy,
        Self::TokenMalformed,
        Self::TokenInvalid,
        Self::TokenExpired,
        Self::TokenUsed,
        Self::CsrInvalid,
        Self::CaError,
        Self::IdentityRequired,
        Self::AdminRequired,
        Self::NotANode,
        Self::UnknownNode,
        Self::NotRegistered,
        Self::NodeRevoked,
        Self::IdentityRevoked,
        Self::CertificateRevoked,
        Self::CertificateExpired,
        Self::RateLimited,
        Self::ReportTooLarge,
        Self::PolicyUnavailable,
        Self::StoreUnavailable,
        Self::Duplicate,
        Self::StoreFailed,
        Self::Internal,
    ];

    /// The HTTP status that carries this code.
    pub fn status(self) -> u16 {
        match self {
            Self::NotFound => 404,
            Self::BodyTooLarge => 413,
            Self::BadBody
            | Self::BadJson
            | Self::BadQuery
            | Self::BadRequest
            | Self::BadId
            | Self::BadNode
            | Self::BadPolicy
            | Self::TokenMalformed
            | Self::CsrInvalid
            | Self::ReportTooLarge => 400,
            Self::TokenInvalid
            | Self::TokenExpired
            | Self::TokenUsed
            | Self::IdentityRequired
            | Self::CertificateExpired => 401,
            Self::RateLimited => 429,
            Self::AdminRequired
            | Self::NotANode
            | Self::UnknownNode
            | Self::NotRegistered
            | Self::NodeRevoked
            | Self::IdentityRevoked
            | Self::CertificateRevoked => 403,
            Self::Duplicate => 409,
            Self::PolicyUnavailable | Self::StoreUnavailable | Self::StoreFailed => 503,
            Self::CaError | Self::Internal | Self::Unknown => 500,
        }
    }

    /// The wire spelling (`node_revoked`).
    pub fn as_str(self) -> &'static str {
        // The serde spelling; a test keeps the two equal.
        match self {
            Self::NotFound => "not_found",
            Self::BodyTooLarge => "body_too_large",
            Self::BadBody => "bad_body",
            Self::BadJson => "bad_json",
            Self::BadQuery => "bad_query",
            Self::BadRequest => "bad_request",
            Self::BadId => "bad_id",
            Self::BadNode => "bad_node",
            Self::BadPolicy => "bad_policy",
            Self::TokenMalformed => "token_malformed",
            Self::TokenInvalid => "token_invalid",
            Self::TokenExpired => "token_expired",
            Self::TokenUsed => "token_used",
            Self::CsrInvalid => "csr_invalid",
            Self::CaError => "ca_error",
            Self::IdentityRequired => "identity_required",
            Self::AdminRequired => "admin_required",
            Self::NotANode => "not_a_node",
            Self::UnknownNode => "unknown_node",
            Self::NotRegistered => "not_registered",
            Self::NodeRevoked => "node_revoked",
            Self::IdentityRevoked => "identity_revoked",
            Self::CertificateRevoked => "certificate_revoked",
            Self::CertificateExpired => "certificate_expired",
            Self::RateLimited => "rate_limited",
            Self::ReportTooLarge => "report_too_large",
            Self::PolicyUnavailable => "policy_unavailable",
            Self::StoreUnavailable => "store_unavailable",
            Self::Duplicate => "duplicate",
            Self::StoreFailed => "store_failed",
            Self::Internal => "internal",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spelling_matches_serde_and_round_trips() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, code.as_str(), "{code:?}");
            assert_eq!(serde_json::from_value::<ErrorCode>(json).unwrap(), *code);
            assert!((400..600).contains(&code.status()));
        }
        let newer: ErrorCode = serde_json::from_str("\"from_a_newer_server\"").unwrap();
        assert_eq!(newer, ErrorCode::Unknown);
    }
}

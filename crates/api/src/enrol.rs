//! Enrolment: the trust bundle (`GET /v1/bundle`), joining with a token (`POST /v1/join`, no
//! client certificate) and signing over mTLS (`POST /v1/sign`: renewal and service identities).

use serde::{Deserialize, Serialize};

/// `GET /v1/bundle`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleResponse {
    pub trust_domain: String,
    /// PEM, one root each.
    pub roots: Vec<String>,
}

/// `POST /v1/join`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The single-use join token, as `server token create` printed it.
    pub token: String,
    /// PEM CSR for the node identity; only its public key is used.
    pub csr: String,
    /// The name this node gives itself: required by a reusable token (it must match the token's
    /// pattern and not be a node that already joined); ignored by a single-use token, which
    /// names the node itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One identity the CA issued.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedIdentity {
    pub id: String,
    /// Leaf first, then intermediates.
    pub chain_pem: String,
    pub not_after: i64,
}

/// The answer to a join.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinResponse {
    pub node: String,
    pub identity: IssuedIdentity,
    /// PEM roots of the trust bundle.
    pub bundle: Vec<String>,
    /// Services registered to this node: ask `/v1/sign` for their identities.
    #[serde(default)]
    pub services: Vec<String>,
}

/// `POST /v1/sign`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    /// Between 1 and `MAX_CSRS`.
    pub csrs: Vec<SignItem>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignItem {
    /// The caller's node ID, or `spiffe://<td>/svc/<name>` of a service registered to it.
    pub id: String,
    pub csr: String,
}

/// The answer to a signing request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignResponse {
    pub identities: Vec<IssuedIdentity>,
    pub bundle: Vec<String>,
    /// The services registered to the node now.
    #[serde(default)]
    pub services: Vec<String>,
}

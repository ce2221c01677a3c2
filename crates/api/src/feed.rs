//! The state feed (`GET /v1/state?since=N&tunnel=ADDR`, node identities, long-poll): what every
//! agent follows: revocations, the trust bundle, the service directory and the policy.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The query of `GET /v1/state`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateQuery {
    /// The version the caller holds; the server answers at once when it has a newer one, and
    /// at once when `since` is absent (an agent's first call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Where the calling agent's tunnel listener is reached, for the service directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<String>,
}

/// What a revocation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    /// A node name: its node identity, whatever the serial.
    Node,
    /// One SPIFFE ID.
    SpiffeId,
    /// One certificate, by serial (upper-case hex).
    Serial,
    /// A kind this build does not know (a newer server); agents ignore it and say so.
    #[serde(other)]
    Unknown,
}

impl RevocationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::SpiffeId => "spiffe_id",
            Self::Serial => "serial",
            Self::Unknown => "unknown",
        }
    }
}

/// One revocation in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub id: i64,
    pub kind: RevocationKind,
    pub value: String,
    pub reason: String,
    pub revoked_at: i64,
}

impl Default for Revocation {
    fn default() -> Self {
        Self {
            id: 0,
            kind: RevocationKind::Node,
            value: String::new(),
            reason: String::new(),
            revoked_at: 0,
        }
    }
}

/// One service as the directory lists it: which node fronts it and where its tunnel listens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    pub service: String,
    pub node: String,
    /// The node's SPIFFE ID, which a client must see in the tunnel's handshake.
    pub id: String,
    /// `ADDR:PORT` of the node's tunnel listener.
    pub tunnel: String,
}

/// The state feed's document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateResponse {
    /// Pass this as `since` next time.
    pub version: i64,
    pub revocations: Vec<Revocation>,
    /// PEM roots of the trust bundle (more than one during a root rollover).
    pub bundle: Vec<String>,
    /// Nodes revoked by any kind are not listed.
    #[serde(default)]
    pub directory: Vec<DirectoryEntry>,
    /// Service -> SPIFFE ID patterns allowed to open it.
    #[serde(default)]
    pub policy: BTreeMap<String, Vec<String>>,
}

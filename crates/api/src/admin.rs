//! Admin endpoints (admin identities `spiffe://<td>/admin/<name>` over mTLS): nodes,
//! registrations, revocations, the audit log and the policy.

use crate::feed::RevocationKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One node as `GET /v1/nodes` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub spiffe_id: String,
    /// Where its tunnel listener is reached, as the agent announced it.
    pub tunnel_addr: Option<String>,
    pub created_at: i64,
    pub last_seen: Option<i64>,
    /// Set once the node is revoked (by name).
    pub revoked_at: Option<i64>,
    pub services: Vec<String>,
    /// The newest node certificate's expiry.
    pub cert_not_after: Option<i64>,
}

/// A service registered to a node (`GET /v1/registrations`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub node: String,
    pub service: String,
    /// Where clients reach the service, as the node's agent announced it (`ADDR:PORT`): the
    /// destinations other agents capture for it.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// `POST /v1/registrations`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationChange {
    pub node: String,
    pub service: String,
    /// true: add; false: remove.
    pub add: bool,
}

/// Whether a change changed anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    pub changed: bool,
}

/// `POST /v1/revocations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub kind: RevocationKind,
    /// A node name, a SPIFFE ID, or a serial (hex, `:` separators allowed).
    pub value: String,
    #[serde(default)]
    pub reason: String,
}

impl Default for RevokeRequest {
    fn default() -> Self {
        Self {
            kind: RevocationKind::Node,
            value: String::new(),
            reason: String::new(),
        }
    }
}

/// `GET /v1/revocations/propagation`: one revocation and how far it reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationPropagation {
    pub revocation: crate::feed::Revocation,
    /// The state-feed version of the first document that carried it (None: no agent has asked
    /// the feed since it was made).
    pub version: Option<i64>,
    /// The nodes that applied it, first first.
    pub applied: Vec<NodeApplied>,
    /// Nodes in the fleet (not revoked) that have not acknowledged it yet: offline, partitioned,
    /// or an agent without `[control]` feed.
    pub pending: Vec<String>,
}

/// When one node applied one revocation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeApplied {
    pub node: String,
    /// Unix seconds.
    pub applied_at: i64,
    /// `applied_at - revoked_at`: the propagation time.
    pub seconds: i64,
    /// The node joined after the revocation (it applied it on joining: not a propagation time).
    pub joined_after: bool,
}

/// The query of `GET /v1/handshakes`: records with `from_ms <= at_ms < to_ms`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakeQuery {
    #[serde(default)]
    pub from_ms: i64,
    #[serde(default = "far_future")]
    pub to_ms: i64,
    /// At most this many (1 to 10000).
    #[serde(default = "default_handshake_limit")]
    pub limit: i64,
}

impl Default for HandshakeQuery {
    fn default() -> Self {
        Self {
            from_ms: 0,
            to_ms: far_future(),
            limit: default_handshake_limit(),
        }
    }
}

fn far_future() -> i64 {
    i64::MAX
}

fn default_handshake_limit() -> i64 {
    1000
}

/// One tunnel handshake as an agent reported it (`GET /v1/handshakes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    /// The node that reported it (its agent's end: `side` says which).
    pub node: String,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub seq: i64,
    /// `inbound` or `outbound`.
    pub side: String,
    pub local: String,
    pub remote: String,
    pub local_id: String,
    pub local_serial: String,
    pub peer_id: Option<String>,
    pub peer_serial: Option<String>,
    pub tls_version: Option<String>,
    pub cipher: Option<String>,
    pub group: Option<String>,
    pub signature_scheme: Option<String>,
    pub resumed: bool,
    /// `ok` or `refused`.
    pub outcome: String,
    pub reason: Option<String>,
}

/// The query of `GET /v1/audit-log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Rows after this sequence number.
    #[serde(default)]
    pub after: i64,
    /// At most this many rows (1 to 1000).
    #[serde(default = "default_audit_limit")]
    pub limit: i64,
}

impl Default for AuditQuery {
    fn default() -> Self {
        Self {
            after: 0,
            limit: default_audit_limit(),
        }
    }
}

fn default_audit_limit() -> i64 {
    100
}

/// One row of the hash-chained audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub at: i64,
    /// A SPIFFE ID, `token:<id>`, `cli`, or `peer:<addr>`.
    pub actor: String,
    pub action: String,
    /// JSON text.
    pub details: String,
    /// Hex.
    pub prev_hash: String,
    /// Hex.
    pub hash: String,
}

/// The policy document: for each service, the SPIFFE ID patterns that may open it. Agents allow
/// a stream when their own config or the policy does. `POST /v1/policy` takes it as JSON or as
/// TOML (`[services.db] allow = ["spiffe://td/node/web-1"]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub services: BTreeMap<String, ServicePolicy>,
    /// The inbound capture mode set from the control plane, over each agent's `capture.inbound`.
    #[serde(default, skip_serializing_if = "CapturePolicy::is_empty")]
    pub capture: CapturePolicy,
}

/// What happens to plaintext that reaches the ports of a host's inbound services from the
/// network (an agent config's `capture.inbound`, or the policy's `[capture]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    /// No rule for inbound ports.
    #[default]
    Off,
    /// Let it through, counted per source address (a plaintext attempt).
    Monitor,
    /// Drop it (counted per source address): the service is reachable only through the tunnel.
    Enforce,
}

impl InboundMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Monitor => "monitor",
            Self::Enforce => "enforce",
        }
    }
}

/// The policy's `[capture]`: a fleet-wide inbound mode and per-node exceptions, e.g.
/// `[capture] inbound = "monitor"` with `[capture.nodes] db-1 = "enforce"`. A node's entry wins
/// over `inbound`, and either wins over the agent's own `capture.inbound`; with neither the agent's
/// config rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapturePolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundMode>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, InboundMode>,
}

impl CapturePolicy {
    pub fn is_empty(&self) -> bool {
        self.inbound.is_none() && self.nodes.is_empty()
    }

    /// The mode the control plane sets for `node`, if it sets one.
    pub fn mode_for(&self, node: &str) -> Option<InboundMode> {
        self.nodes.get(node).copied().or(self.inbound)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePolicy {
    pub allow: Vec<String>,
}

/// `POST /v1/events` (node identities): something an operator did on a node that the control
/// plane's audit log must hold, sent by the CLI with the node's identity. Answered 204.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEvent {
    pub kind: NodeEventKind,
    /// Who did it, as the command saw it (the login behind sudo, the user, the uid); at most
    /// `MAX_EVENT_TEXT` bytes.
    pub by: String,
    /// Why, as given; at most `MAX_EVENT_TEXT` bytes.
    pub reason: String,
    /// For `capture_removed`: the destinations the rules captured and the inbound mode they
    /// enforced.
    #[serde(default)]
    pub captured: u32,
    #[serde(default)]
    pub inbound: InboundMode,
}

impl Default for NodeEvent {
    fn default() -> Self {
        Self {
            kind: NodeEventKind::CaptureRemoved,
            by: String::new(),
            reason: String::new(),
            captured: 0,
            inbound: InboundMode::Off,
        }
    }
}

/// The events a node may record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeEventKind {
    /// `tapproof capture remove` deleted the node's nftables table (audit action
    /// `capture.removed`).
    CaptureRemoved,
}

impl NodeEventKind {
    /// The audit log's action for it.
    pub fn action(self) -> &'static str {
        match self {
            Self::CaptureRemoved => "capture.removed",
        }
    }
}

/// The longest `by` and `reason` of a `NodeEvent`.
pub const MAX_EVENT_TEXT: usize = 1024;

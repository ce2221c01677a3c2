//! The records the store keeps. Times are Unix seconds.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaKind {
    Root,
    Intermediate,
}

/// Root rollover states: a `prepared` CA is in every bundle but signs nothing; `active` signs;
/// `retired` signs nothing and leaves the bundle once what it signed has expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaState {
    Prepared,
    Active,
    Retired,
}

macro_rules! text_enum {
    ($ty:ty { $($variant:ident = $text:literal),* $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),* }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some(Self::$variant),)* _ => None }
            }
        }
    };
}

text_enum!(CaKind { Root = "root", Intermediate = "intermediate" });
text_enum!(CaState { Prepared = "prepared", Active = "active", Retired = "retired" });
text_enum!(RevocationKind { Node = "node", SpiffeId = "spiffe_id", Serial = "serial" });

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaRecord {
    pub id: i64,
    pub kind: CaKind,
    pub parent_id: Option<i64>,
    pub cert_pem: String,
    /// The CA's private key, encrypted with the key-encryption key; never stored in the clear.
    #[serde(skip)]
    pub key_sealed: Vec<u8>,
    pub state: CaState,
    pub not_after: i64,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewCa {
    pub kind: CaKind,
    pub parent_id: Option<i64>,
    pub cert_pem: String,
    pub key_sealed: Vec<u8>,
    pub state: CaState,
    pub not_after: i64,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JoinToken {
    pub id: String,
    /// The node's name, or (with `pattern`) the pattern joining nodes' names must match.
    pub node: String,
    pub pattern: bool,
    pub services: Vec<String>,
    pub expires_at: i64,
    /// When the last use was taken (single-use tokens: when it was used).
    pub used_at: Option<i64>,
    pub created_at: i64,
    /// How many joins it allows (1: single-use), and how many it has had.
    pub max_uses: i64,
    pub uses: i64,
}

#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    /// SHA-256 of the secret; the secret itself is never stored.
    pub secret_hash: [u8; 32],
    pub node: String,
    /// `node` is a pattern (`web-*`): the joining agent names itself within it.
    pub pattern: bool,
    pub services: Vec<String>,
    pub expires_at: i64,
    pub created_at: i64,
    /// Joins allowed (1: single-use).
    pub max_uses: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub spiffe_id: String,
    /// Where its tunnel listener is reached, as the agent announced it.
    pub tunnel_addr: Option<String>,
    pub created_at: i64,
    pub last_seen: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub node: String,
    pub service: String,
    /// Where clients reach the service (`ADDR:PORT`), as the node's agent announced it.
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IssuedCert {
    pub serial: String,
    pub spiffe_id: String,
    pub node: String,
    pub not_before: i64,
    pub not_after: i64,
    pub issued_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    Node,
    SpiffeId,
    Serial,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub id: i64,
    pub kind: RevocationKind,
    pub value: String,
    pub reason: String,
    pub revoked_at: i64,
    /// The state-feed version of the first document that carried it (None until one did).
    pub version: Option<i64>,
}

/// When one node applied one revocation (it asked the state feed again past the revocation's
/// version, which an agent does only after applying it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationAck {
    pub revocation_id: i64,
    pub node: String,
    pub applied_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewAudit {
    /// Who did it: a SPIFFE ID, `token:<id>`, `cli`, or a peer address.
    pub actor: String,
    /// What happened: `ca.init`, `token.create`, `node.join`, `cert.renew`, `join.refused`, ...
    pub action: String,
    pub details: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub details: String,
    #[serde(serialize_with = "hex")]
    pub prev_hash: Vec<u8>,
    #[serde(serialize_with = "hex")]
    pub hash: Vec<u8>,
}

fn hex<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// One tunnel handshake as an agent recorded it (see `tapproof_audit::HandshakeRecord`), with
/// the node that reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeRow {
    pub node: String,
    pub at_ms: i64,
    pub seq: i64,
    pub side: String,
    pub local_addr: String,
    pub remote_addr: String,
    pub local_id: String,
    pub local_serial: String,
    pub peer_id: Option<String>,
    pub peer_serial: Option<String>,
    pub tls_version: Option<String>,
    pub cipher: Option<String>,
    pub group: Option<String>,
    pub signature_scheme: Option<String>,
    pub resumed: bool,
    pub outcome: String,
    pub reason: Option<String>,
}

/// One agent's coverage report, as it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCoverage {
    pub node: String,
    pub at: i64,
    pub links: i64,
    pub encrypted: i64,
    pub plaintext: i64,
    /// The agent's `capture.inbound` (`off`, `monitor`, `enforce`), when it reported one.
    pub capture_mode: Option<String>,
    /// Sources whose plaintext a monitor-mode agent let through to an inbound port.
    pub plaintext_attempts: i64,
    /// The whole report (JSON), for the dashboard's link view.
    pub report: String,
}

/// One report as the history keeps it (counts only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoveragePoint {
    pub node: String,
    pub at: i64,
    pub links: i64,
    pub encrypted: i64,
    pub plaintext: i64,
    pub capture_mode: Option<String>,
    pub plaintext_attempts: i64,
}

/// A node's latest report, with its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoverageRecord {
    #[serde(flatten)]
    pub point: CoveragePoint,
    pub report: String,
}

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
    /// Where clients reach the calling agent's inbound services, for transparent capture on other
    /// hosts: `SERVICE=ADDR:PORT` pairs joined by commas (`Announced`). Absent: no change; empty:
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<String>,
}

/// The most addresses one agent may announce.
pub const MAX_ANNOUNCED: usize = 256;

/// The addresses an agent announces for its inbound services (`StateQuery::addresses`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announced(pub Vec<(String, std::net::SocketAddr)>);

impl Announced {
    /// The query value: `web=10.0.0.2:8080,web=[fd00::2]:8080`, sorted (the same set, the same
    /// text).
    pub fn to_query(&self) -> String {
        let mut pairs: Vec<String> = self.0.iter().map(|(s, a)| format!("{s}={a}")).collect();
        pairs.sort();
        pairs.dedup();
        pairs.join(",")
    }

    /// Reads a query value; the error names the pair that is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for pair in text.split(',').filter(|p| !p.is_empty()) {
            let (service, addr) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not SERVICE=ADDR:PORT"))?;
            let addr: std::net::SocketAddr = addr
                .parse()
                .map_err(|e| format!("{pair:?}: {addr:?} is not ADDR:PORT ({e})"))?;
            if service.is_empty() {
                return Err(format!("{pair:?}: no service name"));
            }
            if addr.ip().is_unspecified() || addr.port() == 0 {
                return Err(format!(
                    "{pair:?}: clients cannot reach an unspecified address or port 0"
                ));
            }
            out.push((service.to_owned(), addr));
        }
        if out.len() > MAX_ANNOUNCED {
            return Err(format!(
                "{} addresses announced; at most {MAX_ANNOUNCED}",
                out.len()
            ));
        }
        Ok(Self(out))
    }
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
    /// Where clients reach the service (`ADDR:PORT`), as the node announced it: what agents with
    /// `capture.directory` redirect into a tunnel to this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
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
    /// The policy's inbound capture modes (fleet-wide and per node); empty: agents' configs rule.
    #[serde(default, skip_serializing_if = "crate::CapturePolicy::is_empty")]
    pub capture: crate::CapturePolicy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_addresses_read_back_and_bad_pairs_are_named() {
        let a = Announced(vec![
            ("web".into(), "[fd00::2]:8080".parse().unwrap()),
            ("web".into(), "10.0.0.2:8080".parse().unwrap()),
        ]);
        let text = a.to_query();
        assert_eq!(text, "web=10.0.0.2:8080,web=[fd00::2]:8080");
        assert_eq!(Announced::parse(&text).unwrap().0.len(), 2);
        assert_eq!(Announced::parse("").unwrap(), Announced::default());
        for (bad, says) in [
            ("web", "not SERVICE=ADDR:PORT"),
            ("web=10.0.0.2", "not ADDR:PORT"),
            ("=10.0.0.2:80", "no service name"),
            ("web=0.0.0.0:80", "unspecified"),
            ("web=10.0.0.2:0", "port 0"),
        ] {
            let e = Announced::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let many = vec!["s=10.0.0.1:1"; MAX_ANNOUNCED + 1].join(",");
        assert!(Announced::parse(&many).unwrap_err().contains("at most"));
    }
}

//! The one revocation rule. An identity is revoked when its node name, its SPIFFE ID or its
//! certificate's serial is on the list. The agent (handshakes and open tunnels), the server (every
//! mTLS call and its own TLS listener) and the service directory all ask [`RevocationSet::covers`];
//! nothing else decides.

use crate::spiffe::SpiffeId;
use std::collections::HashSet;
use std::fmt;

/// What a revocation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevokedBy {
    /// A node name (`web-1`): its node identity `spiffe://<td>/node/web-1`, whatever the serial.
    Node,
    /// One SPIFFE ID, whatever the serial.
    SpiffeId,
    /// One certificate, by serial (hex).
    Serial,
}

impl RevokedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::SpiffeId => "spiffe_id",
            Self::Serial => "serial",
        }
    }
}

impl fmt::Display for RevokedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A serial as `inspect_svid` spells it: upper-case hex, no separators, no leading zero bytes
/// beyond one. `01:ab:CD` and `01ABCD` are the same serial. `None` when it is not hex.
pub fn normalize_serial(serial: &str) -> Option<String> {
    let hex: String = serial.chars().filter(|c| *c != ':').collect();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut hex = hex.to_ascii_uppercase();
    if hex.len() % 2 == 1 {
        hex.insert(0, '0');
    }
    Some(hex)
}

/// Why [`RevocationSet::covers`] said yes, for logs and refusal messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Covered {
    pub by: RevokedBy,
    pub value: String,
}

impl fmt::Display for Covered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} is revoked", self.by, self.value)
    }
}

/// Every revocation in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationSet {
    nodes: HashSet<String>,
    ids: HashSet<String>,
    serials: HashSet<String>,
}

impl RevocationSet {
    /// Adds one revocation. A serial that is not hex can match no certificate and is kept as given
    /// (upper-cased), so it still shows in `len`.
    pub fn insert(&mut self, by: RevokedBy, value: &str) {
        match by {
            RevokedBy::Node => self.nodes.insert(value.to_owned()),
            RevokedBy::SpiffeId => self.ids.insert(value.to_owned()),
            RevokedBy::Serial => self
                .serials
                .insert(normalize_serial(value).unwrap_or_else(|| value.to_ascii_uppercase())),
        };
    }

    pub fn len(&self) -> usize {
        self.nodes.len() + self.ids.len() + self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the identity `id` presented with the certificate `serial` is revoked, and by
    /// what. A node revocation covers exactly `spiffe://<td>/node/<name>` (not `web-10` for
    /// `web-1`, not paths below it). `serial` may be `None` where no certificate is at hand (a
    /// directory entry); then only node and ID revocations can match.
    pub fn covers(&self, id: &SpiffeId, serial: Option<&str>) -> Option<Covered> {
        let id_text = id.to_string();
        if self.ids.contains(&id_text) {
            return Some(Covered {
                by: RevokedBy::SpiffeId,
                value: id_text,
            });
        }
        if let Some(node) = node_name(id) {
            if self.nodes.contains(node) {
                return Some(Covered {
                    by: RevokedBy::Node,
                    value: node.to_owned(),
                });
            }
        }
        let serial = serial.and_then(normalize_serial)?;
        self.serials.contains(&serial).then_some(Covered {
            by: RevokedBy::Serial,
            value: serial,
        })
    }
}

/// The node name of a node identity (`spiffe://<td>/node/<name>`, one segment), else `None`.
pub fn node_name(id: &SpiffeId) -> Option<&str> {
    id.path()
        .strip_prefix("/node/")
        .filter(|n| !n.is_empty() && !n.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn nodes_ids_and_serials() {
        let mut r = RevocationSet::default();
        r.insert(RevokedBy::Node, "web-1");
        r.insert(RevokedBy::SpiffeId, "spiffe://example.org/svc/api");
        r.insert(RevokedBy::Serial, "ab:cd");
        assert_eq!(r.len(), 3);
        let web1 = id("spiffe://example.org/node/web-1");
        assert_eq!(r.covers(&web1, Some("1234")).unwrap().by, RevokedBy::Node);
        assert_eq!(r.covers(&web1, None).unwrap().by, RevokedBy::Node);
        assert!(
            r.covers(&id("spiffe://example.org/node/web-10"), Some("1234"))
                .is_none(),
            "whole node names only"
        );
        assert!(r
            .covers(&id("spiffe://example.org/node/web-1/x"), Some("1234"))
            .is_none());
        assert!(
            r.covers(&id("spiffe://example.org/svc/web-1"), None).is_none(),
            "a node revocation covers the node identity only"
        );
        assert_eq!(
            r.covers(&id("spiffe://example.org/svc/api"), Some("1234"))
                .unwrap()
                .by,
            RevokedBy::SpiffeId
        );
        let db = id("spiffe://example.org/node/db-1");
        let by_serial = r.covers(&db, Some("ABCD")).unwrap();
        assert_eq!(
            (by_serial.by, by_serial.value.as_str()),
            (RevokedBy::Serial, "ABCD")
        );
        assert!(
            r.covers(&db, Some("abcd")).is_some(),
            "serials compare as numbers"
        );
        assert!(r.covers(&db, Some("1234")).is_none());
        assert!(r.covers(&db, None).is_none());
        assert!(r.covers(&db, Some("not hex")).is_none());
    }

    #[test]
    fn serials_normalise() {
        assert_eq!(normalize_serial("01:ab:CD").as_deref(), Some("01ABCD"));
        assert_eq!(normalize_serial("abc").as_deref(), Some("0ABC"));
        assert_eq!(normalize_serial(""), None);
        assert_eq!(normalize_serial("xyz"), None);
    }
}

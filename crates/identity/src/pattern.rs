//! Which peers may open which service. A pattern is an exact SPIFFE ID, or an ID followed by
//! `/*`, which matches every ID below it (`spiffe://example.org/svc/*` matches
//! `spiffe://example.org/svc/web` and `spiffe://example.org/svc/web/v2`, but not
//! `spiffe://example.org/svc` itself nor `spiffe://example.org/svcx`).

use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowPattern {
    Exact(SpiffeId),
    /// IDs under this one (the stored ID is the part before `/*`).
    Below(SpiffeId),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("{pattern:?}: {source}")]
    BadId { pattern: String, source: SpiffeIdError },
    #[error("{0:?}: '*' is only allowed as a whole last segment (\"spiffe://td/prefix/*\")")]
    BadWildcard(String),
}

impl AllowPattern {
    pub fn trust_domain(&self) -> &TrustDomain {
        match self {
            Self::Exact(id) | Self::Below(id) => id.trust_domain(),
        }
    }

    pub fn allows(&self, peer: &SpiffeId) -> bool {
        match self {
            Self::Exact(id) => id == peer,
            Self::Below(base) => {
                peer.trust_domain() == base.trust_domain()
                    && peer
                        .path()
                        .strip_prefix(base.path())
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }
}

impl FromStr for AllowPattern {
    type Err = PatternError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad_id = |source| PatternError::BadId {
            pattern: s.to_owned(),
            source,
        };
        if let Some(base) = s.strip_suffix("/*") {
            if base.contains('*') {
                return Err(PatternError::BadWildcard(s.to_owned()));
            }
            return SpiffeId::parse(base).map(Self::Below).map_err(bad_id);
        }
        if s.contains('*') {
            return Err(PatternError::BadWildcard(s.to_owned()));
        }
        SpiffeId::parse(s).map(Self::Exact).map_err(bad_id)
    }
}

impl fmt::Display for AllowPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::Below(id) => write!(f, "{id}/*"),
        }
    }
}

impl<'de> Deserialize<'de> for AllowPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// True when any pattern allows `peer`.
pub fn allowed(patterns: &[AllowPattern], peer: &SpiffeId) -> bool {
    patterns.iter().any(|p| p.allows(peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn pat(s: &str) -> AllowPattern {
        s.parse().unwrap()
    }

    #[test]
    fn exact_matches_only_itself() {
        let p = pat("spiffe://example.org/node/web-1");
        assert!(p.allows(&id("spiffe://example.org/node/web-1")));
        assert!(!p.allows(&id("spiffe://example.org/node/web-10")));
        assert!(!p.allows(&id("spiffe://example.org/node/web-1/x")));
        assert!(!p.allows(&id("spiffe://other.org/node/web-1")));
    }

    #[test]
    fn below_matches_whole_segments_under_the_prefix() {
        let p = pat("spiffe://example.org/svc/*");
        assert!(p.allows(&id("spiffe://example.org/svc/web")));
        assert!(p.allows(&id("spiffe://example.org/svc/web/v2")));
        assert!(!p.allows(&id("spiffe://example.org/svc")));
        assert!(!p.allows(&id("spiffe://example.org/svcx/web")));
        assert!(!p.allows(&id("spiffe://other.org/svc/web")));
        let all = pat("spiffe://example.org/*");
        assert!(all.allows(&id("spiffe://example.org/anything/here")));
        assert!(!all.allows(&id("spiffe://example.org")));
        assert!(!all.allows(&id("spiffe://example.orgx/a")));
    }

    #[test]
    fn rejects_malformed_patterns() {
        for bad in [
            "spiffe://example.org/svc/**",
            "spiffe://example.org/*/x",
            "spiffe://example.org/sv*",
            "*",
            "spiffe://Example.org/x",
            "example.org/x",
            "spiffe://example.org/svc/",
        ] {
            assert!(bad.parse::<AllowPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn any_pattern_suffices() {
        let ps = [
            pat("spiffe://example.org/node/a"),
            pat("spiffe://example.org/svc/*"),
        ];
        assert!(allowed(&ps, &id("spiffe://example.org/node/a")));
        assert!(allowed(&ps, &id("spiffe://example.org/svc/x")));
        assert!(!allowed(&ps, &id("spiffe://example.org/node/b")));
        assert!(!allowed(&[], &id("spiffe://example.org/node/a")));
    }
}

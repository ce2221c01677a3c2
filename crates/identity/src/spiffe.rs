//! SPIFFE IDs as the SPIFFE-ID specification defines them: `spiffe://<trust-domain>/<path>`.
//!
//! Parsing is strict on purpose: an ID is compared byte for byte against policy, so two spellings
//! of one identity (upper-case trust domain, `%2F`, `/./`) must not both be accepted.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";
/// The specification caps a SPIFFE ID at 2048 bytes.
pub const MAX_ID_LEN: usize = 2048;
/// The specification caps a trust domain name at 255 bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID must start with \"spiffe://\" (lower case)")]
    WrongScheme,
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("trust domain may hold only lower-case letters, digits, '.', '-' and '_' (found {0:?}); ports and user info are not allowed")]
    BadTrustDomainChar(char),
    #[error("path segments may hold only letters, digits, '.', '-' and '_' (found {0:?}); percent-encoding, queries and fragments are not allowed")]
    BadPathChar(char),
    #[error("path has an empty segment (a doubled or trailing '/')")]
    EmptySegment,
    #[error("path segments \".\" and \"..\" are not allowed")]
    DotSegment,
}

/// A SPIFFE trust domain name, such as `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        if name.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong);
        }
        if let Some(c) = name
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadTrustDomainChar(c));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>/node/<name>`: the identity of a host's agent.
    pub fn node_id(&self, node: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::new(self.clone(), &format!("/node/{node}"))
    }

    /// `spiffe://<td>/svc/<name>`: the identity of a service.
    pub fn service_id(&self, service: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::new(self.clone(), &format!("/svc/{service}"))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A parsed, valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or `/seg(/seg)*`.
    path: String,
}

impl SpiffeId {
    pub fn new(trust_domain: TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        validate_path(path)?;
        let id = Self {
            trust_domain,
            path: path.to_owned(),
        };
        if id.to_string().len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(id)
    }

    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        Ok(Self {
            trust_domain: TrustDomain::new(td)?,
            path: {
                validate_path(path)?;
                path.to_owned()
            },
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

/// Checks one path segment (a node or service name): what `node_id` and `service_id` accept
/// after their prefix.
pub fn validate_segment(segment: &str) -> Result<(), SpiffeIdError> {
    if segment.contains('/') {
        return Err(SpiffeIdError::BadPathChar('/'));
    }
    validate_path(&format!("/{segment}"))
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(SpiffeIdError::BadPathChar(path.chars().next().unwrap_or('?')));
    };
    for segment in rest.split('/') {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeIdError::BadPathChar(c));
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/node/web-1",
            "spiffe://a_b-c.d9/x/Y.z/_-",
            "spiffe://example.org/svc/db",
        ] {
            let id = SpiffeId::parse(s).unwrap();
            assert_eq!(id.to_string(), s);
        }
        let id = SpiffeId::parse("spiffe://example.org/node/web-1").unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/node/web-1");
    }

    #[test]
    fn rejects_what_the_spec_forbids() {
        use SpiffeIdError::*;
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("SPIFFE://example.org/a", WrongScheme),
            ("https://example.org/a", WrongScheme),
            ("spiffe:/example.org", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///path", MissingTrustDomain),
            ("spiffe://Example.org/a", BadTrustDomainChar('E')),
            ("spiffe://example.org:8080/a", BadTrustDomainChar(':')),
            ("spiffe://user@example.org/a", BadTrustDomainChar('@')),
            ("spiffe://example.org/", EmptySegment),
            ("spiffe://example.org/a//b", EmptySegment),
            ("spiffe://example.org/a/", EmptySegment),
            ("spiffe://example.org/./a", DotSegment),
            ("spiffe://example.org/a/..", DotSegment),
            ("spiffe://example.org/a%2Fb", BadPathChar('%')),
            ("spiffe://example.org/a?x=1", BadPathChar('?')),
            ("spiffe://example.org/a#frag", BadPathChar('#')),
            ("spiffe://example.org/a b", BadPathChar(' ')),
            ("spiffe://example.org?x", BadTrustDomainChar('?')),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input}");
        }
    }

    #[test]
    fn enforces_length_limits() {
        let long_td = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://{long_td}")),
            Err(SpiffeIdError::TrustDomainTooLong)
        );
        let ok_td = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        assert!(SpiffeId::parse(&format!("spiffe://{ok_td}")).is_ok());
        let long_path = "/x".repeat(MAX_ID_LEN);
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://example.org{long_path}")),
            Err(SpiffeIdError::TooLong)
        );
    }

    #[test]
    fn builds_node_and_service_ids() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            td.node_id("web-1").unwrap().to_string(),
            "spiffe://example.org/node/web-1"
        );
        assert_eq!(
            td.service_id("db").unwrap().to_string(),
            "spiffe://example.org/svc/db"
        );
        assert!(td.node_id("bad/../x").is_err());
        assert!(td.service_id("").is_err());
    }
}

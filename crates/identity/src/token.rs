//! Join tokens, in the shape of kubeadm's discovery tokens: everything a new node needs to reach
//! the control plane and trust it on first contact, plus a single-use secret.
//!
//! `tpj1.<hex server address>.<hex SHA-256 of the root CA>.<token id>.<hex secret>`
//!
//! The server stores only SHA-256 of the secret. The pin lets the agent authenticate the server
//! before it holds any trust bundle.

use sha2::{Digest, Sha256};
use std::fmt;

const PREFIX: &str = "tpj1";

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub server: String,
    pub root_pin: [u8; 32],
    pub id: String,
    pub secret: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed join token ({0}); paste the whole token `tapproof server token create` printed")]
pub struct TokenFormatError(pub &'static str);

impl JoinToken {
    pub fn new(server: String, root_pin: [u8; 32]) -> Self {
        let id: [u8; 8] = rand::random();
        Self {
            server,
            root_pin,
            id: hex::encode(id),
            secret: rand::random(),
        }
    }

    pub fn secret_hash(&self) -> [u8; 32] {
        Sha256::digest(self.secret).into()
    }

    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let [prefix, server, pin, id, secret] = parts.as_slice() else {
            return Err(TokenFormatError("expected 5 dot-separated parts"));
        };
        if *prefix != PREFIX {
            return Err(TokenFormatError("unknown token version"));
        }
        let server =
            String::from_utf8(hex::decode(server).map_err(|_| TokenFormatError("server part is not hex"))?)
                .map_err(|_| TokenFormatError("server part is not text"))?;
        let root_pin = hex::decode(pin)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(TokenFormatError("root pin is not 32 hex bytes"))?;
        if id.len() != 16 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(TokenFormatError("token id is not 16 hex characters"));
        }
        let secret = hex::decode(secret)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or(TokenFormatError("secret is not 32 hex bytes"))?;
        Ok(Self {
            server,
            root_pin,
            id: (*id).to_owned(),
            secret,
        })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}.{}",
            hex::encode(self.server.as_bytes()),
            hex::encode(self.root_pin),
            self.id,
            hex::encode(self.secret)
        )
    }
}

/// Never print the secret by accident.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "JoinToken {{ server: {:?}, id: {:?}, .. }}",
            self.server, self.id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_hides_the_secret_in_debug() {
        let t = JoinToken::new("10.0.0.1:15443".into(), [5; 32]);
        let text = t.to_string();
        assert_eq!(JoinToken::parse(&text).unwrap(), t);
        assert_eq!(JoinToken::parse(&format!("  {text}\n")).unwrap(), t);
        assert!(!format!("{t:?}").contains(&hex::encode(t.secret)));
        assert_ne!(t.secret_hash(), t.secret);
    }

    #[test]
    fn rejects_malformed_tokens() {
        let good = JoinToken::new("h:1".into(), [1; 32]).to_string();
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        assert!(JoinToken::parse("").is_err());
        assert!(JoinToken::parse("tpj1.a.b").is_err());
        assert!(JoinToken::parse(&good.replacen("tpj1", "tpj2", 1)).is_err());
        parts[2] = "00".into();
        assert!(JoinToken::parse(&parts.join(".")).is_err());
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[4].pop();
        assert!(JoinToken::parse(&parts.join(".")).is_err());
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[3] = "zz".into();
        assert!(JoinToken::parse(&parts.join(".")).is_err());
    }
}

/// The node-name pattern of a reusable join token (`web-*`, `*.dc1`): `*` stands for any run of
/// name characters, everything else is literal. Names an agent may choose with such a token are
/// one SPIFFE path segment: 1 to 63 of `a-z 0-9 . - _`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePattern(String);

impl NodePattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() || pattern.len() > 63 {
            return Err(format!("node pattern {pattern:?} must be 1 to 63 characters"));
        }
        if let Some(c) = pattern.chars().find(|c| !(is_name_char(*c) || *c == '*')) {
            return Err(format!(
                "node pattern {pattern:?}: {c:?} is not allowed (a-z, 0-9, '.', '-', '_' and '*')"
            ));
        }
        if !pattern.contains('*') {
            return Err(format!(
                "node pattern {pattern:?} has no '*': give one node's name with --node instead"
            ));
        }
        Ok(Self(pattern.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` is a valid chosen node name within the pattern.
    pub fn matches(&self, name: &str) -> bool {
        valid_chosen_name(name).is_ok() && glob(self.0.as_bytes(), name.as_bytes())
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

/// A node name an agent chose (with a reusable token): one path segment, 1 to 63 of
/// `a-z 0-9 . - _`, not `.` or `..`.
pub fn valid_chosen_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 || !name.chars().all(is_name_char) || name == "." || name == ".." {
        return Err(format!(
            "node name {name:?} must be 1 to 63 of a-z, 0-9, '.', '-', '_' (set [control] node in the agent's config)"
        ));
    }
    Ok(())
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

#[cfg(test)]
mod pattern_tests {
    use super::*;

    #[test]
    fn patterns_match_names_in_them_only() {
        let p = NodePattern::parse("web-*").unwrap();
        assert!(p.matches("web-1") && p.matches("web-eu-12"));
        assert!(!p.matches("db-1"));
        assert!(p.matches("web-"), "'*' may stand for nothing");
        assert!(!p.matches("web-1/x") && !p.matches("WEB-1") && !p.matches("xweb-1"));
        assert!(NodePattern::parse("*.dc1").unwrap().matches("k8s-node-3.dc1"));
        for bad in ["", "web", "web/*", "Web-*", &"x*".repeat(40)] {
            assert!(NodePattern::parse(bad).is_err(), "{bad}");
        }
        assert!(valid_chosen_name("..").is_err() && valid_chosen_name("a b").is_err());
    }
}

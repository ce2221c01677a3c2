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

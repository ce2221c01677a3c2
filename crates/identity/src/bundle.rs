//! The SPIFFE trust bundle format (SPIFFE Trust Domain and Bundle spec, section 4): a JWK Set
//! whose keys with `"use": "x509-svid"` each carry one root certificate in `x5c`. A tapproof
//! server serves its roots this way at `/v1/spiffe-bundle` (a SPIFFE bundle endpoint), and an
//! agent federating with another trust domain reads that domain's bundle in this format from its
//! endpoint (SPIRE's bundle endpoints serve the same document).
//!
//! Only X509-SVID keys are used; JWT-SVID keys are skipped (tapproof issues no JWT-SVIDs). Each
//! key's JWK parameters must be those of its certificate's public key, as go-jose (SPIRE's
//! parser) checks too, so a document that says one key and carries another is refused.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Map, Value};
use x509_parser::prelude::*;

/// The refresh hint a tapproof bundle endpoint sends (seconds): how often a federated peer
/// should fetch again. Root rollover stages a new root long before it signs (hours), so five
/// minutes is ample.
pub const REFRESH_HINT_S: u64 = 300;

/// At most this many roots in one bundle (a rollover holds two or three).
pub const MAX_ROOTS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("the SPIFFE bundle is not a JSON object: {0}")]
    NotJson(String),
    #[error("the SPIFFE bundle has no \"keys\" array")]
    NoKeys,
    #[error("the SPIFFE bundle's key {index}: {detail}")]
    BadKey { index: usize, detail: String },
    #[error("the SPIFFE bundle holds no x509-svid key, so it trusts no root")]
    NoX509Roots,
    #[error("the SPIFFE bundle holds {0} roots; at most {MAX_ROOTS} are accepted")]
    TooManyRoots(usize),
    #[error("the SPIFFE bundle's {0} is not a whole number")]
    BadNumber(&'static str),
    #[error("root {index} cannot be put in a SPIFFE bundle: {detail}")]
    Unencodable { index: usize, detail: String },
}

/// A bundle read from a SPIFFE bundle document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeBundle {
    /// Root certificates (DER), in the document's order.
    pub roots: Vec<Vec<u8>>,
    /// `spiffe_refresh_hint`, seconds.
    pub refresh_hint_s: Option<u64>,
    /// `spiffe_sequence`.
    pub sequence: Option<u64>,
}

/// The JWK parameters of a certificate's public key (RFC 7518, section 6): EC P-256/P-384/P-521
/// or RSA.
fn jwk_params(cert: &X509Certificate<'_>) -> Result<Map<String, Value>, String> {
    let spki = cert.public_key();
    let mut m = Map::new();
    match spki
        .parsed()
        .map_err(|e| format!("cannot read its public key: {e}"))?
    {
        x509_parser::public_key::PublicKey::EC(point) => {
            let crv = match spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .as_deref()
            {
                Some("1.2.840.10045.3.1.7") => "P-256",
                Some("1.3.132.0.34") => "P-384",
                Some("1.3.132.0.35") => "P-521",
                other => return Err(format!("its EC curve {other:?} has no JWK name")),
            };
            let data = point.data();
            if data.first() != Some(&4) || data.len() % 2 == 0 {
                return Err("its EC point is not in uncompressed form".into());
            }
            let (x, y) = data[1..].split_at((data.len() - 1) / 2);
            m.insert("kty".into(), "EC".into());
            m.insert("crv".into(), crv.into());
            m.insert("x".into(), URL_SAFE_NO_PAD.encode(x).into());
            m.insert("y".into(), URL_SAFE_NO_PAD.encode(y).into());
        }
        x509_parser::public_key::PublicKey::RSA(rsa) => {
            let trim = |b: &[u8]| {
                let start = b
                    .iter()
                    .position(|&x| x != 0)
                    .unwrap_or(b.len().saturating_sub(1));
                b[start..].to_vec()
            };
            m.insert("kty".into(), "RSA".into());
            m.insert("n".into(), URL_SAFE_NO_PAD.encode(trim(rsa.modulus)).into());
            m.insert("e".into(), URL_SAFE_NO_PAD.encode(trim(rsa.exponent)).into());
        }
        _ => return Err("its key type has no JWK form that tapproof writes (EC or RSA)".into()),
    }
    Ok(m)
}

/// The SPIFFE bundle document for `roots` (DER), with a refresh hint and, if the caller keeps
/// one, a sequence number (the spec makes it optional; it must only grow).
pub fn encode(roots: &[Vec<u8>], refresh_hint_s: u64, sequence: Option<u64>) -> Result<String, BundleError> {
    let mut keys = Vec::new();
    for (index, der) in roots.iter().enumerate() {
        let unencodable = |detail: String| BundleError::Unencodable { index, detail };
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| unencodable(e.to_string()))?;
        let mut key = jwk_params(&cert).map_err(unencodable)?;
        key.insert("use".into(), "x509-svid".into());
        key.insert("x5c".into(), json!([STANDARD.encode(der)]));
        keys.push(Value::Object(key));
    }
    let mut doc = json!({ "keys": keys, "spiffe_refresh_hint": refresh_hint_s });
    if let Some(sequence) = sequence {
        doc["spiffe_sequence"] = sequence.into();
    }
    Ok(doc.to_string())
}

/// Reads a SPIFFE bundle document: every `x509-svid` key's certificate, checked to be a CA whose
/// public key is the one the JWK names.
pub fn decode(text: &[u8]) -> Result<SpiffeBundle, BundleError> {
    let doc: Value = serde_json::from_slice(text).map_err(|e| BundleError::NotJson(e.to_string()))?;
    let doc = doc
        .as_object()
        .ok_or_else(|| BundleError::NotJson("the document is not an object".into()))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(BundleError::NoKeys)?;
    let number = |name: &'static str| match doc.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(BundleError::BadNumber(name)),
    };
    let refresh_hint_s = number("spiffe_refresh_hint")?;
    let sequence = number("spiffe_sequence")?;
    let mut roots = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        let bad = |detail: String| BundleError::BadKey { index, detail };
        let key = key.as_object().ok_or_else(|| bad("is not an object".into()))?;
        match key.get("use").and_then(Value::as_str) {
            Some("x509-svid") => {}
            Some("jwt-svid") => continue,
            Some(other) => return Err(bad(format!("\"use\" is {other:?}, not x509-svid or jwt-svid"))),
            None => return Err(bad("has no \"use\"".into())),
        }
        let x5c = key
            .get("x5c")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("has no \"x5c\" array".into()))?;
        let [cert] = x5c.as_slice() else {
            return Err(bad(format!(
                "\"x5c\" holds {} certificates; an x509-svid key holds exactly one",
                x5c.len()
            )));
        };
        let der = cert
            .as_str()
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or_else(|| bad("\"x5c\" is not base64".into()))?;
        let (rest, parsed) =
            X509Certificate::from_der(&der).map_err(|e| bad(format!("\"x5c\" is not a certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(bad("\"x5c\" has bytes after the certificate".into()));
        }
        if !parsed.is_ca() {
            return Err(bad(
                "its certificate is not a CA (basicConstraints cA is not true)".into(),
            ));
        }
        let want = jwk_params(&parsed).map_err(bad)?;
        for (name, value) in &want {
            if key.get(name) != Some(value) {
                return Err(bad(format!(
                    "its \"{name}\" does not match the certificate's public key"
                )));
            }
        }
        roots.push(der);
    }
    if roots.is_empty() {
        return Err(BundleError::NoX509Roots);
    }
    if roots.len() > MAX_ROOTS {
        return Err(BundleError::TooManyRoots(roots.len()));
    }
    Ok(SpiffeBundle {
        roots,
        refresh_hint_s,
        sequence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Authority, TrustDomain};

    fn root_der() -> Vec<u8> {
        let root = Authority::new_root(
            TrustDomain::new("partner.org").unwrap(),
            ::time::Duration::days(1),
        )
        .unwrap();
        crate::ca::first_der(root.cert_pem()).unwrap()
    }

    #[test]
    fn a_bundle_round_trips() {
        let (a, b) = (root_der(), root_der());
        let text = encode(&[a.clone(), b.clone()], 300, Some(7)).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["keys"][0]["use"], "x509-svid");
        assert_eq!(doc["keys"][0]["kty"], "EC");
        let got = decode(text.as_bytes()).unwrap();
        assert_eq!(got.roots, vec![a, b]);
        assert_eq!(got.refresh_hint_s, Some(300));
        assert_eq!(got.sequence, Some(7));
    }

    #[test]
    fn jwt_keys_are_skipped_and_bad_documents_named() {
        let der = root_der();
        let mut doc: Value =
            serde_json::from_str(&encode(std::slice::from_ref(&der), 60, None).unwrap()).unwrap();
        doc["keys"]
            .as_array_mut()
            .unwrap()
            .push(json!({"use": "jwt-svid", "kty": "EC", "kid": "k1"}));
        assert_eq!(
            decode(doc.to_string().as_bytes()).unwrap().roots,
            vec![der.clone()]
        );

        let cases: Vec<(Value, &str)> = vec![
            (json!([]), "not an object"),
            (json!({}), "no \"keys\""),
            (json!({"keys": []}), "no x509-svid key"),
            (json!({"keys": [{"use": "x509-svid"}]}), "no \"x5c\""),
            (
                json!({"keys": [{"use": "x509-svid", "x5c": ["!!"]}]}),
                "not base64",
            ),
            (
                json!({"keys": [{"use": "x509-svid", "x5c": [STANDARD.encode(b"junk")]}]}),
                "not a certificate",
            ),
            (json!({"keys": [{"use": "enc"}]}), "not x509-svid"),
            (json!({"keys": [], "spiffe_refresh_hint": "soon"}), "refresh_hint"),
        ];
        for (doc, want) in cases {
            let err = decode(doc.to_string().as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{doc}: {err}");
        }
        // A key whose JWK says another public key than its certificate's.
        let mut doc: Value = serde_json::from_str(&encode(&[der], 60, None).unwrap()).unwrap();
        doc["keys"][0]["x"] = URL_SAFE_NO_PAD.encode([1u8; 32]).into();
        let err = decode(doc.to_string().as_bytes()).unwrap_err().to_string();
        assert!(err.contains("\"x\" does not match"), "{err}");
    }
}

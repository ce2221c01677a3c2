//! The key-encryption key that seals the CA's private keys at rest (AES-256-GCM, a fresh random
//! nonce per seal, the purpose bound in as associated data). It comes from a file (32 raw bytes,
//! or 64 hex characters; mode 0600) or from the TAPPROOF_KEK environment variable (hex); it is
//! never logged and never stored in the store.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use std::path::Path;

const MAGIC: &[u8] = b"tpk1";
pub const KEK_ENV: &str = "TAPPROOF_KEK";

#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("cannot read key-encryption key file {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("key-encryption key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: String, mode: u32 },
    #[error("key-encryption key from {source_name} must be 32 bytes (or 64 hex characters)")]
    Length { source_name: String },
    #[error("cannot unseal a CA key: wrong key-encryption key, or the sealed key was altered")]
    Unseal,
    #[error("cannot seal: {0}")]
    Seal(String),
}

pub struct Kek {
    key: LessSafeKey,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

fn parse(bytes: &[u8], source_name: &str) -> Result<[u8; 32], KekError> {
    let text = std::str::from_utf8(bytes).map(str::trim).unwrap_or("");
    let raw = if text.len() == 64 {
        hex::decode(text).ok()
    } else {
        None
    };
    let raw = raw.unwrap_or_else(|| bytes.to_vec());
    raw.try_into().map_err(|_| KekError::Length {
        source_name: source_name.to_owned(),
    })
}

impl Kek {
    pub fn from_bytes(raw: [u8; 32]) -> Self {
        let key = UnboundKey::new(&AES_256_GCM, &raw).expect("32 bytes is an AES-256 key");
        Self {
            key: LessSafeKey::new(key),
        }
    }

    /// TAPPROOF_KEK when set, else the file.
    pub fn load(file: &Path) -> Result<Self, KekError> {
        if let Ok(hex_text) = std::env::var(KEK_ENV) {
            return Ok(Self::from_bytes(parse(hex_text.as_bytes(), KEK_ENV)?));
        }
        let path = file.display().to_string();
        let meta = std::fs::metadata(file).map_err(|e| KekError::Read {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KekError::Permissions { path, mode });
        }
        let bytes = std::fs::read(file).map_err(|e| KekError::Read {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        Ok(Self::from_bytes(parse(&bytes, &path)?))
    }

    /// Creates a new random key file (0600 from the first byte) unless TAPPROOF_KEK is set or the
    /// file exists; then loads.
    pub fn create_or_load(file: &Path) -> Result<Self, KekError> {
        if std::env::var(KEK_ENV).is_err() && !file.exists() {
            let mut raw = [0u8; 32];
            SystemRandom::new()
                .fill(&mut raw)
                .map_err(|_| KekError::Seal("no randomness".into()))?;
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(file)
                .map_err(|e| KekError::Read {
                    path: file.display().to_string(),
                    detail: e.to_string(),
                })?;
            f.write_all(hex::encode(raw).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| KekError::Read {
                    path: file.display().to_string(),
                    detail: e.to_string(),
                })?;
        }
        Self::load(file)
    }

    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> Result<Vec<u8>, KekError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KekError::Seal("no randomness".into()))?;
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.as_bytes()),
                &mut buf,
            )
            .map_err(|_| KekError::Seal("AES-GCM failed".into()))?;
        Ok([MAGIC, &nonce, &buf].concat())
    }

    pub fn open(&self, purpose: &str, sealed: &[u8]) -> Result<Vec<u8>, KekError> {
        let rest = sealed.strip_prefix(MAGIC).ok_or(KekError::Unseal)?;
        if rest.len() < NONCE_LEN {
            return Err(KekError::Unseal);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KekError::Unseal)?;
        let mut buf = ciphertext.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(purpose.as_bytes()), &mut buf)
            .map_err(|_| KekError::Unseal)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_detects_tampering() {
        let kek = Kek::from_bytes([3; 32]);
        let sealed = kek.seal("ca:1", b"secret key").unwrap();
        assert!(!sealed.windows(10).any(|w| w == b"secret key"));
        assert_eq!(kek.open("ca:1", &sealed).unwrap(), b"secret key");
        assert!(
            matches!(kek.open("ca:2", &sealed), Err(KekError::Unseal)),
            "purpose is bound"
        );
        assert!(matches!(
            Kek::from_bytes([4; 32]).open("ca:1", &sealed),
            Err(KekError::Unseal)
        ));
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(kek.open("ca:1", &bad), Err(KekError::Unseal)));
        assert!(matches!(kek.open("ca:1", b"tpk1"), Err(KekError::Unseal)));
    }

    #[test]
    fn key_files_are_created_private_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kek");
        let a = Kek::create_or_load(&file).unwrap();
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let sealed = a.seal("x", b"y").unwrap();
        assert_eq!(Kek::load(&file).unwrap().open("x", &sealed).unwrap(), b"y");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Kek::load(&file), Err(KekError::Permissions { .. })));
        std::fs::write(dir.path().join("short"), b"abc").unwrap();
        std::fs::set_permissions(dir.path().join("short"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Kek::load(&dir.path().join("short")),
            Err(KekError::Length { .. })
        ));
    }
}

//! Identity material read from files (bring your own PKI: SPIRE, cert-manager, openssl), checked
//! as a whole before use, and re-read when the files change so that rotation by an outside tool
//! needs no restart. A half-written rotation (new cert, old key) fails the checks and the previous
//! material stays in use until the files agree again.

use crate::provider::{crypto_provider, CryptoPolicy};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tapproof_identity::{inspect_svid, SpiffeId, SvidError, SvidInfo, TrustDomain};

/// Where an agent's identity lives on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8, SEC1 or PKCS#1 PEM), mode 0600.
    pub key: PathBuf,
    /// Trusted roots of the trust domain.
    pub bundle: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} file {path} holds no PEM certificate")]
    NoCertificates { what: &'static str, path: PathBuf },
    #[error("{what} file {path} is not valid PEM: {detail}")]
    BadPem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("key file {path} holds no PEM private key (PKCS#8, SEC1 or PKCS#1): {detail}")]
    NoKey { path: PathBuf, detail: String },
    #[error(
        "key file {path} is readable or writable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is not a usable private key: {detail}")]
    BadKey { path: PathBuf, detail: String },
    #[error("the identity does not fit crypto profile {profile}: {detail}")]
    Profile { profile: &'static str, detail: String },
    #[error("key file {key} does not match the leaf certificate in {cert}")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("certificate {path} is not a valid X509-SVID: {source}")]
    NotSvid { path: PathBuf, source: SvidError },
    #[error("certificate {path}: its extendedKeyUsage lacks {missing}; a node identity opens tunnels (TLS client) and accepts them (TLS server), so it needs both serverAuth and clientAuth, or no extendedKeyUsage at all")]
    Purpose { path: PathBuf, missing: &'static str },
    #[error("certificate {path} carries {id}, which is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        path: PathBuf,
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("certificate {path} expired at {}; rotate it", tapproof_identity::when::at(*not_after, *now))]
    Expired { path: PathBuf, not_after: i64, now: i64 },
    #[error("certificate {path} is not valid before {} (check the clock)", tapproof_identity::when::at(*not_before, *now))]
    NotYetValid {
        path: PathBuf,
        not_before: i64,
        now: i64,
    },
    #[error("bundle {path}: certificate {index} is not a usable trust anchor: {detail}")]
    BadAnchor {
        path: PathBuf,
        index: usize,
        detail: String,
    },
    #[error("certificate {cert} does not chain to any root in bundle {bundle}: {detail}")]
    Untrusted {
        cert: PathBuf,
        bundle: PathBuf,
        detail: String,
    },
}

/// Writes an identity file the way the reload loop expects to see it change: into a temporary
/// file created with its final `mode` (a key is never briefly readable by others), synced, then
/// renamed over `path` in one step.
pub fn write_identity_file(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // A leftover temp file (a crash mid-write) may have any mode: start from a new file, so the
    // mode is `mode` from the first byte, whatever was there.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Checked identity material: a leaf SVID with its key, and the roots to verify peers with.
#[derive(Debug)]
pub struct Material {
    pub(crate) certified: Arc<CertifiedKey>,
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) trust_domain: TrustDomain,
    svid: SvidInfo,
    raw: RawFiles,
}

#[derive(Debug, PartialEq, Eq)]
struct RawFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, MaterialError> {
    std::fs::read(path).map_err(|source| MaterialError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certs(what: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| MaterialError::BadPem {
            what,
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(MaterialError::NoCertificates {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

#[cfg(unix)]
fn check_key_mode(path: &Path) -> Result<(), MaterialError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| MaterialError::Read {
        what: "key",
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(MaterialError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_mode(_: &Path) -> Result<(), MaterialError> {
    Ok(())
}

impl Material {
    /// Reads and checks the three files.
    pub fn load(files: &IdentityFiles, trust_domain: &TrustDomain) -> Result<Self, MaterialError> {
        check_key_mode(&files.key)?;
        let raw = RawFiles {
            cert: read("certificate", &files.cert)?,
            key: read("key", &files.key)?,
            bundle: read("bundle", &files.bundle)?,
        };
        Self::from_raw(files, trust_domain, raw)
    }

    fn from_raw(
        files: &IdentityFiles,
        trust_domain: &TrustDomain,
        raw: RawFiles,
    ) -> Result<Self, MaterialError> {
        let chain = certs("certificate", &files.cert, &raw.cert)?;
        let svid = inspect_svid(&chain[0]).map_err(|source| MaterialError::NotSvid {
            path: files.cert.clone(),
            source,
        })?;
        let missing = match (svid.server_auth, svid.client_auth) {
            (true, true) => None,
            (false, true) => Some("serverAuth"),
            (true, false) => Some("clientAuth"),
            (false, false) => Some("serverAuth and clientAuth"),
        };
        if let Some(missing) = missing {
            return Err(MaterialError::Purpose {
                path: files.cert.clone(),
                missing,
            });
        }
        if svid.id.trust_domain() != trust_domain {
            return Err(MaterialError::ForeignTrustDomain {
                path: files.cert.clone(),
                id: svid.id,
                trust_domain: trust_domain.clone(),
            });
        }
        let now = tapproof_identity::when::now();
        if svid.not_after < now {
            return Err(MaterialError::Expired {
                path: files.cert.clone(),
                not_after: svid.not_after,
                now,
            });
        }
        if svid.not_before > now {
            return Err(MaterialError::NotYetValid {
                path: files.cert.clone(),
                not_before: svid.not_before,
                now,
            });
        }

        let key = PrivateKeyDer::from_pem_slice(&raw.key).map_err(|e| MaterialError::NoKey {
            path: files.key.clone(),
            detail: e.to_string(),
        })?;
        let provider = crypto_provider(CryptoPolicy::PreferPostQuantum);
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| MaterialError::BadKey {
                path: files.key.clone(),
                detail: e.to_string(),
            })?;
        let certified = CertifiedKey::new(chain.clone(), signing_key);
        if certified.keys_match().is_err() {
            return Err(MaterialError::KeyMismatch {
                key: files.key.clone(),
                cert: files.cert.clone(),
            });
        }

        let anchors = certs("bundle", &files.bundle, &raw.bundle)?;
        let mut roots = RootCertStore::empty();
        for (index, anchor) in anchors.into_iter().enumerate() {
            roots.add(anchor).map_err(|e| MaterialError::BadAnchor {
                path: files.bundle.clone(),
                index,
                detail: e.to_string(),
            })?;
        }
        let parsed = ParsedCertificate::try_from(&chain[0]).map_err(|e| MaterialError::BadPem {
            what: "certificate",
            path: files.cert.clone(),
            detail: e.to_string(),
        })?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| MaterialError::Untrusted {
            cert: files.cert.clone(),
            bundle: files.bundle.clone(),
            detail: crate::tls_error_text(&e),
        })?;

        Ok(Self {
            certified: Arc::new(certified),
            roots: Arc::new(roots),
            trust_domain: trust_domain.clone(),
            svid,
            raw,
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.svid.id
    }

    pub fn svid(&self) -> &SvidInfo {
        &self.svid
    }

    /// Seconds until the leaf expires (negative once it has).
    pub fn seconds_to_expiry(&self) -> i64 {
        self.svid.not_after - tapproof_identity::when::now()
    }

    pub fn root_count(&self) -> usize {
        self.roots.len()
    }

    /// This identity as the SPIFFE Workload API hands it to a local workload: the chain (leaf
    /// first) and the bundle's roots as concatenated DER, the key as PKCS#8 DER.
    pub fn exported(&self) -> Result<ExportedSvid, ExportError> {
        let key = match PrivateKeyDer::from_pem_slice(&self.raw.key) {
            Ok(PrivateKeyDer::Pkcs8(k)) => k.secret_pkcs8_der().to_vec(),
            Ok(PrivateKeyDer::Sec1(_)) => return Err(ExportError::NotPkcs8("SEC1 (EC PRIVATE KEY)")),
            Ok(PrivateKeyDer::Pkcs1(_)) => return Err(ExportError::NotPkcs8("PKCS#1 (RSA PRIVATE KEY)")),
            Ok(_) => return Err(ExportError::NotPkcs8("an unknown format")),
            // It parsed when the material was loaded.
            Err(e) => return Err(ExportError::Unreadable(e.to_string())),
        };
        let der = |pem: &[u8]| -> Result<Vec<u8>, ExportError> {
            let mut out = Vec::new();
            for cert in CertificateDer::pem_slice_iter(pem) {
                out.extend_from_slice(&cert.map_err(|e| ExportError::Unreadable(e.to_string()))?);
            }
            Ok(out)
        };
        Ok(ExportedSvid {
            id: self.svid.id.clone(),
            chain_der: der(&self.raw.cert)?,
            key_pkcs8_der: key,
            bundle_der: der(&self.raw.bundle)?,
        })
    }
}

/// An X509-SVID in the Workload API's encoding (see [`Material::exported`]).
#[derive(Clone, PartialEq, Eq)]
pub struct ExportedSvid {
    pub id: SpiffeId,
    pub chain_der: Vec<u8>,
    pub key_pkcs8_der: Vec<u8>,
    pub bundle_der: Vec<u8>,
}

impl std::fmt::Debug for ExportedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ExportedSvid")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the key is {0}; the Workload API hands out PKCS#8 keys only (convert it with `openssl pkcs8 -topk8 -nocrypt`)")]
    NotPkcs8(&'static str),
    #[error("identity files no longer parse: {0}")]
    Unreadable(String),
}

/// The current material plus the files it came from; `reload` swaps in new material when the
/// files change and pass every check.
#[derive(Debug)]
pub struct ReloadingMaterial {
    files: IdentityFiles,
    trust_domain: TrustDomain,
    current: RwLock<Arc<Material>>,
    generation: AtomicU64,
}

impl ReloadingMaterial {
    pub fn load(files: IdentityFiles, trust_domain: TrustDomain) -> Result<Self, MaterialError> {
        let material = Material::load(&files, &trust_domain)?;
        Ok(Self {
            files,
            trust_domain,
            current: RwLock::new(Arc::new(material)),
            generation: AtomicU64::new(0),
        })
    }

    pub fn current(&self) -> Arc<Material> {
        // A poisoned lock only means a panic elsewhere while swapping an Arc; the Arc is intact.
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Bumped on every successful swap; lets users of the material rebuild their configs lazily.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn files(&self) -> &IdentityFiles {
        &self.files
    }

    /// Re-reads the files. `Ok(true)`: new material is in use. `Ok(false)`: nothing changed.
    /// `Err`: the files changed but fail a check; the previous material stays in use.
    pub fn reload(&self) -> Result<bool, MaterialError> {
        check_key_mode(&self.files.key)?;
        let raw = RawFiles {
            cert: read("certificate", &self.files.cert)?,
            key: read("key", &self.files.key)?,
            bundle: read("bundle", &self.files.bundle)?,
        };
        if raw == self.current().raw {
            return Ok(false);
        }
        let material = Material::from_raw(&self.files, &self.trust_domain, raw)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }
}

//! Test PKI: a trust domain's CA and node identities written to a temp directory, plus the odd
//! certificates the refusal tests need (expired, foreign trust domain, no SPIFFE ID, other CA).

use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use std::path::{Path, PathBuf};
use tapproof_identity::ca::leaf_params;
use tapproof_identity::{Authority, SpiffeId, TrustDomain};
use time::{Duration, OffsetDateTime};

pub const TD: &str = "example.org";

pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub td: TrustDomain,
    pub root: Authority,
    pub ca: Authority,
}

/// Paths of one identity on disk.
#[derive(Debug, Clone)]
pub struct IdentityPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

pub fn write_file(path: &Path, contents: &str, mode: u32) {
    tapproof_tls::write_identity_file(path, contents.as_bytes(), mode).unwrap();
}

impl TestPki {
    pub fn new() -> Self {
        Self::for_domain(TD)
    }

    pub fn for_domain(td: &str) -> Self {
        Self::with(td, tapproof_identity::KeyAlgorithm::EcdsaP256)
    }

    /// A PKI whose root, intermediate and leaf keys are all of `algorithm`.
    pub fn with(td: &str, algorithm: tapproof_identity::KeyAlgorithm) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tapproof-test-")
            .tempdir()
            .unwrap();
        let td = TrustDomain::new(td).unwrap();
        let root = Authority::new_root_with(td.clone(), Duration::days(1), algorithm).unwrap();
        let ca = root.new_intermediate(Duration::hours(12)).unwrap();
        write_file(&dir.path().join("bundle.pem"), root.cert_pem(), 0o644);
        Self { dir, td, root, ca }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn bundle(&self) -> PathBuf {
        self.path().join("bundle.pem")
    }

    pub fn id(&self, node: &str) -> SpiffeId {
        self.td.node_id(node).unwrap()
    }

    /// A node identity valid for an hour, written as `<file>.pem` / `<file>.key`.
    pub fn node(&self, node: &str) -> IdentityPaths {
        self.node_as(node, node)
    }

    /// Like `node`, under another file name (for a second identity of the same node).
    pub fn node_as(&self, node: &str, file: &str) -> IdentityPaths {
        let issued = self
            .ca
            .issue_with_new_key(&self.id(node), Duration::hours(1))
            .unwrap();
        self.write_identity(file, &issued.chain_pem, &issued.key_pem)
    }

    /// A service identity (`spiffe://<td>/svc/<name>`) valid for an hour, as `<name>.pem` /
    /// `<name>.key`.
    pub fn service(&self, name: &str) -> IdentityPaths {
        let issued = self
            .ca
            .issue_with_new_key(&self.td.service_id(name).unwrap(), Duration::hours(1))
            .unwrap();
        self.write_identity(name, &issued.chain_pem, &issued.key_pem)
    }

    pub fn write_identity(&self, file: &str, chain_pem: &str, key_pem: &str) -> IdentityPaths {
        let cert = self.path().join(format!("{file}.pem"));
        let key = self.path().join(format!("{file}.key"));
        write_file(&cert, chain_pem, 0o644);
        write_file(&key, key_pem, 0o600);
        IdentityPaths {
            cert,
            key,
            bundle: self.bundle(),
        }
    }

    /// Signs arbitrary leaf parameters with this PKI's intermediate (for certificates the
    /// `Authority` rightly refuses to make).
    pub fn custom(&self, file: &str, params: CertificateParams) -> IdentityPaths {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, self.ca.issuer()).unwrap();
        let inter = self.ca.cert_pem();
        self.write_identity(file, &format!("{}{inter}", cert.pem()), &key.serialize_pem())
    }

    pub fn expired(&self, node: &str) -> IdentityPaths {
        let mut p = leaf_params(
            &self.id(node),
            Duration::hours(1),
            OffsetDateTime::now_utc() + Duration::days(1),
        )
        .unwrap();
        p.not_before = OffsetDateTime::now_utc() - Duration::hours(2);
        p.not_after = OffsetDateTime::now_utc() - Duration::hours(1);
        self.custom(&format!("{node}-expired"), p)
    }

    /// A node certificate whose extendedKeyUsage is serverAuth only (it could accept tunnels but
    /// never open one).
    pub fn server_auth_only(&self, node: &str) -> IdentityPaths {
        let mut p = leaf_params(
            &self.id(node),
            Duration::hours(1),
            OffsetDateTime::now_utc() + Duration::days(1),
        )
        .unwrap();
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        self.custom(&format!("{node}-serverauth"), p)
    }

    pub fn foreign_domain(&self, node: &str) -> IdentityPaths {
        let id = TrustDomain::new("evil.example").unwrap().node_id(node).unwrap();
        let p = leaf_params(
            &id,
            Duration::hours(1),
            OffsetDateTime::now_utc() + Duration::days(1),
        )
        .unwrap();
        self.custom(&format!("{node}-foreign"), p)
    }

    pub fn without_spiffe_id(&self, node: &str) -> IdentityPaths {
        let mut p = leaf_params(
            &self.id(node),
            Duration::hours(1),
            OffsetDateTime::now_utc() + Duration::days(1),
        )
        .unwrap();
        p.subject_alt_names = vec![SanType::DnsName(
            format!("{node}.example.org").try_into().unwrap(),
        )];
        self.custom(&format!("{node}-nospiffe"), p)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

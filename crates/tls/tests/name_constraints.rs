//! Name-constrained SPIFFE intermediates (X509-SVID spec, section 4.2), built with the openssl
//! command line as an operator's PKI would build them, judged by tapproof (the identity-file
//! check and a real handshake, which both go through webpki's path building) and by
//! `openssl verify` side by side: the two must agree on every case, and both must match RFC
//! 5280's rule for URIs (the constraint applies to the URI's host, that is the trust domain).
//! The URI rule itself is tapproof's patch of rustls-webpki: third_party/rustls-webpki.

use std::path::{Path, PathBuf};
use std::process::Command;
use tapproof_identity::{SpiffeId, TrustDomain};
use tapproof_tls::{
    accept, connect, ClientTls, CryptoPolicy, IdentityFiles, Material, MaterialError, ServerTls,
};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed for this test (apt-get install openssl; scripts/test.sh does)");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A P-256 key and a CSR for it, then a certificate signed by `issuer` (None: self-signed)
/// with the extensions `ext` (an openssl extension section's lines).
fn cert(dir: &Path, name: &str, issuer: Option<&str>, ext: &str) {
    let key = format!("{name}.key");
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &key,
        ],
    );
    write(
        &dir.join(&key),
        &std::fs::read_to_string(dir.join(&key)).unwrap(),
        0o600,
    );
    let csr = format!("{name}.csr");
    let subj = format!("/O=tapproof test/OU={name}");
    openssl(dir, &["req", "-new", "-key", &key, "-subj", &subj, "-out", &csr]);
    let extfile = format!("{name}.ext");
    write(&dir.join(&extfile), &format!("[x]\n{ext}\n"), 0o644);
    let pem = format!("{name}.pem");
    let mut args = vec![
        "x509", "-req", "-in", &csr, "-days", "1", "-sha256", "-extfile", &extfile,
    ];
    args.extend(["-extensions", "x", "-out", &pem]);
    let (ca, ca_key);
    match issuer {
        Some(issuer) => {
            ca = format!("{issuer}.pem");
            ca_key = format!("{issuer}.key");
            args.extend(["-CA", &ca, "-CAkey", &ca_key, "-CAcreateserial"]);
        }
        None => args.extend(["-key", &key]),
    }
    openssl(dir, &args);
}

const CA_EXT: &str = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid";

fn leaf_ext(id: &str) -> String {
    format!(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,URI:{id}"
    )
}

/// Root, one intermediate per constraint, and for each leaf ID a leaf under each intermediate.
struct Pki {
    dir: tempfile::TempDir,
}

const INTERMEDIATES: [(&str, &str); 5] = [
    ("host", "nameConstraints=critical,permitted;URI:example.org"),
    ("domain", "nameConstraints=critical,permitted;URI:.example.org"),
    ("excluded", "nameConstraints=critical,excluded;URI:example.org"),
    ("dns-only", "nameConstraints=critical,permitted;DNS:example.org"),
    ("unconstrained", ""),
];

const LEAVES: [(&str, &str); 3] = [
    ("td", "spiffe://example.org/node/a"),
    ("sub", "spiffe://a.example.org/node/a"),
    ("other", "spiffe://other.org/node/a"),
];

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        cert(d, "root", None, "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash");
        for (int, constraint) in INTERMEDIATES {
            cert(d, int, Some("root"), &format!("{CA_EXT}\n{constraint}"));
            for (leaf, id) in LEAVES {
                let name = format!("{int}-{leaf}");
                cert(d, &name, Some(int), &leaf_ext(id));
                let chain = std::fs::read_to_string(d.join(format!("{name}.pem"))).unwrap()
                    + &std::fs::read_to_string(d.join(format!("{int}.pem"))).unwrap();
                write(&d.join(format!("{name}.chain.pem")), &chain, 0o644);
            }
        }
        Self { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn files(&self, name: &str) -> IdentityFiles {
        IdentityFiles {
            cert: self.path(&format!("{name}.chain.pem")),
            key: self.path(&format!("{name}.key")),
            bundle: self.path("root.pem"),
        }
    }

    fn load(&self, name: &str, id: &str) -> Result<Material, MaterialError> {
        let id = SpiffeId::parse(id).unwrap();
        Material::load(&self.files(name), id.trust_domain())
    }

    fn openssl_accepts(&self, int: &str, name: &str) -> bool {
        Command::new("openssl")
            .args(["verify", "-CAfile", "root.pem", "-untrusted"])
            .arg(format!("{int}.pem"))
            .arg(format!("{name}.pem"))
            .current_dir(self.dir.path())
            .output()
            .unwrap()
            .status
            .success()
    }
}

/// RFC 5280's verdict, written out: `host` permits exactly example.org, `domain` only names
/// below it, `excluded` everything but example.org; a DNS constraint does not touch URIs.
fn expected(int: &str, leaf: &str) -> bool {
    match (int, leaf) {
        ("host", l) => l == "td",
        ("domain", l) => l == "sub",
        ("excluded", l) => l != "td",
        ("dns-only" | "unconstrained", _) => true,
        _ => unreachable!(),
    }
}

#[test]
fn uri_name_constraints_are_judged_as_rfc_5280_and_openssl_do() {
    let pki = Pki::new();
    let mut table = Vec::new();
    for (int, _) in INTERMEDIATES {
        for (leaf, id) in LEAVES {
            let name = format!("{int}-{leaf}");
            let ours = pki.load(&name, id);
            let theirs = pki.openssl_accepts(int, &name);
            let want = expected(int, leaf);
            table.push(format!(
                "{name:24} tapproof {:6} openssl {:6} RFC 5280 {}",
                ours.is_ok(),
                theirs,
                want
            ));
            assert_eq!(theirs, want, "openssl on {name} ({id})");
            match (&ours, want) {
                (Ok(_), true) => {}
                (Err(MaterialError::Untrusted { detail, .. }), false) => {
                    assert!(detail.contains("name constraints"), "{name}: {detail}");
                    assert!(!detail.contains("NameConstraintViolation"), "{name}: {detail}");
                }
                (got, _) => panic!("{name} ({id}): want accepted = {want}, got {got:?}"),
            }
        }
    }
    println!("{}", table.join("\n"));
}

/// The handshake's verifiers (client and server side) take the same path: two nodes whose
/// certificates come from the URI-constrained intermediate open a tunnel to each other.
#[tokio::test]
async fn nodes_under_a_constrained_intermediate_shake_hands() {
    let pki = Pki::new();
    let td = TrustDomain::new("example.org").unwrap();
    let server_material = pki.load("host-td", "spiffe://example.org/node/a").unwrap();
    // A second leaf of the same node identity, under the same constrained intermediate.
    cert(
        pki.dir.path(),
        "host-td2",
        Some("host"),
        &leaf_ext("spiffe://example.org/node/b"),
    );
    let chain = std::fs::read_to_string(pki.path("host-td2.pem")).unwrap()
        + &std::fs::read_to_string(pki.path("host.pem")).unwrap();
    write(&pki.path("host-td2.chain.pem"), &chain, 0o644);
    let client_material = Material::load(&pki.files("host-td2"), &td).unwrap();

    let server = ServerTls::new(&server_material, CryptoPolicy::PreferPostQuantum).unwrap();
    let client = ClientTls::new(
        &client_material,
        td.node_id("a").unwrap(),
        CryptoPolicy::PreferPostQuantum,
    )
    .unwrap();
    let (a, b) = duplex(64 * 1024);
    let peer = "127.0.0.1:15008".parse().unwrap();
    let (c, s) = tokio::join!(connect(&client, a, peer), accept(&server, b));
    let (mut c, mut s) = (c.expect("client handshake"), s.expect("server handshake"));
    c.write_all(b"ping").await.unwrap();
    c.flush().await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

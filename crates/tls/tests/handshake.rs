//! TLS in memory: handshakes between tapproof's own client and server configs over in-process
//! pipes, including peers with the wrong identity and bytes tampered or cut on the way.

use std::net::SocketAddr;
use std::path::Path;
use tapproof_identity::{Authority, KeyAlgorithm, TrustDomain};
use tapproof_tls::{
    accept, client_session, connect, failure_reason, ClientTls, CryptoPolicy, ForeignRoots, IdentityFiles,
    Material, MaterialError, ServerTls,
};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

const PEER: &str = "127.0.0.1:15008";

struct Pki {
    dir: tempfile::TempDir,
    td: TrustDomain,
    ca: Authority,
    root_pem: String,
}

fn write(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Pki {
    fn new() -> Self {
        Self::of("example.org")
    }

    fn of(trust_domain: &str) -> Self {
        Self::with(trust_domain, KeyAlgorithm::EcdsaP256)
    }

    fn with(trust_domain: &str, algorithm: KeyAlgorithm) -> Self {
        let td = TrustDomain::new(trust_domain).unwrap();
        let root = Authority::new_root_with(td.clone(), time::Duration::days(1), algorithm).unwrap();
        let ca = root.new_intermediate(time::Duration::hours(2)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("bundle.pem"), root.cert_pem(), 0o644);
        Self {
            root_pem: root.cert_pem().to_owned(),
            dir,
            td,
            ca,
        }
    }

    fn files(&self, node: &str) -> IdentityFiles {
        let issued = self
            .ca
            .issue_with_new_key(&self.td.node_id(node).unwrap(), time::Duration::minutes(10))
            .unwrap();
        let cert = self.dir.path().join(format!("{node}.pem"));
        let key = self.dir.path().join(format!("{node}.key"));
        write(&cert, &issued.chain_pem, 0o644);
        write(&key, &issued.key_pem, 0o600);
        IdentityFiles {
            cert,
            key,
            bundle: self.dir.path().join("bundle.pem"),
        }
    }

    fn material(&self, node: &str) -> Material {
        Material::load(&self.files(node), &self.td).unwrap()
    }

    fn server(&self, node: &str) -> ServerTls {
        ServerTls::new(&self.material(node), CryptoPolicy::PreferPostQuantum).unwrap()
    }

    /// A client of this PKI's `node` that trusts `other`'s root (besides its own) and requires
    /// the server to be `expect` (so only the server's verdict on the client decides).
    fn client_trusting(&self, node: &str, other: &Pki, expect: &str) -> ClientTls {
        let mut files = self.files(node);
        files.bundle = self.dir.path().join("both.pem");
        write(
            &files.bundle,
            &format!("{}{}", self.root_pem, other.root_pem),
            0o644,
        );
        let material = Material::load(&files, &self.td).unwrap();
        ClientTls::new(
            &material,
            self.td.node_id(expect).unwrap(),
            CryptoPolicy::PreferPostQuantum,
        )
        .unwrap()
    }

    /// A client identified as `node` that requires the server to be `expect`.
    fn client(&self, node: &str, expect: &str) -> ClientTls {
        let expected = self.td.node_id(expect).unwrap();
        ClientTls::new(&self.material(node), expected, CryptoPolicy::PreferPostQuantum).unwrap()
    }
}

fn peer() -> SocketAddr {
    PEER.parse().unwrap()
}

#[tokio::test]
async fn mutual_handshake_negotiates_tls13_and_post_quantum() {
    let pki = Pki::new();
    let server = pki.server("db-1");
    let client = pki.client("web-1", "db-1");
    let (a, b) = duplex(64 * 1024);
    let (s, c) = tokio::join!(accept(&server, a), connect(&client, b, peer()));
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    let seen_by_server = tapproof_tls::server_session(&s);
    let seen_by_client = client_session(&c);
    assert_eq!(
        seen_by_server.peer_id.unwrap().to_string(),
        "spiffe://example.org/node/web-1"
    );
    assert_eq!(
        seen_by_client.peer_id.unwrap().to_string(),
        "spiffe://example.org/node/db-1"
    );
    assert_eq!(seen_by_client.version, "TLSv1.3");
    assert_eq!(seen_by_client.group, "X25519MLKEM768");
    assert_eq!(seen_by_client.cipher, "TLS_AES_256_GCM_SHA384");
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    let pki = Pki::new();
    let server = pki.server("db-2");
    let client = pki.client("web-1", "db-1");
    let (a, b) = duplex(64 * 1024);
    let (_, c) = tokio::join!(accept(&server, a), connect(&client, b, peer()));
    let Err(err) = c else {
        panic!("client must refuse db-2 when it expects db-1")
    };
    assert_eq!(failure_reason(&err), "wrong_peer_id");
    assert!(err.to_string().contains("db-2"), "{err}");
}

#[tokio::test]
async fn client_refuses_a_server_of_another_ca() {
    // Same trust domain name and node name, different CA: only the chain tells them apart.
    let pki = Pki::new();
    let stranger = Pki::new();
    let server = stranger.server("db-1");
    let client = pki.client("web-1", "db-1");
    let (a, b) = duplex(64 * 1024);
    let (s, c) = tokio::join!(accept(&server, a), connect(&client, b, peer()));
    assert_eq!(failure_reason(&c.err().unwrap()), "unknown_ca");
    assert_eq!(failure_reason(&s.err().unwrap()), "alert_received");
}

#[tokio::test]
async fn tampered_application_data_is_rejected() {
    let pki = Pki::new();
    let server = pki.server("db-1");
    let client = pki.client("web-1", "db-1");
    // client -> relay (c2s) -> server; server -> client direct.
    let (client_io, relay_in) = duplex(64 * 1024);
    let (relay_out, server_io) = duplex(64 * 1024);
    let (relay_in_r, relay_in_w) = tokio::io::split(relay_in);
    let (relay_out_r, relay_out_w) = tokio::io::split(relay_out);
    // Once armed (after the handshake), the relay flips the last byte of the next chunk from
    // the client: inside the AEAD tag of the first application-data record.
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let armed_relay = armed.clone();
    let c2s = tokio::spawn(async move {
        let mut r = relay_in_r;
        let mut w = relay_out_w;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if armed_relay.swap(false, std::sync::atomic::Ordering::SeqCst) {
                buf[n - 1] ^= 0x01;
            }
            if w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    let s2c = tokio::spawn(async move {
        let mut r = relay_out_r;
        let mut w = relay_in_w;
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    let (s, c) = tokio::join!(accept(&server, server_io), connect(&client, client_io, peer()));
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    c.write_all(&[b'x'; 1000]).await.unwrap();
    c.flush().await.unwrap();
    let mut buf = vec![0u8; 1000];
    let err = s
        .read_exact(&mut buf)
        .await
        .expect_err("a flipped bit must fail the AEAD check");
    assert_eq!(failure_reason(&err), "peer_misbehaved", "{err}");
    drop((s, c));
    c2s.abort();
    s2c.abort();
}

#[tokio::test]
async fn truncated_and_corrupted_handshakes_fail_cleanly() {
    let pki = Pki::new();
    let server = pki.server("db-1");
    let client = pki.client("web-1", "db-1");
    for (n, cut) in [
        (0, true),
        (3, true),
        (100, true),
        (5, false),
        (60, false),
        (300, false),
    ] {
        let (client_io, relay_a) = duplex(64 * 1024);
        let (relay_b, server_io) = duplex(64 * 1024);
        let (ra, wa) = tokio::io::split(relay_a);
        let (rb, wb) = tokio::io::split(relay_b);
        let relay = tokio::spawn(async move {
            let a = tokio::spawn(tamper_split(ra, wb, n, cut));
            let b = tokio::spawn(async move {
                let (mut r, mut w) = (rb, wa);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
            let _ = a.await;
            b.abort();
        });
        let (s, _c) = tokio::join!(
            tokio::time::timeout(std::time::Duration::from_secs(5), accept(&server, server_io)),
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                connect(&client, client_io, peer())
            ),
        );
        let s = s.expect("a broken handshake must end, not hang");
        assert!(
            s.is_err(),
            "byte {n} (cut={cut}): the server must not complete the handshake"
        );
        relay.abort();
    }
}

async fn tamper_split(
    mut from: tokio::io::ReadHalf<DuplexStream>,
    mut to: tokio::io::WriteHalf<DuplexStream>,
    n: usize,
    cut: bool,
) {
    let mut seen = 0;
    let mut buf = vec![0u8; 4096];
    loop {
        let got = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(g) => g,
        };
        let chunk = &mut buf[..got];
        if cut && seen + got > n {
            let _ = to.write_all(&chunk[..n - seen]).await;
            let _ = to.shutdown().await;
            return;
        }
        if !cut && seen <= n && n < seen + got {
            chunk[n - seen] ^= 0x01;
        }
        seen += got;
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}

#[test]
fn material_checks_name_the_problem() {
    let pki = Pki::new();
    let good = pki.files("web-1");
    Material::load(&good, &pki.td).unwrap();

    let other = TrustDomain::new("other.org").unwrap();
    assert!(matches!(
        Material::load(&good, &other),
        Err(MaterialError::ForeignTrustDomain { .. })
    ));

    let mismatched = IdentityFiles {
        key: pki.files("db-1").key,
        ..good.clone()
    };
    assert!(matches!(
        Material::load(&mismatched, &pki.td),
        Err(MaterialError::KeyMismatch { .. })
    ));

    let loose = pki.dir.path().join("loose.key");
    write(&loose, &std::fs::read_to_string(&good.key).unwrap(), 0o640);
    let e = Material::load(
        &IdentityFiles {
            key: loose,
            ..good.clone()
        },
        &pki.td,
    )
    .unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");

    let garbage = pki.dir.path().join("garbage.pem");
    write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        0o644,
    );
    let e = Material::load(
        &IdentityFiles {
            cert: garbage,
            ..good.clone()
        },
        &pki.td,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            MaterialError::BadPem { .. } | MaterialError::NoCertificates { .. }
        ),
        "{e}"
    );

    let empty = pki.dir.path().join("empty.pem");
    write(&empty, "", 0o644);
    assert!(matches!(
        Material::load(
            &IdentityFiles {
                bundle: empty,
                ..good.clone()
            },
            &pki.td
        ),
        Err(MaterialError::NoCertificates { .. })
    ));
    let _ = &pki.root_pem;
}

#[test]
fn control_client_from_files_names_the_leaf_and_the_missing_file() {
    let pki = Pki::new();
    let files = pki.files("alpha");
    let (_, id) = tapproof_tls::ControlClientTls::from_files(&files, Some(&pki.td)).unwrap();
    assert_eq!(id, pki.td.node_id("alpha").unwrap());
    let other = tapproof_identity::TrustDomain::new("other.example").unwrap();
    let err = tapproof_tls::ControlClientTls::from_files(&files, Some(&other))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not other.example"), "{err}");

    let missing = IdentityFiles {
        key: pki.dir.path().join("absent.key"),
        ..files
    };
    let err = tapproof_tls::ControlClientTls::from_files(&missing, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("absent.key"), "{err}");

    let garbage = pki.dir.path().join("garbage.pem");
    write(&garbage, "not a certificate", 0o644);
    let bad = IdentityFiles {
        cert: garbage,
        ..pki.files("beta")
    };
    let err = tapproof_tls::ControlClientTls::from_files(&bad, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("garbage.pem"), "{err}");
}

/// `of`'s roots, as the bundle of trust domain `td` (which need not be the one they issue for).
fn foreign(td: &str, of: &Pki) -> ForeignRoots {
    let mut roots = ForeignRoots::default();
    roots
        .insert_pem(TrustDomain::new(td).unwrap(), &of.root_pem)
        .unwrap();
    roots
}

/// SPIFFE federation: a node of example.org and one of partner.org, each holding the other's
/// bundle, open a tunnel with both identities checked; each domain's roots vouch only for it.
#[tokio::test]
async fn federated_trust_domains_shake_hands_and_each_root_vouches_only_for_its_domain() {
    let (ours, partner) = (Pki::new(), Pki::of("partner.org"));
    let server = ServerTls::federated(
        &partner.material("db-1"),
        &foreign("example.org", &ours),
        CryptoPolicy::PreferPostQuantum,
    )
    .unwrap();
    let db = partner.td.node_id("db-1").unwrap();
    let client = ClientTls::federated(
        &ours.material("web-1"),
        &foreign("partner.org", &partner),
        db.clone(),
        CryptoPolicy::PreferPostQuantum,
    )
    .unwrap();
    let (a, b) = duplex(64 * 1024);
    let (s, c) = tokio::join!(accept(&server, a), connect(&client, b, peer()));
    let (s, c) = (s.expect("server side"), c.expect("client side"));
    assert_eq!(
        tapproof_tls::server_session(&s).peer_id.unwrap().to_string(),
        "spiffe://example.org/node/web-1"
    );
    assert_eq!(client_session(&c).peer_id.unwrap(), db);

    // Without the other's bundle neither side trusts the other.
    let unfederated_server = partner.server("db-1");
    let (a, b) = duplex(64 * 1024);
    let (s, _) = tokio::join!(accept(&unfederated_server, a), connect(&client, b, peer()));
    assert_eq!(failure_reason(&s.err().unwrap()), "unknown_ca");
    let unfederated_client = ClientTls::new(
        &ours.material("web-1"),
        db.clone(),
        CryptoPolicy::PreferPostQuantum,
    )
    .unwrap();
    let (a, b) = duplex(64 * 1024);
    let (_, c) = tokio::join!(accept(&server, a), connect(&unfederated_client, b, peer()));
    assert_eq!(failure_reason(&c.err().unwrap()), "unknown_ca");

    // A CA trusted as partner.org's cannot vouch for an example.org identity: a server of
    // example.org that federates with "partner.org" (whose bundle is in truth an impostor's root
    // issuing example.org IDs) refuses the impostor's client, and a client expecting an
    // example.org peer refuses the impostor's server.
    let impostor = Pki::of("example.org");
    let server = ServerTls::federated(
        &ours.material("db-1"),
        &foreign("partner.org", &impostor),
        CryptoPolicy::PreferPostQuantum,
    )
    .unwrap();
    let client = impostor.client_trusting("web-1", &ours, "db-1");
    let (a, b) = duplex(64 * 1024);
    let (s, _) = tokio::join!(accept(&server, a), connect(&client, b, peer()));
    assert_eq!(failure_reason(&s.err().unwrap()), "unknown_ca");
    let client = ClientTls::federated(
        &ours.material("web-1"),
        &foreign("partner.org", &impostor),
        ours.td.node_id("db-1").unwrap(),
        CryptoPolicy::PreferPostQuantum,
    )
    .unwrap();
    let (a, b) = duplex(64 * 1024);
    let impostor_server = impostor.server("db-1");
    let (_, c) = tokio::join!(accept(&impostor_server, a), connect(&client, b, peer()));
    assert_eq!(failure_reason(&c.err().unwrap()), "unknown_ca");
    // Nor can a federation entry re-root our own domain.
    let server = ServerTls::federated(
        &ours.material("db-1"),
        &foreign("example.org", &impostor),
        CryptoPolicy::PreferPostQuantum,
    )
    .unwrap();
    let (a, b) = duplex(64 * 1024);
    let impostor_client = impostor.client_trusting("web-1", &ours, "db-1");
    let (s, _) = tokio::join!(accept(&server, a), connect(&impostor_client, b, peer()));
    assert_eq!(failure_reason(&s.err().unwrap()), "unknown_ca");
}

/// Both ends update their keys every 64 KiB: a 2 MiB transfer each way arrives intact (a key
/// update either end got wrong would fail the next record's AEAD check) and each end counts the
/// updates it sent.
#[tokio::test]
async fn scheduled_key_updates_keep_a_long_transfer_intact() {
    use sha2::{Digest, Sha256};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tapproof_tls::{KeySchedule, KeyUpdateReason, Rekeying};

    let pki = Pki::new();
    let server = pki.server("db-1");
    let client = pki.client("web-1", "db-1");
    let (a, b) = duplex(256 * 1024);
    let (s, c) = tokio::join!(accept(&server, a), connect(&client, b, peer()));
    let schedule = KeySchedule {
        bytes: 64 * 1024,
        interval: std::time::Duration::from_secs(3600),
    };
    let counter = |n: &Arc<AtomicU64>| {
        let n = n.clone();
        Box::new(move |why: KeyUpdateReason| {
            assert_eq!(why, KeyUpdateReason::Bytes);
            n.fetch_add(1, Ordering::Relaxed);
        }) as tapproof_tls::OnKeyUpdate
    };
    let (sent_c, sent_s) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let c = Rekeying::new(c.unwrap(), schedule, counter(&sent_c));
    let s = Rekeying::new(s.unwrap(), schedule, counter(&sent_s));
    const LEN: usize = 2 * 1024 * 1024;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + i / 4099) as u8).collect();
    let want = Sha256::digest(&data);
    let (got_s, got_c) = tokio::join!(exchange(s, data.clone()), exchange(c, data));
    assert_eq!(got_s, want, "server received the client's bytes intact");
    assert_eq!(got_c, want, "client received the server's bytes intact");
    let (c_n, s_n) = (sent_c.load(Ordering::Relaxed), sent_s.load(Ordering::Relaxed));
    assert!(
        (28..=32).contains(&c_n),
        "client sent {c_n} key updates for 2 MiB at 64 KiB each"
    );
    assert!(
        (28..=32).contains(&s_n),
        "server sent {s_n} key updates for 2 MiB at 64 KiB each"
    );
}

/// Writes `data` and reads as many bytes back from the other end, at once; the digest of what
/// was read.
async fn exchange<S>(io: S, data: Vec<u8>) -> sha2::digest::Output<sha2::Sha256>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    use sha2::Digest;
    let len = data.len();
    let (mut r, mut w) = tokio::io::split(io);
    let send = async move {
        for chunk in data.chunks(10_000) {
            w.write_all(chunk).await.unwrap();
        }
        w.flush().await.unwrap();
        w
    };
    let recv = async move {
        let mut got = vec![0u8; len];
        r.read_exact(&mut got).await.unwrap();
        sha2::Sha256::digest(&got)
    };
    tokio::join!(send, recv).1
}

/// A pair on the `cnsa2` profile: ML-DSA-87 identities from an ML-DSA-87 CA, and the handshake
/// can only be TLS 1.3 with TLS_AES_256_GCM_SHA384 and ML-KEM-1024.
#[tokio::test]
async fn cnsa2_peers_use_aes_256_ml_kem_1024_and_ml_dsa_87() {
    let pki = Pki::with("example.org", KeyAlgorithm::MlDsa87);
    let server = ServerTls::new(&pki.material("db-1"), CryptoPolicy::Cnsa2).unwrap();
    let expected = pki.td.node_id("db-1").unwrap();
    let client = ClientTls::new(&pki.material("web-1"), expected, CryptoPolicy::Cnsa2).unwrap();
    let (a, b) = duplex(64 * 1024);
    let (s, c) = tokio::join!(accept(&server, a), connect(&client, b, peer()));
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    for seen in [client_session(&c), tapproof_tls::server_session(&s)] {
        assert_eq!(
            (seen.version.as_str(), seen.cipher.as_str(), seen.group.as_str()),
            ("TLSv1.3", "TLS_AES_256_GCM_SHA384", "MLKEM1024")
        );
    }
    c.write_all(b"cnsa").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"cnsa");
}

/// Mixed fleets: a `cnsa2` node and a `default` one agree on what both allow (ML-KEM-1024,
/// AES-256-GCM, ML-DSA-87) when the default one has an ML-DSA-87 identity, and otherwise the
/// handshake fails with a named reason; never anything weaker than `cnsa2` allows.
#[tokio::test]
async fn a_cnsa2_node_and_a_default_one_agree_on_cnsa2_or_refuse_naming_why() {
    let pq = Pki::with("example.org", KeyAlgorithm::MlDsa87);
    // A default-profile node with an ML-DSA-87 identity: the cnsa2 server's terms.
    let server = ServerTls::new(&pq.material("db-1"), CryptoPolicy::Cnsa2).unwrap();
    let client = ClientTls::new(
        &pq.material("web-1"),
        pq.td.node_id("db-1").unwrap(),
        CryptoPolicy::PreferPostQuantum,
    )
    .unwrap();
    let (a, b) = duplex(64 * 1024);
    let (s, c) = tokio::join!(accept(&server, a), connect(&client, b, peer()));
    let (_s, c) = (s.unwrap(), c.unwrap());
    let seen = client_session(&c);
    assert_eq!(
        (seen.cipher.as_str(), seen.group.as_str()),
        ("TLS_AES_256_GCM_SHA384", "MLKEM1024")
    );

    // A default node with an ECDSA identity, trusting both roots (a fleet mid-rollover).
    let ec = Pki::new();
    let mut files = ec.files("web-2");
    files.bundle = ec.dir.path().join("both.pem");
    write(&files.bundle, &format!("{}{}", ec.root_pem, pq.root_pem), 0o644);
    let ecdsa = Material::load(&files, &ec.td).unwrap();
    // As the client of a cnsa2 server: it cannot sign what the server asks.
    let client = ClientTls::new(
        &ecdsa,
        pq.td.node_id("db-1").unwrap(),
        CryptoPolicy::PreferPostQuantum,
    )
    .unwrap();
    let (a, b) = duplex(64 * 1024);
    let (s, c) = tokio::join!(accept(&server, a), connect(&client, b, peer()));
    let s = s.expect_err("the cnsa2 server refuses an ECDSA client");
    assert_eq!(failure_reason(&s), "no_client_cert", "{s}");
    // (TLS 1.3: the client finishes before the server's verdict; its first read gets it.)
    if let Ok(mut c) = c {
        let mut one = [0u8; 1];
        assert!(!matches!(c.read(&mut one).await, Ok(n) if n > 0));
    }
    // As the server of a cnsa2 client: no signature scheme the client accepts.
    let server = ServerTls::new(&ecdsa, CryptoPolicy::PreferPostQuantum).unwrap();
    let client = ClientTls::new(
        &pq.material("web-1"),
        ec.td.node_id("web-2").unwrap(),
        CryptoPolicy::Cnsa2,
    )
    .unwrap();
    let (a, b) = duplex(64 * 1024);
    let (s, c) = tokio::join!(accept(&server, a), connect(&client, b, peer()));
    let s = s.expect_err("no common signature");
    assert_eq!(failure_reason(&s), "no_common_signature", "{s}");
    assert_eq!(failure_reason(&c.err().unwrap()), "alert_received");

    // A cnsa2 config refuses an identity whose key cannot sign ML-DSA-87, naming the profile.
    let e = ServerTls::new(&ecdsa, CryptoPolicy::Cnsa2).err().unwrap();
    assert!(e.to_string().contains("does not fit crypto profile cnsa2"), "{e}");
}

/// Serves `tls` on a loopback port: after a handshake it answers with an HTTP/2 SETTINGS frame,
/// as a tunnel listener does. Returns the address.
async fn tunnel_like_listener(tls: ServerTls) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = accept(&tls, tcp).await {
                    let _ = s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                    let mut sink = [0u8; 256];
                    let _ = s.read(&mut sink).await;
                }
            });
        }
    });
    addr
}

/// The self-test probes against a real tapproof listener: each is refused, for its own reason;
/// the classical-only key exchange is refused where post-quantum is required and not run where
/// it is not.
#[tokio::test]
async fn self_test_probes_are_refused_by_a_tapproof_listener() {
    use tapproof_tls::selftest::{run, Probe, Verdict};
    let pki = Pki::new();
    let material = pki.material("db-1");
    let wait = std::time::Duration::from_secs(5);
    for policy in [CryptoPolicy::PreferPostQuantum, CryptoPolicy::RequirePostQuantum] {
        let addr = tunnel_like_listener(ServerTls::new(&material, policy).unwrap()).await;
        for probe in Probe::ALL {
            let verdict = run(probe, addr, &material, policy, wait).await;
            let want = if probe == Probe::ClassicalKeyExchange && policy == CryptoPolicy::PreferPostQuantum {
                "not_applicable"
            } else {
                "refused"
            };
            assert_eq!(verdict.result(), want, "{policy:?} {}: {verdict:?}", probe.name());
            if probe == Probe::WrongIdentity {
                assert_eq!(verdict, Verdict::Refused("wrong_peer_id".into()));
            }
        }
    }
}

/// A listener that takes what it must refuse makes the probes say `accepted` (the alarm): here
/// a TLS server that asks no client certificate and speaks TLS 1.2 too, and a plaintext one.
#[tokio::test]
async fn self_test_probes_report_a_listener_that_accepts_them() {
    use tapproof_tls::selftest::{run, Probe, Verdict};
    let pki = Pki::new();
    let material = pki.material("db-1");
    let wait = std::time::Duration::from_secs(5);
    let issued = pki
        .ca
        .issue_with_new_key(&pki.td.node_id("lax").unwrap(), time::Duration::minutes(5))
        .unwrap();
    use tapproof_tls::rustls::pki_types::pem::PemObject;
    let chain = tapproof_tls::rustls::pki_types::CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key =
        tapproof_tls::rustls::pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let config = tapproof_tls::rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        tapproof_tls::rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(tapproof_tls::rustls::ALL_VERSIONS)
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lax = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(tcp).await {
                    let _ = s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                    let mut sink = [0u8; 256];
                    let _ = s.read(&mut sink).await;
                }
            });
        }
    });
    for probe in [Probe::Tls12, Probe::NoClientCert, Probe::ForeignCa] {
        let verdict = run(probe, lax, &material, CryptoPolicy::PreferPostQuantum, wait).await;
        assert_eq!(verdict, Verdict::Accepted, "{}", probe.name());
    }
    // A plaintext HTTP/2 server answers the preface with its SETTINGS.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let _ = tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
        let mut sink = [0u8; 256];
        let _ = tcp.read(&mut sink).await;
    });
    let verdict = run(
        Probe::Plaintext,
        plain,
        &material,
        CryptoPolicy::PreferPostQuantum,
        wait,
    )
    .await;
    assert_eq!(verdict, Verdict::Accepted);
}

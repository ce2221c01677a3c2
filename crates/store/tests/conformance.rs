//! One conformance suite, run against every backend: SQLite always, PostgreSQL when
//! TAPPROOF_TEST_POSTGRES names a server where we may create databases (scripts/postgres.sh sets
//! one up; under CI=true it is required). "Two replicas" are two store instances on one database.

use std::sync::Arc;
use tapproof_store::*;

struct Db {
    url: String,
    /// PostgreSQL: (admin URL, database name) to drop afterwards.
    pg: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    async fn open(&self) -> Arc<dyn Store> {
        open(&self.url).await.unwrap()
    }

    async fn raw(&self, sql: &str) {
        if self.pg.is_some() {
            let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
            sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        } else {
            let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", self.url))
                .await
                .unwrap();
            sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        }
    }

    async fn drop_db(self) {
        if let Some((admin, name)) = self.pg {
            let pool = sqlx::PgPool::connect(&admin).await.unwrap();
            let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&pool)
                .await;
        }
    }
}

async fn sqlite() -> Option<Db> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tapproof.db");
    Some(Db {
        url: path.display().to_string(),
        pg: None,
        _dir: Some(dir),
    })
}

async fn postgres() -> Option<Db> {
    let Ok(admin) = std::env::var("TAPPROOF_TEST_POSTGRES") else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the PostgreSQL conformance suite: set TAPPROOF_TEST_POSTGRES (scripts/postgres.sh)"
        );
        eprintln!(
            "SKIPPED PostgreSQL conformance: TAPPROOF_TEST_POSTGRES is not set (run scripts/postgres.sh)"
        );
        return None;
    };
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "tapproof_test_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let pool = sqlx::PgPool::connect(&admin)
        .await
        .expect("connect to TAPPROOF_TEST_POSTGRES");
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .unwrap();
    let base = admin.rsplit_once('/').unwrap().0;
    Some(Db {
        url: format!("{base}/{name}"),
        pg: Some((admin, name)),
        _dir: None,
    })
}

fn ca(state: CaState) -> NewCa {
    NewCa {
        kind: CaKind::Root,
        parent_id: None,
        cert_pem: "-----BEGIN CERTIFICATE-----\n...".into(),
        key_sealed: vec![1, 2, 3],
        state,
        not_after: 2_000_000_000,
        created_at: 1_700_000_000,
    }
}

fn token(id: &str, secret: &[u8; 32], expires_at: i64) -> NewToken {
    NewToken {
        id: id.into(),
        secret_hash: *secret,
        node: "web-1".into(),
        pattern: false,
        services: vec!["web".into(), "api".into()],
        expires_at,
        created_at: 100,
        max_uses: 1,
    }
}

fn cert(serial: &str) -> IssuedCert {
    IssuedCert {
        serial: serial.into(),
        spiffe_id: "spiffe://example.org/node/web-1".into(),
        node: "web-1".into(),
        not_before: 1,
        not_after: 2,
        issued_at: 1,
    }
}

async fn migrations_are_idempotent(db: &Db) {
    let a = db.open().await;
    a.ca_insert(ca(CaState::Active)).await.unwrap();
    drop(a);
    let b = db.open().await;
    assert_eq!(
        b.ca_list().await.unwrap().len(),
        1,
        "reopening keeps data and migrates nothing twice"
    );
}

async fn cas_round_trip(db: &Db) {
    let s = db.open().await;
    let root = s.ca_insert(ca(CaState::Active)).await.unwrap();
    let next = s
        .ca_insert(NewCa {
            parent_id: Some(root),
            kind: CaKind::Intermediate,
            ..ca(CaState::Prepared)
        })
        .await
        .unwrap();
    s.ca_set_state(next, CaState::Active).await.unwrap();
    s.ca_set_state(root, CaState::Retired).await.unwrap();
    let all = s.ca_list().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].state, all[1].state), (CaState::Retired, CaState::Active));
    assert_eq!(all[1].parent_id, Some(root));
    assert_eq!(all[0].key_sealed, vec![1, 2, 3]);
    assert!(matches!(
        s.ca_set_state(999, CaState::Active).await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn tokens_are_single_use(db: &Db) {
    let s = db.open().await;
    let secret = [7u8; 32];
    s.token_insert(token("t1", &secret, 1_000)).await.unwrap();
    assert!(matches!(
        s.token_insert(token("t1", &secret, 1_000)).await,
        Err(StoreError::Duplicate { .. })
    ));
    assert_eq!(
        s.token_consume("t1", &[8u8; 32], 500).await.unwrap_err().code(),
        "token_invalid",
        "a wrong secret is refused"
    );
    let used = s
        .token_consume("t1", &secret, 500)
        .await
        .expect("a wrong secret must not burn the token");
    assert_eq!(used.services, vec!["web", "api"]);
    assert_eq!(used.used_at, Some(500));
    assert!(matches!(
        s.token_consume("t1", &secret, 501).await,
        Err(StoreError::Token(TokenRejection::AlreadyUsed { at: 500 }))
    ));
    s.token_insert(token("t2", &secret, 1_000)).await.unwrap();
    assert!(matches!(
        s.token_consume("t2", &secret, 1_000).await,
        Err(StoreError::Token(TokenRejection::Expired { .. }))
    ));
    assert!(matches!(
        s.token_consume("nope", &secret, 1).await,
        Err(StoreError::Token(TokenRejection::Unknown))
    ));
}

async fn a_token_is_used_once_across_replicas(db: &Db) {
    let (a, b) = (db.open().await, db.open().await);
    let secret = [9u8; 32];
    a.token_insert(token("race", &secret, 10_000)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(
            async move { s.token_consume("race", &secret, 5).await },
        ));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Token(TokenRejection::AlreadyUsed { .. })) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(ok, 1, "exactly one replica may consume the token");
}

/// A reusable token (a pattern, a bounded number of uses): of 16 concurrent joins on two
/// replicas exactly `max_uses` win, each counted; then it is spent.
async fn a_reusable_token_has_exactly_its_uses(db: &Db) {
    let (a, b) = (db.open().await, db.open().await);
    let secret = [5u8; 32];
    a.token_insert(NewToken {
        node: "web-*".into(),
        pattern: true,
        max_uses: 3,
        ..token("many", &secret, 10_000)
    })
    .await
    .unwrap();
    let checked = b.token_check("many", &secret, 5).await.unwrap();
    assert!(
        checked.pattern && checked.max_uses == 3 && checked.uses == 0,
        "{checked:?}"
    );
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(
            async move { s.token_consume("many", &secret, 5).await },
        ));
    }
    let mut uses = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(t) => uses.push(t.uses),
            Err(StoreError::Token(TokenRejection::UsesSpent { max: 3, .. })) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    uses.sort();
    assert_eq!(uses, vec![1, 2, 3], "each use counted once");
    assert!(matches!(
        a.token_check("many", &secret, 6).await,
        Err(StoreError::Token(TokenRejection::UsesSpent { max: 3, .. }))
    ));
}

async fn serials_are_unique_across_replicas(db: &Db) {
    let (a, b) = (db.open().await, db.open().await);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (a, b) = (a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            a.cert_record(cert(&format!("A{i:04}"))).await.unwrap();
            b.cert_record(cert(&format!("B{i:04}"))).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(a.cert_list("web-1").await.unwrap().len(), 200);
    assert_eq!(
        a.cert_count_live(1, 1).await.unwrap(),
        200,
        "issued at 1, valid until 2"
    );
    assert_eq!(a.cert_count_live(1, 2).await.unwrap(), 0, "expired at 2");
    assert_eq!(a.cert_count_live(0, 1).await.unwrap(), 0, "none issued by 0");
    assert!(matches!(
        b.cert_record(cert("A0001")).await,
        Err(StoreError::Duplicate {
            what: "certificate serial",
            ..
        })
    ));
}

async fn nodes_registrations_revocations(db: &Db) {
    let s = db.open().await;
    let n = s
        .node_upsert("web-1", "spiffe://example.org/node/web-1", 10)
        .await
        .unwrap();
    assert_eq!((n.created_at, n.last_seen, n.revoked_at), (10, Some(10), None));
    let n = s
        .node_upsert("web-1", "spiffe://example.org/node/web-1", 20)
        .await
        .unwrap();
    assert_eq!(
        (n.created_at, n.last_seen),
        (10, Some(20)),
        "upsert keeps the creation time"
    );
    s.node_seen("web-1", 30).await.unwrap();
    assert!(s.node_set_tunnel("web-1", "10.0.0.1:15008").await.unwrap());
    assert!(
        !s.node_set_tunnel("web-1", "10.0.0.1:15008").await.unwrap(),
        "unchanged is not a change"
    );
    assert_eq!(
        s.node_get("web-1").await.unwrap().unwrap().tunnel_addr.as_deref(),
        Some("10.0.0.1:15008")
    );
    let v = s.change_version().await.unwrap();
    s.notify_change().await.unwrap();
    assert!(
        s.change_version().await.unwrap() > v,
        "every notice bumps the feed version"
    );
    assert_eq!(s.node_get("web-1").await.unwrap().unwrap().last_seen, Some(30));
    assert!(s.node_get("nope").await.unwrap().is_none());

    assert!(s.registration_add("web-1", "web").await.unwrap());
    assert!(!s.registration_add("web-1", "web").await.unwrap());
    assert!(s.registration_add("web-1", "api").await.unwrap());
    assert!(s.registration_remove("web-1", "api").await.unwrap());
    assert!(!s.registration_remove("web-1", "api").await.unwrap());
    assert_eq!(
        s.registrations().await.unwrap(),
        vec![Registration {
            node: "web-1".into(),
            service: "web".into(),
            addresses: Vec::new(),
        }]
    );
    // Announced addresses: set per registered service, sorted; unregistered services ignored;
    // the same set again changes nothing; a service left out loses its addresses.
    let announce = |pairs: &[(&str, &[&str])]| -> std::collections::BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(s, a)| (s.to_string(), a.iter().map(|x| x.to_string()).collect()))
            .collect()
    };
    let both = announce(&[
        ("web", &["[fd00::2]:80", "10.0.0.2:80"]),
        ("other", &["10.0.0.9:1"]),
    ]);
    assert!(s.registration_set_addresses("web-1", &both).await.unwrap());
    assert!(!s.registration_set_addresses("web-1", &both).await.unwrap());
    assert_eq!(
        s.registrations().await.unwrap()[0].addresses,
        ["10.0.0.2:80", "[fd00::2]:80"]
    );
    assert!(!s.registration_set_addresses("nobody", &both).await.unwrap());
    assert!(s
        .registration_set_addresses("web-1", &announce(&[]))
        .await
        .unwrap());
    assert!(s.registrations().await.unwrap()[0].addresses.is_empty());

    let r = s
        .revoke(RevocationKind::Node, "web-1", "stolen", 40)
        .await
        .unwrap();
    let again = s
        .revoke(RevocationKind::Node, "web-1", "again", 50)
        .await
        .unwrap();
    assert_eq!(r, again, "revoking twice keeps the first record");
    s.revoke(RevocationKind::Serial, "ABCD", "leaked key", 41)
        .await
        .unwrap();
    assert_eq!(s.revocations().await.unwrap().len(), 2);
    assert_eq!(s.node_get("web-1").await.unwrap().unwrap().revoked_at, Some(40));

    // Propagation: a revocation keeps the version of the first document that carried it, and a
    // node acknowledges each one once.
    assert!(s.revocations().await.unwrap().iter().all(|r| r.version.is_none()));
    assert!(
        s.revocation_ack("db-1", 99, 60).await.unwrap().is_empty(),
        "nothing carried yet"
    );
    s.revocations_stamp(5, r.id).await.unwrap();
    s.revocations_stamp(6, i64::MAX).await.unwrap();
    s.revocations_stamp(7, i64::MAX).await.unwrap();
    let versions: Vec<_> = s.revocations().await.unwrap().iter().map(|r| r.version).collect();
    assert_eq!(
        versions,
        [Some(5), Some(6)],
        "first carrier kept, id bound honoured"
    );
    assert_eq!(s.revocation_ack("db-1", 5, 61).await.unwrap(), [r.id]);
    assert!(s.revocation_ack("db-1", 5, 62).await.unwrap().is_empty(), "once");
    let serial = s.revocations().await.unwrap()[1].id;
    assert_eq!(s.revocation_ack("db-1", 9, 63).await.unwrap(), [serial]);
    assert_eq!(s.revocation_ack("db-2", 9, 64).await.unwrap().len(), 2);
    let acks = s.revocation_acks().await.unwrap();
    let seen: Vec<_> = acks
        .iter()
        .map(|a| (a.revocation_id, a.node.as_str(), a.applied_at))
        .collect();
    assert_eq!(
        seen,
        [
            (r.id, "db-1", 61),
            (r.id, "db-2", 64),
            (serial, "db-1", 63),
            (serial, "db-2", 64)
        ]
    );
    assert_eq!(s.node_list().await.unwrap().len(), 1);

    assert_eq!(s.policy_get().await.unwrap(), None);
    s.policy_set("{\"db\":[]}", 1).await.unwrap();
    s.policy_set("{\"db\":[\"spiffe://example.org/node/web-1\"]}", 2)
        .await
        .unwrap();
    assert_eq!(
        s.policy_get().await.unwrap().as_deref(),
        Some("{\"db\":[\"spiffe://example.org/node/web-1\"]}")
    );
}

async fn audit_chain_holds_under_concurrency_and_finds_edits(db: &Db) {
    let (a, b) = (db.open().await, db.open().await);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let e = NewAudit {
                actor: format!("replica-{}", i % 2),
                action: "test.event".into(),
                details: serde_json::json!({ "i": i }),
            };
            s.audit_append(e, 1_000 + i).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rows = a.audit_list(0, 1_000).await.unwrap();
    assert_eq!(rows.len(), 40);
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>()
    );
    verify_chain(&rows, (0, GENESIS_HASH.to_vec())).expect("the chain of concurrent appends is intact");
    assert_eq!(a.audit_list(38, 10).await.unwrap().len(), 2);

    db.raw("UPDATE audit_log SET details = '{\"i\":999}' WHERE seq = 7")
        .await;
    let problems =
        verify_chain(&a.audit_list(0, 1_000).await.unwrap(), (0, GENESIS_HASH.to_vec())).unwrap_err();
    assert_eq!(problems, vec![AuditProblem::Edited { seq: 7 }]);

    db.raw("DELETE FROM audit_log WHERE seq = 20").await;
    let problems =
        verify_chain(&a.audit_list(0, 1_000).await.unwrap(), (0, GENESIS_HASH.to_vec())).unwrap_err();
    assert!(
        problems.contains(&AuditProblem::Gap {
            seq: 21,
            expected: 20
        }),
        "{problems:?}"
    );
    assert!(
        problems.contains(&AuditProblem::BrokenLink { seq: 21, prev: 19 }),
        "{problems:?}"
    );
}

async fn refuses_a_newer_schema(db: &Db) {
    drop(db.open().await);
    db.raw(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (999, 'from the future', TRUE, x'00', 0)"
            .replace(
                "x'00'",
                if db.pg.is_some() {
                    "'\\x00'::bytea"
                } else {
                    "x'00'"
                },
            )
            .as_str(),
    )
    .await;
    let err = open(&db.url).await.err().expect("a newer schema must be refused");
    assert!(
        matches!(
            err,
            StoreError::NewerSchema {
                found: 999,
                known: SCHEMA_VERSION
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade tapproof"));
}

async fn change_notices_wake_listeners(db: &Db) {
    let (a, b) = (db.open().await, db.open().await);
    let mut listener = a.listen_changes().await.unwrap();
    let notifier = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        b.notify_change().await.unwrap();
    });
    let started = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(5), listener.next())
        .await
        .expect("a change notice (or, on SQLite, the one-second look) wakes the listener");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "woken in {:?}",
        started.elapsed()
    );
    notifier.await.unwrap();
}

async fn coverage_history_and_latest(db: &Db) {
    let (a, b) = (db.open().await, db.open().await);
    let report = |node: &str, at: i64, links: i64, encrypted: i64| NewCoverage {
        node: node.into(),
        at,
        links,
        encrypted,
        plaintext: links - encrypted,
        capture_mode: (node == "web-1").then(|| "monitor".to_owned()),
        plaintext_attempts: i64::from(node == "web-1") * 3,
        report: format!("{{\"node\": \"{node}\", \"at\": {at}}}"),
    };
    a.coverage_add(report("db-1", 100, 4, 3)).await.unwrap();
    b.coverage_add(report("web-1", 110, 2, 2)).await.unwrap();
    a.coverage_add(report("db-1", 120, 4, 4)).await.unwrap();
    let latest = b.coverage_latest().await.unwrap();
    let got: Vec<_> = latest
        .iter()
        .map(|r| (r.point.node.as_str(), r.point.at, r.point.encrypted))
        .collect();
    assert_eq!(got, vec![("db-1", 120, 4), ("web-1", 110, 2)]);
    assert!(latest[0].report.contains("\"at\": 120"));
    let history = a.coverage_history(105).await.unwrap();
    let got: Vec<_> = history
        .iter()
        .map(|p| {
            (
                p.node.as_str(),
                p.at,
                p.capture_mode.as_deref(),
                p.plaintext_attempts,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![("web-1", 110, Some("monitor"), 3), ("db-1", 120, None, 0)]
    );
    for i in 0..3 {
        a.audit_append(
            NewAudit {
                actor: "t".into(),
                action: format!("a{i}"),
                details: serde_json::json!({}),
            },
            i,
        )
        .await
        .unwrap();
    }
    let tail = b.audit_tail(2).await.unwrap();
    assert_eq!(
        tail.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        vec!["a2", "a1"]
    );
}

async fn handshake_records_are_kept_once_and_pruned(db: &Db) {
    let s = db.open().await;
    let row = |node: &str, at_ms: i64, seq: i64| HandshakeRow {
        node: node.into(),
        at_ms,
        seq,
        side: "inbound".into(),
        local_addr: "10.0.0.1:15008".into(),
        remote_addr: "10.0.0.2:40000".into(),
        local_id: format!("spiffe://example.org/node/{node}"),
        local_serial: "AB".into(),
        peer_id: Some("spiffe://example.org/node/web-1".into()),
        peer_serial: Some("CD".into()),
        tls_version: Some("TLSv1.3".into()),
        cipher: Some("TLS_AES_256_GCM_SHA384".into()),
        group: Some("X25519MLKEM768".into()),
        signature_scheme: Some("ecdsa_secp256r1_sha256".into()),
        resumed: seq % 2 == 1,
        outcome: "ok".into(),
        reason: None,
    };
    // More rows than one INSERT takes (500), so the chunking is exercised.
    let many: Vec<_> = (0..1200).map(|i| row("db-1", 1_000 + i, i)).collect();
    assert_eq!(s.handshakes_add(&many, 5).await.unwrap(), 1200);
    assert_eq!(
        s.handshakes_add(&many[..10], 6).await.unwrap(),
        0,
        "an upload sent twice"
    );
    let refused = HandshakeRow {
        outcome: "refused".into(),
        reason: Some("unknown_ca".into()),
        peer_id: None,
        tls_version: None,
        ..row("db-2", 1_500, 0)
    };
    assert_eq!(
        s.handshakes_add(std::slice::from_ref(&refused), 7).await.unwrap(),
        1
    );
    let window = s.handshakes_list(1_499, 1_502, 100).await.unwrap();
    assert_eq!(
        window,
        [
            row("db-1", 1_499, 499),
            row("db-1", 1_500, 500),
            refused,
            row("db-1", 1_501, 501)
        ]
    );
    assert_eq!(s.handshakes_list(0, i64::MAX, 3).await.unwrap().len(), 3, "limit");
    assert_eq!(s.handshakes_prune(1_100).await.unwrap(), 100);
    assert_eq!(s.handshakes_list(0, i64::MAX, 10_000).await.unwrap().len(), 1101);
}

macro_rules! suite {
    ($backend:ident: $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let Some(db) = super::$backend().await else { return };
                    super::$test(&db).await;
                    db.drop_db().await;
                }
            )*
        }
    };
}

suite!(sqlite: migrations_are_idempotent, cas_round_trip, tokens_are_single_use, a_token_is_used_once_across_replicas,
    a_reusable_token_has_exactly_its_uses, serials_are_unique_across_replicas, nodes_registrations_revocations, audit_chain_holds_under_concurrency_and_finds_edits,
    refuses_a_newer_schema, change_notices_wake_listeners, coverage_history_and_latest, handshake_records_are_kept_once_and_pruned);
suite!(postgres: migrations_are_idempotent, cas_round_trip, tokens_are_single_use, a_token_is_used_once_across_replicas,
    a_reusable_token_has_exactly_its_uses, serials_are_unique_across_replicas, nodes_registrations_revocations, audit_chain_holds_under_concurrency_and_finds_edits,
    refuses_a_newer_schema, change_notices_wake_listeners, coverage_history_and_latest, handshake_records_are_kept_once_and_pruned);

#[tokio::test]
async fn postgres_read_only_and_unreachable_are_clear_errors() {
    let Some(db) = postgres().await else { return };
    drop(db.open().await);
    let name = &db.pg.as_ref().unwrap().1;
    db.raw(&format!(
        "ALTER DATABASE {name} SET default_transaction_read_only = on"
    ))
    .await;
    // Opening runs the migrator, whose first statement writes: a read-only store is refused at
    // start-up with a clear error rather than failing on the first join.
    let err = open(&db.url)
        .await
        .err()
        .expect("a read-only store must be refused");
    assert!(matches!(err, StoreError::ReadOnly(_)), "{err}");
    assert_eq!(err.code(), "store_read_only");
    db.drop_db().await;

    let err = open("postgres://someone:hunter2@127.0.0.1:1/nothing")
        .await
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(
        matches!(err, StoreError::Open { .. }) && text.contains("127.0.0.1:1"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2"),
        "passwords never appear in errors: {text}"
    );
}

#[tokio::test]
async fn sqlite_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let db = sqlite().await.unwrap();
    drop(db.open().await);
    let mode = std::fs::metadata(&db.url).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the store holds sealed CA keys and token hashes");
}

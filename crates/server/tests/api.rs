//! The control plane's API contract, in process: a real server on 127.0.0.1:0 (real TLS, a real
//! SQLite file), real node and admin identities, and typed requests of `tapproof_api`. Every auth
//! rule (anonymous, node, admin, revoked by node, by SPIFFE ID and by serial), the error codes of
//! bad input, the audit rows of refusals, the service directory and the drain on shutdown.

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tapproof_api::{paths, JoinRequest, RevocationKind, RevokeRequest, SignItem, SignRequest, StateResponse};
use tapproof_identity::TrustDomain;
use tapproof_store::Store;
use tapproof_test_util::process::metric_value;
use tapproof_test_util::server::ApiConn;
use tapproof_tls::ServerTrust;

const TD: &str = "example.org";

struct Server {
    addr: SocketAddr,
    /// The admin listener (plain HTTP: /metrics, /healthz, /readyz).
    admin: SocketAddr,
    _dir: tempfile::TempDir,
    dir: PathBuf,
    data: PathBuf,
    store: Arc<dyn Store>,
    td: TrustDomain,
    pin: [u8; 32],
    bundle: Vec<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tapproof_server::ServerError>>,
}

/// A node or admin identity: PEM chain and key, and the leaf's serial.
struct Identity {
    chain: String,
    key: String,
    serial: String,
}

async fn start() -> Server {
    start_with(Default::default(), Duration::from_secs(3600)).await
}

async fn start_with(limits: tapproof_server::Limits, leaf_ttl: Duration) -> Server {
    let dir = tempfile::Builder::new()
        .prefix("tapproof-api-")
        .tempdir()
        .unwrap();
    let data = dir.path().join("server");
    let td = TrustDomain::new(TD).unwrap();
    let report = tapproof_server::init(td.clone(), &data, None, None)
        .await
        .unwrap();
    let ready = dir.path().join("ready.json");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = tapproof_server::RunOptions {
        data_dir: data.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        store: None,
        kek_file: None,
        leaf_ttl,
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        ready_file: Some(ready.clone()),
        rollover: None,
        limits,
        handshake_retention: tapproof_server::DEFAULT_HANDSHAKE_RETENTION,
        probe_interval: None,
    };
    let task = tokio::spawn(tapproof_server::run(options, async move {
        let _ = stopped.await;
    }));
    let (addr, admin) = loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            let v: Value = serde_json::from_str(&text).unwrap();
            let addr: SocketAddr = v["listen"].as_str().unwrap().parse().unwrap();
            let admin: SocketAddr = v["admin"].as_str().unwrap().parse().unwrap();
            break (addr, admin);
        }
        assert!(!task.is_finished(), "the server stopped before it was ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (_, store) = tapproof_server::open_store(&data, None).await.unwrap();
    let mut anon = ApiConn::open(addr, TD, ServerTrust::Pin(report.root_pin), None)
        .await
        .unwrap();
    let (status, bundle) = anon.call("GET", paths::BUNDLE, vec![]).await.unwrap();
    assert_eq!(status, 200);
    let bundle = serde_json::from_value::<tapproof_api::BundleResponse>(bundle)
        .unwrap()
        .roots;
    Server {
        addr,
        admin,
        dir: dir.path().to_owned(),
        _dir: dir,
        data,
        store,
        td,
        pin: report.root_pin,
        bundle,
        stop: Some(stop),
        task,
    }
}

impl Server {
    async fn conn(&self, who: Option<&Identity>) -> Result<ApiConn, String> {
        ApiConn::open(
            self.addr,
            TD,
            ServerTrust::Bundle(self.bundle.clone()),
            who.map(|i| (i.chain.as_str(), i.key.as_str())),
        )
        .await
    }

    /// One request on a new connection.
    async fn call(
        &self,
        who: Option<&Identity>,
        method: &str,
        path: &str,
        body: Value,
    ) -> Result<(u16, Value), String> {
        let body = if body.is_null() {
            vec![]
        } else {
            serde_json::to_vec(&body).unwrap()
        };
        self.conn(who).await?.call(method, path, body).await
    }

    /// Joins node `name` with a fresh token, registered for `services`.
    async fn join(&self, name: &str, services: &[&str]) -> Identity {
        let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        let token = tapproof_server::create_token(
            &*self.store,
            &self.td,
            self.addr.to_string(),
            name,
            &services,
            Duration::from_secs(300),
        )
        .await
        .unwrap();
        let (csr, key) = tapproof_identity::new_csr(None).unwrap();
        let mut anon = ApiConn::open(self.addr, TD, ServerTrust::Pin(self.pin), None)
            .await
            .unwrap();
        let body = serde_json::to_vec(&JoinRequest {
            token: token.to_string(),
            csr,
            node: None,
        })
        .unwrap();
        let (status, v) = anon.call("POST", paths::JOIN, body).await.unwrap();
        assert_eq!(status, 200, "{v}");
        let joined: tapproof_api::JoinResponse = serde_json::from_value(v).unwrap();
        identity(joined.identity.chain_pem, key)
    }

    /// An admin identity `spiffe://example.org/admin/<name>`, as `server admin-cert` issues it.
    async fn admin(&self, name: &str) -> Identity {
        let kek = tapproof_server::kek::Kek::load(&tapproof_server::default_kek_file(&self.data)).unwrap();
        let out = self.dir.join(format!("admin-{name}"));
        tapproof_server::issue_admin(
            &*self.store,
            &kek,
            &self.td,
            name,
            Duration::from_secs(3600),
            &out,
        )
        .await
        .unwrap();
        identity(
            std::fs::read_to_string(out.join("admin.pem")).unwrap(),
            std::fs::read_to_string(out.join("admin.key")).unwrap(),
        )
    }

    async fn revoke(&self, admin: &Identity, kind: RevocationKind, value: &str) {
        let req = RevokeRequest {
            kind,
            value: value.into(),
            reason: "test".into(),
        };
        let (status, v) = self
            .call(
                Some(admin),
                "POST",
                paths::REVOCATIONS,
                serde_json::to_value(req).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{v}");
    }

    /// Audit rows of `action` (newest last).
    async fn audit_rows(&self, action: &str) -> Vec<tapproof_store::AuditEntry> {
        self.store
            .audit_list(0, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.action == action)
            .collect()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("the server stops within its drain timeout")
            .unwrap()
            .unwrap();
    }
}

fn identity(chain: String, key: String) -> Identity {
    let der = tapproof_identity::ca::first_der(&chain).unwrap();
    let serial = tapproof_identity::inspect_svid(&der).unwrap().serial;
    Identity { chain, key, serial }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn sign_body(id: &str) -> Value {
    let (csr, _) = tapproof_identity::new_csr(None).unwrap();
    serde_json::to_value(SignRequest {
        csrs: vec![SignItem { id: id.into(), csr }],
    })
    .unwrap()
}

fn coverage_body() -> Value {
    let report = tapproof_audit::classify(
        &tapproof_audit::scan::Scan::default(),
        &tapproof_audit::Options::default(),
        "h".into(),
        0,
    );
    serde_json::to_value(tapproof_audit::CoverageUpload {
        report,
        denials: vec![],
        handshakes: vec![],
        selftest: None,
    })
    .unwrap()
}

/// What the directory lists, as node `viewer` sees it.
async fn directory(s: &Server, viewer: &Identity) -> Vec<(String, String)> {
    let (status, v) = s
        .call(Some(viewer), "GET", paths::STATE, Value::Null)
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let state: StateResponse = serde_json::from_value(v).unwrap();
    state.directory.into_iter().map(|e| (e.service, e.node)).collect()
}

/// Waits until the directory `viewer` sees satisfies `cond`. The directory is part of the feed's
/// document, rebuilt at the next feed version: the server sees its store change within a second.
async fn wait_directory(
    s: &Server,
    viewer: &Identity,
    cond: impl Fn(&[(String, String)]) -> bool,
    what: &str,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let d = directory(s, viewer).await;
        if cond(&d) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} within 5 s: {d:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// For each kind of revocation: the revoked node's renewal, state-feed call, address
/// announcement and coverage report are refused with a stable code and an audit row, nothing it
/// sent is stored, and it leaves the service directory. A serial revocation refuses the TLS
/// handshake itself; on a connection opened before it, each call is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_revocation_is_refused_on_every_node_endpoint() {
    let s = start().await;
    let admin = s.admin("ops").await;
    let viewer = s.join("viewer", &[]).await;
    for (i, kind) in [
        RevocationKind::Node,
        RevocationKind::SpiffeId,
        RevocationKind::Serial,
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("db-{i}");
        let service = format!("db{i}");
        let id = format!("spiffe://{TD}/node/{name}");
        let node = s.join(&name, &[&service]).await;
        // Announce a tunnel address; the directory lists the node.
        let announce = format!("/v1/state?tunnel=10.9.0.{i}:15008");
        let (status, _) = s.call(Some(&node), "GET", &announce, Value::Null).await.unwrap();
        assert_eq!(status, 200);
        let listed = (service.clone(), name.clone());
        wait_directory(
            &s,
            &viewer,
            |d| d.contains(&listed),
            "the announced node is listed",
        )
        .await;
        // A connection opened before the revocation, kept open (as an agent's would be).
        let mut held = s.conn(Some(&node)).await.unwrap();
        let (status, _) = held.call("GET", paths::BUNDLE, vec![]).await.unwrap();
        assert_eq!(status, 200);

        let (value, expected) = match kind {
            RevocationKind::Node => (name.clone(), "node_revoked"),
            RevocationKind::SpiffeId => (id.clone(), "identity_revoked"),
            _ => (node.serial.clone(), "certificate_revoked"),
        };
        s.revoke(&admin, kind, &value).await;
        wait_directory(
            &s,
            &viewer,
            |d| !d.iter().any(|(_, n)| *n == name),
            "a revoked node leaves the directory",
        )
        .await;

        let calls: [(&str, String, Value); 4] = [
            ("POST", paths::SIGN.to_owned(), sign_body(&id)),
            ("GET", paths::STATE.to_owned(), Value::Null),
            ("GET", format!("/v1/state?tunnel=10.8.8.{i}:15008"), Value::Null),
            ("POST", paths::COVERAGE.to_owned(), coverage_body()),
        ];
        for (method, path, body) in &calls {
            let bytes = if body.is_null() {
                vec![]
            } else {
                serde_json::to_vec(body).unwrap()
            };
            let (status, v) = held.call(method, path, bytes).await.unwrap();
            assert_eq!(
                (status, code(&v)),
                (403, expected),
                "{kind:?} {method} {path} on a held connection: {v}"
            );
            let fresh = s.call(Some(&node), method, path, body.clone()).await;
            match kind {
                // The TLS listener closes the connection of a revoked serial before any HTTP.
                RevocationKind::Serial => assert!(fresh.is_err(), "{method} {path}: {fresh:?}"),
                _ => {
                    let (status, v) = fresh.unwrap();
                    assert_eq!(
                        (status, code(&v)),
                        (403, expected),
                        "{kind:?} {method} {path}: {v}"
                    );
                }
            }
        }
        for what in ["sign", "state", "coverage"] {
            let rows = s.audit_rows(&format!("{what}.refused")).await;
            assert!(
                rows.iter().any(|r| r.actor == id && r.details.contains(expected)),
                "{kind:?}: no {what}.refused row for {id} with {expected}"
            );
        }
        if kind == RevocationKind::Serial {
            let rows = s.audit_rows("handshake.refused").await;
            assert!(
                rows.iter()
                    .any(|r| r.actor == id && r.details.contains(&node.serial)),
                "handshake.refused"
            );
        }
        // Nothing the revoked node sent was kept: its announced address is the first one, and
        // no coverage report of it exists.
        let stored = s.store.node_get(&name).await.unwrap().unwrap();
        assert_eq!(
            stored.tunnel_addr.as_deref(),
            Some(format!("10.9.0.{i}:15008").as_str())
        );
        assert!(s
            .store
            .coverage_latest()
            .await
            .unwrap()
            .iter()
            .all(|c| c.point.node != name));
        assert!(
            s.store.cert_list(&name).await.unwrap().len() == 1,
            "{kind:?}: no certificate issued after the revocation"
        );
    }
    s.stop().await;
}

/// The admin endpoints and the dashboard, as each caller sees them.
fn admin_calls() -> Vec<(&'static str, &'static str, Value)> {
    let change = json!({ "node": "web-1", "service": "api", "add": true });
    let revoke = json!({ "kind": "node", "value": "nobody", "reason": "x" });
    let policy = json!({ "services": {} });
    vec![
        ("GET", paths::NODES, Value::Null),
        ("GET", paths::REGISTRATIONS, Value::Null),
        ("POST", paths::REGISTRATIONS, change),
        ("GET", paths::REVOCATIONS, Value::Null),
        ("POST", paths::REVOCATIONS, revoke),
        ("GET", paths::REVOCATION_PROPAGATION, Value::Null),
        ("GET", "/v1/audit-log?after=0&limit=5", Value::Null),
        ("GET", paths::HANDSHAKES, Value::Null),
        ("GET", paths::POLICY, Value::Null),
        ("POST", paths::POLICY, policy),
        ("GET", paths::DASHBOARD_DATA, Value::Null),
        ("GET", paths::DASHBOARD, Value::Null),
        ("GET", "/dashboard/app.js", Value::Null),
        ("GET", "/dashboard/style.css", Value::Null),
    ]
}

/// A revoked admin (by SPIFFE ID, by serial) is refused on every admin endpoint and the
/// dashboard and changes nothing; node identities are refused there too, audited; anonymous
/// callers are told to present a certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_nodes_and_strangers_on_the_admin_endpoints() {
    let s = start().await;
    let (bob, alice, carol) = (
        s.admin("bob").await,
        s.admin("alice").await,
        s.admin("carol").await,
    );
    let web = s.join("web-1", &[]).await;
    // A live admin reaches every endpoint.
    for (method, path, body) in admin_calls() {
        let (status, v) = s.call(Some(&bob), method, path, body).await.unwrap();
        assert_eq!(status, 200, "{method} {path}: {v}");
    }
    let mut alice_held = s.conn(Some(&alice)).await.unwrap();
    let mut carol_held = s.conn(Some(&carol)).await.unwrap();
    s.revoke(
        &bob,
        RevocationKind::SpiffeId,
        &format!("spiffe://{TD}/admin/alice"),
    )
    .await;
    s.revoke(&bob, RevocationKind::Serial, &carol.serial).await;
    let revocations_before = s.store.revocations().await.unwrap().len();
    let registrations_before = s.store.registrations().await.unwrap().len();
    for (method, path, body) in admin_calls() {
        let bytes = if body.is_null() {
            vec![]
        } else {
            serde_json::to_vec(&body).unwrap()
        };
        let (status, v) = s.call(Some(&alice), method, path, body.clone()).await.unwrap();
        assert_eq!(
            (status, code(&v)),
            (403, "identity_revoked"),
            "alice {method} {path}: {v}"
        );
        let (status, v) = alice_held.call(method, path, bytes.clone()).await.unwrap();
        assert_eq!(
            (status, code(&v)),
            (403, "identity_revoked"),
            "alice held {method} {path}: {v}"
        );
        assert!(
            s.call(Some(&carol), method, path, body.clone()).await.is_err(),
            "carol's handshake is refused"
        );
        let (status, v) = carol_held.call(method, path, bytes).await.unwrap();
        assert_eq!(
            (status, code(&v)),
            (403, "certificate_revoked"),
            "carol held {method} {path}: {v}"
        );
        let (status, v) = s.call(Some(&web), method, path, body.clone()).await.unwrap();
        assert_eq!(
            (status, code(&v)),
            (403, "admin_required"),
            "node {method} {path}: {v}"
        );
        let (status, v) = s.call(None, method, path, body).await.unwrap();
        assert_eq!(
            (status, code(&v)),
            (401, "identity_required"),
            "anonymous {method} {path}: {v}"
        );
    }
    assert_eq!(
        s.store.revocations().await.unwrap().len(),
        revocations_before,
        "no revocation added"
    );
    assert_eq!(s.store.registrations().await.unwrap().len(), registrations_before);
    for (who, reason) in [("alice", "identity_revoked"), ("carol", "certificate_revoked")] {
        let id = format!("spiffe://{TD}/admin/{who}");
        for action in ["admin.nodes.refused", "admin.revoke.refused", "dashboard.refused"] {
            assert!(
                s.audit_rows(action)
                    .await
                    .iter()
                    .any(|r| r.actor == id && r.details.contains(reason)),
                "{who}: no {action} row"
            );
        }
    }
    let node_id = format!("spiffe://{TD}/node/web-1");
    assert!(
        s.audit_rows("admin.set_policy.refused")
            .await
            .iter()
            .any(|r| r.actor == node_id && r.details.contains("admin_required")),
        "a node's attempt on an admin endpoint is audited"
    );
    s.stop().await;
}

/// A node that asks the state feed past the version that first carried a revocation has applied
/// it (agents ask again only after applying a document): the server records when, per node, and
/// reports per revocation who applied it, after how long, and which live nodes have not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_propagation_is_recorded_per_node() {
    let s = start().await;
    let admin = s.admin("ops").await;
    let a = s.join("app-1", &[]).await;
    let b = s.join("app-2", &[]).await;
    let _offline = s.join("app-3", &[]).await;
    let _gone = s.join("gone-1", &[]).await;
    let (_, doc) = s.call(Some(&a), "GET", paths::STATE, Value::Null).await.unwrap();
    let v0 = doc["version"].as_i64().unwrap();
    s.revoke(&admin, RevocationKind::Node, "gone-1").await;

    // app-1 follows the feed: the next document carries the revocation, then it asks past it
    // (a long-poll, dropped here: the acknowledgement is taken when the request arrives).
    async fn follow(s: &Server, who: &Identity, v0: i64) -> i64 {
        let state = |since: i64| format!("{}?since={since}", paths::STATE);
        let mut conn = s.conn(Some(who)).await.unwrap();
        let (status, doc) = conn.call("GET", &state(v0), vec![]).await.unwrap();
        assert_eq!(status, 200, "{doc}");
        assert!(doc["revocations"].to_string().contains("gone-1"), "{doc}");
        let v1 = doc["version"].as_i64().unwrap();
        let path = state(v1);
        let held = conn.call("GET", &path, vec![]);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), held)
                .await
                .is_err(),
            "a long-poll"
        );
        v1
    }
    let v1 = follow(&s, &a, v0).await;
    let propagation = || async {
        let (status, v) = s
            .call(Some(&admin), "GET", paths::REVOCATION_PROPAGATION, Value::Null)
            .await
            .unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
        v[0].clone()
    };
    let p = propagation().await;
    assert_eq!(p["revocation"]["value"], "gone-1");
    assert!(
        p["version"].as_i64().unwrap() > v0 && p["version"].as_i64().unwrap() <= v1,
        "{p}"
    );
    assert_eq!(p["applied"].as_array().unwrap().len(), 1, "{p}");
    assert_eq!(p["applied"][0]["node"], "app-1");
    assert!(
        (0..=5).contains(&p["applied"][0]["seconds"].as_i64().unwrap()),
        "{p}"
    );
    assert_eq!(p["applied"][0]["joined_after"], false);
    assert_eq!(
        p["pending"],
        json!(["app-2", "app-3"]),
        "the revoked node is not expected"
    );

    // Asking again records nothing twice; app-2 catches up; app-3 stays pending.
    follow(&s, &a, v0).await;
    follow(&s, &b, v0).await;
    let p = propagation().await;
    let applied: Vec<&str> = p["applied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["node"].as_str().unwrap())
        .collect();
    assert_eq!(applied, ["app-1", "app-2"], "{p}");
    assert_eq!(p["pending"], json!(["app-3"]));

    let (_, _, metrics) = admin_get(&s, "/metrics", None).await;
    assert!(
        metrics.contains("tapproof_server_revocation_propagation_seconds_count 2"),
        "{metrics}"
    );
    s.stop().await;
}

/// Handshake records ride with coverage reports: kept once per record (an upload sent again adds
/// nothing), apart from the report's history; a bad record is refused naming it, and nothing of
/// that upload is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_records_are_kept_once_and_checked() {
    let s = start().await;
    let node = s.join("db-1", &["db"]).await;
    let record = |seq: u64, outcome: &str| tapproof_audit::HandshakeRecord {
        at_ms: 1_700_000_000_000 + seq as i64,
        seq,
        side: "inbound".into(),
        local: "10.0.0.1:15008".into(),
        remote: "10.0.0.2:40000".into(),
        local_id: format!("spiffe://{TD}/node/db-1"),
        local_serial: "AB".into(),
        peer_id: (outcome == "ok").then(|| format!("spiffe://{TD}/node/web-1")),
        tls_version: (outcome == "ok").then(|| "TLSv1.3".into()),
        group: (outcome == "ok").then(|| "X25519MLKEM768".into()),
        outcome: outcome.into(),
        reason: (outcome == "refused").then(|| "unknown_ca".into()),
        ..Default::default()
    };
    let upload = |records: Vec<tapproof_audit::HandshakeRecord>| {
        let mut body = coverage_body();
        body["handshakes"] = serde_json::to_value(records).unwrap();
        body
    };
    let records = vec![record(0, "ok"), record(1, "refused"), record(2, "ok")];
    for _ in 0..2 {
        let (status, v) = s
            .call(Some(&node), "POST", paths::COVERAGE, upload(records.clone()))
            .await
            .unwrap();
        assert_eq!(status, 204, "{v}");
    }
    let kept = s.store.handshakes_list(0, i64::MAX, 100).await.unwrap();
    assert_eq!(kept.len(), 3, "{kept:?}");
    assert!(kept.iter().all(|r| r.node == "db-1"));
    assert_eq!(kept[1].reason.as_deref(), Some("unknown_ca"));
    assert_eq!(kept[2].group.as_deref(), Some("X25519MLKEM768"));
    let history = s.store.coverage_latest().await.unwrap();
    assert!(
        !history[0].report.contains("handshakes"),
        "records are not copied into the report"
    );

    let bad = tapproof_audit::HandshakeRecord {
        side: "sideways".into(),
        ..record(9, "ok")
    };
    let (status, v) = s
        .call(
            Some(&node),
            "POST",
            paths::COVERAGE,
            upload(vec![record(8, "ok"), bad]),
        )
        .await
        .unwrap();
    assert_eq!((status, code(&v)), (400, "bad_request"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("handshakes[1]: side"),
        "{v}"
    );
    let too_many = vec![record(10, "ok"); tapproof_audit::MAX_UPLOAD_HANDSHAKES + 1];
    let (status, v) = s
        .call(Some(&node), "POST", paths::COVERAGE, upload(too_many))
        .await
        .unwrap();
    assert_eq!((status, code(&v)), (400, "report_too_large"), "{v}");
    assert_eq!(
        s.store.handshakes_list(0, i64::MAX, 100).await.unwrap().len(),
        3,
        "nothing of a refused upload"
    );
    s.stop().await;
}

/// A self-test round rides with the coverage report; the dashboard shows it per node, an
/// accepted probe by name (the page turns it into an alarm); a bad round is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_test_rounds_reach_the_dashboard() {
    let s = start().await;
    let admin = s.admin("ops").await;
    let node = s.join("db-1", &["db"]).await;
    let probe = |name: &str, result: &str| tapproof_audit::SelftestProbe {
        probe: name.into(),
        result: result.into(),
        detail: String::new(),
    };
    let mut body = coverage_body();
    body["selftest"] = serde_json::to_value(tapproof_audit::SelftestRound {
        at: 1_800_000_000,
        target: "127.0.0.1:15008".into(),
        probes: vec![probe("plaintext", "accepted"), probe("tls12", "refused")],
    })
    .unwrap();
    let (status, v) = s
        .call(Some(&node), "POST", paths::COVERAGE, body.clone())
        .await
        .unwrap();
    assert_eq!(status, 204, "{v}");
    let (_, d) = s
        .call(Some(&admin), "GET", paths::DASHBOARD_DATA, Value::Null)
        .await
        .unwrap();
    let row = d["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "db-1")
        .unwrap()
        .clone();
    assert_eq!(
        row["selftest"],
        json!({ "at": 1_800_000_000, "refused": 1, "accepted": ["plaintext"] }),
        "{row}"
    );
    body["selftest"]["probes"][0]["result"] = json!("maybe");
    let (status, v) = s.call(Some(&node), "POST", paths::COVERAGE, body).await.unwrap();
    assert_eq!((status, code(&v)), (400, "bad_request"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("selftest: probes[0].result"),
        "{v}"
    );
    s.stop().await;
}

/// Who sends what to which path, and the status and code expected.
type BadCase<'a> = (Option<&'a Identity>, &'a str, &'a str, Vec<u8>, u16, &'a str);

/// Bad input gets its stable code and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_code_and_changes_nothing() {
    let s = start().await;
    let admin = s.admin("ops").await;
    let node = s.join("web-1", &["web"]).await;
    let node_id = format!("spiffe://{TD}/node/web-1");
    let kept = json!({ "services": { "db": { "allow": [node_id.clone()] } } });
    let (status, _) = s
        .call(Some(&admin), "POST", paths::POLICY, kept.clone())
        .await
        .unwrap();
    assert_eq!(status, 200);
    let cases: Vec<BadCase> = vec![
        (None, "GET", "/v1/nothing-here", vec![], 404, "not_found"),
        (None, "POST", paths::JOIN, b"{".to_vec(), 400, "bad_json"),
        (
            None,
            "POST",
            paths::JOIN,
            br#"{"token":"x","csr":"y","extra":1}"#.to_vec(),
            400,
            "bad_json",
        ),
        (
            None,
            "POST",
            paths::JOIN,
            br#"{"token":"x","csr":"y"}"#.to_vec(),
            400,
            "token_malformed",
        ),
        (
            None,
            "POST",
            paths::JOIN,
            vec![b' '; tapproof_api::MAX_BODY + 1],
            413,
            "body_too_large",
        ),
        // 20,000 levels of nesting in 40 KB: serde_json's recursion limit (128) refuses it
        // before any of it is built.
        (
            Some(&node),
            "POST",
            paths::SIGN,
            [
                br#"{"csrs":"#.to_vec(),
                b"[".repeat(20_000),
                b"]".repeat(20_000),
                b"}".to_vec(),
            ]
            .concat(),
            400,
            "bad_json",
        ),
        (Some(&node), "GET", "/v1/state?since=x", vec![], 400, "bad_query"),
        (
            Some(&node),
            "GET",
            "/v1/state?tunnel=nowhere",
            vec![],
            400,
            "bad_query",
        ),
        (
            Some(&node),
            "POST",
            paths::SIGN,
            br#"{"csrs":[]}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Some(&node),
            "POST",
            paths::SIGN,
            serde_json::to_vec(&sign_body(&format!("spiffe://{TD}/svc/not-mine"))).unwrap(),
            403,
            "not_registered",
        ),
        (
            Some(&node),
            "POST",
            paths::SIGN,
            serde_json::to_vec(&json!({ "csrs": [{ "id": node_id, "csr": "not a CSR" }] })).unwrap(),
            400,
            "csr_invalid",
        ),
        (
            Some(&admin),
            "POST",
            paths::REVOCATIONS,
            br#"{"kind":"serial","value":"not hex"}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Some(&admin),
            "POST",
            paths::REVOCATIONS,
            br#"{"kind":"spiffe_id","value":"http://x"}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Some(&admin),
            "POST",
            paths::REVOCATIONS,
            br#"{"kind":"node","value":"a/b"}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Some(&admin),
            "POST",
            paths::REVOCATIONS,
            br#"{"kind":"everything","value":"x"}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Some(&admin),
            "POST",
            paths::POLICY,
            b"[services.db]\nallow = [\"spiffe://other.org/node/x\"]\n".to_vec(),
            400,
            "bad_policy",
        ),
        (
            Some(&admin),
            "POST",
            paths::POLICY,
            b"\t".to_vec(),
            400,
            "bad_policy",
        ),
        (Some(&admin), "POST", paths::POLICY, vec![], 400, "bad_policy"),
        (
            Some(&admin),
            "POST",
            paths::POLICY,
            br#"{"capture": []}"#.to_vec(),
            400,
            "bad_policy",
        ),
        (
            Some(&admin),
            "POST",
            paths::REGISTRATIONS,
            br#"{"node":"../x","service":"s","add":true}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            Some(&admin),
            "GET",
            "/v1/audit-log?after=z",
            vec![],
            400,
            "bad_query",
        ),
        (
            Some(&admin),
            "GET",
            "/v1/audit-log?limit=0",
            vec![],
            400,
            "bad_query",
        ),
        (
            Some(&admin),
            "GET",
            "/v1/audit-log?limit=1001",
            vec![],
            400,
            "bad_query",
        ),
    ];
    for (who, method, path, body, status, expected) in cases {
        let (got, v) = s.conn(who).await.unwrap().call(method, path, body).await.unwrap();
        assert_eq!((got, code(&v)), (status, expected), "{method} {path}: {v}");
        assert!(
            !v["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{method} {path}: a message"
        );
    }
    assert!(
        s.store.revocations().await.unwrap().is_empty(),
        "no refused revocation was stored"
    );
    let (_, v) = s
        .conn(Some(&admin))
        .await
        .unwrap()
        .call("GET", paths::POLICY, vec![])
        .await
        .unwrap();
    assert_eq!(
        v["services"], kept["services"],
        "no refused policy replaced the stored one"
    );
    // Clearing the policy stays possible, on purpose.
    let (status, v) = s
        .conn(Some(&admin))
        .await
        .unwrap()
        .call("POST", paths::POLICY, b"[services]\n".to_vec())
        .await
        .unwrap();
    assert_eq!((status, v["services"].clone()), (200, json!({})), "{v}");
    assert_eq!(
        s.store.cert_list("web-1").await.unwrap().len(),
        1,
        "nothing was signed"
    );
    assert!(s
        .store
        .node_get("web-1")
        .await
        .unwrap()
        .unwrap()
        .tunnel_addr
        .is_none());
    assert!(s
        .audit_rows("sign.refused")
        .await
        .iter()
        .any(|r| r.details.contains("not_registered")));
    s.stop().await;
}

/// On shutdown the server answers a waiting long-poll at once, finishes, and returns Ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_long_polls_and_returns() {
    let s = start().await;
    let node = s.join("web-1", &[]).await;
    let (status, v) = s
        .call(Some(&node), "GET", paths::STATE, Value::Null)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let version = v["version"].as_i64().unwrap();
    let mut conn = s.conn(Some(&node)).await.unwrap();
    let waiting = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let answer = conn
            .call("GET", &format!("/v1/state?since={version}"), vec![])
            .await;
        (answer, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the long-poll waits while nothing changes"
    );
    s.stop().await;
    let (answer, waited) = waiting.await.unwrap();
    let (status, v) = answer.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["version"].as_i64(), Some(version));
    assert!(
        waited < Duration::from_secs(10),
        "answered at the drain, not after the hold: {waited:?}"
    );
}

/// A TCP connection to the server from `source` (another loopback address: per-source limits).
async fn tcp_from(source: &str, server: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{source}:0").parse().unwrap())?;
    sock.connect(server).await
}

/// Whether the server closed `tcp` within `within` (a read returns EOF or an error).
async fn closed_within(tcp: &mut (impl tokio::io::AsyncRead + Unpin), within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_cannot_take_the_control_plane() {
    let limits = tapproof_server::Limits {
        max_connections_per_source: 8,
        handshake_timeout: Duration::from_secs(2),
        header_read_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let s = start_with(limits, Duration::from_secs(3600)).await;
    let node = s.join("web-1", &[]).await;
    let td = TrustDomain::new(TD).unwrap();
    let anon = tapproof_tls::ControlClientTls::new(
        ServerTrust::Pin(s.pin),
        tapproof_identity::SpiffeId::new(td, "/server").unwrap(),
        None,
    )
    .unwrap();

    // Attacker A (127.0.0.2): TLS connections that never send a request. Attacker B
    // (127.0.0.3): TCP connections that never start TLS. 30 each.
    let mut tls_held = Vec::new();
    let mut tls_refused = 0;
    for _ in 0..30 {
        let tcp = tcp_from("127.0.0.2", s.addr).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), anon.connect(tcp, s.addr)).await {
            Ok(Ok(tls)) => tls_held.push(tls),
            _ => tls_refused += 1,
        }
    }
    let mut raw_held = Vec::new();
    for _ in 0..30 {
        raw_held.push(tcp_from("127.0.0.3", s.addr).await.unwrap());
    }
    assert!(
        tls_held.len() <= 8,
        "{} TLS connections admitted from one source",
        tls_held.len()
    );
    assert!(tls_refused >= 22, "only {tls_refused} of 30 refused");

    // Meanwhile the legitimate node is served every time.
    for i in 0..20 {
        let (status, v) = s
            .call(
                Some(&node),
                "POST",
                paths::SIGN,
                sign_body("spiffe://example.org/node/web-1"),
            )
            .await
            .unwrap();
        assert_eq!(
            status, 200,
            "legitimate signing {i} failed while under attack: {v}"
        );
    }

    // The held ones are closed by the server: no request within the header timeout, no TLS
    // within the handshake timeout.
    let mut all_closed = true;
    for tls in &mut tls_held {
        all_closed &= closed_within(tls, Duration::from_secs(5)).await;
    }
    assert!(
        all_closed,
        "idle TLS connections were not closed after the header timeout"
    );
    let mut raw_closed = 0;
    for tcp in &mut raw_held {
        raw_closed += closed_within(tcp, Duration::from_secs(5)).await as usize;
    }
    assert_eq!(
        raw_closed,
        raw_held.len(),
        "connections without TLS were not all closed"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_attempts_are_rate_limited_per_source_without_a_row_each() {
    let limits = tapproof_server::Limits {
        joins_per_minute: 10,
        ..Default::default()
    };
    let s = start_with(limits, Duration::from_secs(3600)).await;
    let rows_before = s.store.audit_list(0, 100_000).await.unwrap().len();
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..200 {
        let body = json!({ "token": "tp1.bogus.bogus", "csr": "x" });
        let (status, v) = s.call(None, "POST", paths::JOIN, body).await.unwrap();
        *codes.entry(format!("{status} {}", code(&v))).or_default() += 1;
    }
    assert_eq!(codes.get("429 rate_limited"), Some(&190), "{codes:?}");
    let rows = s.store.audit_list(0, 100_000).await.unwrap().len() - rows_before;
    assert!(
        rows <= 12,
        "{rows} audit rows for 200 attempts (10 refusals + one rate-limit row expected)"
    );
    assert_eq!(s.audit_rows("join.rate_limited").await.len(), 1);
    // A legitimate join from another address is not affected.
    let tls = tapproof_tls::ControlClientTls::new(
        ServerTrust::Pin(s.pin),
        tapproof_identity::SpiffeId::new(TrustDomain::new(TD).unwrap(), "/server").unwrap(),
        None,
    )
    .unwrap();
    let token = tapproof_server::create_token(
        &*s.store,
        &s.td,
        s.addr.to_string(),
        "db-1",
        &[],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let (csr, _) = tapproof_identity::new_csr(None).unwrap();
    let tcp = tcp_from("127.0.0.2", s.addr).await.unwrap();
    let stream = tls.connect(tcp, s.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("https://{}{}", s.addr, paths::JOIN))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            serde_json::to_vec(&JoinRequest {
                token: token.to_string(),
                csr,
                node: None,
            })
            .unwrap(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "a join from another source was refused");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_newest_certificate_renews_and_does_nothing_else() {
    // 30 s certificates (the shortest allowed); expired ones renew for 6 s after expiry.
    let limits = tapproof_server::Limits {
        expired_renewal_window: Duration::from_secs(6),
        ..Default::default()
    };
    let s = start_with(limits, Duration::from_secs(30)).await;
    let a = s.join("a", &[]).await;
    let late = s.join("late", &[]).await;
    let b_old = s.join("b", &[]).await;
    // b renews once (a second later: the store keeps seconds): b_old is no longer the newest
    // certificate of node b.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (csr, key) = tapproof_identity::new_csr(None).unwrap();
    let body = serde_json::to_value(SignRequest {
        csrs: vec![SignItem {
            id: "spiffe://example.org/node/b".into(),
            csr,
        }],
    })
    .unwrap();
    let (status, v) = s.call(Some(&b_old), "POST", paths::SIGN, body).await.unwrap();
    assert_eq!(status, 200, "{v}");
    let b_new = identity(v["identities"][0]["chain_pem"].as_str().unwrap().to_owned(), key);

    // Wait until all of them expired (the newest one, b_new, last).
    let expiry = |i: &Identity| {
        let der = tapproof_identity::ca::first_der(&i.chain).unwrap();
        tapproof_identity::inspect_svid(&der).unwrap().not_after
    };
    let last = expiry(&b_new);
    while now_unix() <= last + 1 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Everything but renewal: certificate_expired.
    let (status, v) = s.call(Some(&a), "GET", paths::STATE, Value::Null).await.unwrap();
    assert_eq!((status, code(&v)), (401, "certificate_expired"), "{v}");
    // Renewal with the newest certificate works, and the new one is fully usable.
    let (csr, key) = tapproof_identity::new_csr(None).unwrap();
    let body = serde_json::to_value(SignRequest {
        csrs: vec![SignItem {
            id: "spiffe://example.org/node/a".into(),
            csr,
        }],
    })
    .unwrap();
    let (status, v) = s.call(Some(&a), "POST", paths::SIGN, body).await.unwrap();
    assert_eq!(status, 200, "an expired newest certificate could not renew: {v}");
    let a2 = identity(v["identities"][0]["chain_pem"].as_str().unwrap().to_owned(), key);
    let (status, v) = s.call(Some(&a2), "GET", paths::STATE, Value::Null).await.unwrap();
    assert_eq!(status, 200, "{v}");
    // An older certificate of a node does not recover it.
    let (status, v) = s
        .call(
            Some(&b_old),
            "POST",
            paths::SIGN,
            sign_body("spiffe://example.org/node/b"),
        )
        .await
        .unwrap();
    assert_eq!((status, code(&v)), (401, "certificate_expired"), "{v}");
    assert!(!s.audit_rows("sign.refused").await.is_empty());
    // A revoked node does not recover either (revocation is asked first).
    let admin = s.admin("alice").await;
    s.revoke(&admin, RevocationKind::Node, "b").await;
    let (status, v) = s
        .call(
            Some(&b_new),
            "POST",
            paths::SIGN,
            sign_body("spiffe://example.org/node/b"),
        )
        .await
        .unwrap();
    assert_eq!((status, code(&v)), (403, "node_revoked"), "{v}");

    // Past the window the handshake itself is refused.
    while now_unix() <= expiry(&late) + 7 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = s
        .call(
            Some(&late),
            "POST",
            paths::SIGN,
            sign_body("spiffe://example.org/node/late"),
        )
        .await;
    assert!(refused.is_err(), "renewed past the window: {refused:?}");
    s.stop().await;
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// One client's request rate and one node's held long-polls are capped, and only that client's:
/// over the cap it gets 429 `rate_limited` at once, another node is served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_and_long_polls_are_capped_per_client() {
    let limits = tapproof_server::Limits {
        requests_per_second: 5,
        long_polls_per_node: 2,
        ..Default::default()
    };
    let s = start_with(limits, Duration::from_secs(3600)).await;
    let greedy = s.join("web-1", &[]).await;
    let other = s.join("web-2", &[]).await;
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    let started = std::time::Instant::now();
    for _ in 0..60 {
        let (status, v) = s
            .call(Some(&greedy), "GET", paths::STATE, Value::Null)
            .await
            .unwrap();
        *codes.entry(format!("{status} {}", code(&v))).or_default() += 1;
    }
    // A burst of 4 x 5 = 20, then 5 a second for as long as the 60 calls took (each is a new
    // TLS connection: on a busy machine they take seconds, and the bucket refills meanwhile).
    let refilled = (5.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    let served = codes.get("200 ").copied().unwrap_or(0);
    let limited = codes.get("429 rate_limited").copied().unwrap_or(0);
    assert_eq!(served + limited, 60, "only answers or rate limits: {codes:?}");
    assert!(
        (20..=21 + refilled).contains(&served),
        "60 requests in a row with a burst of 20 and 5/s ({refilled} refilled meanwhile): {codes:?}"
    );
    let (status, _) = s
        .call(Some(&other), "GET", paths::STATE, Value::Null)
        .await
        .unwrap();
    assert_eq!(status, 200, "another node paid for the greedy one");

    // Long-polls: wait for the bucket to refill, then hold two; the third is refused at once.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, v) = s
        .call(Some(&other), "GET", paths::STATE, Value::Null)
        .await
        .unwrap();
    let version = v["version"].as_i64().unwrap();
    let path = format!("/v1/state?since={version}");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = s.conn(Some(&other)).await.unwrap();
        let path = path.clone();
        held.push(tokio::spawn(async move { conn.call("GET", &path, vec![]).await }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(held.iter().all(|h| !h.is_finished()), "the long-polls wait");
    let started = std::time::Instant::now();
    let (status, v) = s.call(Some(&other), "GET", &path, Value::Null).await.unwrap();
    assert_eq!((status, code(&v)), (429, "rate_limited"), "{v}");
    assert!(started.elapsed() < Duration::from_secs(2), "refused, not held");
    // The greedy node's own long-polls are its own.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut conn = s.conn(Some(&greedy)).await.unwrap();
    let own = tokio::spawn(async move { conn.call("GET", &path, vec![]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !own.is_finished(),
        "another node's long-polls counted against this one"
    );
    s.stop().await;
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().0, 200);
    }
}

/// One plain HTTP/1.0 GET on the admin listener: status, content type, body.
async fn admin_get(s: &Server, path: &str, accept: Option<&str>) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.admin).await.unwrap();
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{accept}\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_metrics_health_and_readiness() {
    let s = start().await;
    let (status, _, body) = admin_get(&s, "/healthz", None).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, body) = admin_get(&s, "/readyz", None).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    // A join, a renewal, a bad join, a coverage report.
    let node = s.join("web-1", &[]).await;
    let id = format!("spiffe://{TD}/node/web-1");
    let (status, v) = s
        .call(Some(&node), "POST", paths::SIGN, sign_body(&id))
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let bad = json!({ "token": "tp1.nope.nope", "csr": "x" });
    let (status, v) = s.call(None, "POST", paths::JOIN, bad).await.unwrap();
    assert!(status >= 400, "{v}");
    let bad_code = code(&v).to_owned();
    let (status, v) = s
        .call(Some(&node), "POST", paths::COVERAGE, coverage_body())
        .await
        .unwrap();
    assert_eq!(status, 204, "{v}");

    // A long-poll waits; a revocation (of another serial) wakes it, and the fan-out is timed.
    let (_, v) = s
        .call(Some(&node), "GET", paths::STATE, Value::Null)
        .await
        .unwrap();
    let version = v["version"].as_i64().unwrap();
    let mut conn = s.conn(Some(&node)).await.unwrap();
    let waiting = tokio::spawn(async move {
        conn.call("GET", &format!("/v1/state?since={version}"), vec![])
            .await
    });
    let mut watchers = 0.0;
    for _ in 0..100 {
        let (_, _, body) = admin_get(&s, "/metrics", None).await;
        watchers = metric_value(&body, "tapproof_server_feed_watchers", &[]);
        if watchers == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(watchers, 1.0, "the waiting long-poll is counted");
    let admin = s.admin("ops").await;
    s.revoke(&admin, RevocationKind::Serial, "0badc0ffee").await;
    let (status, v) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the revocation wakes the long-poll")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{v}");

    // A plain scrape gets the Prometheus text format; an OpenMetrics scraper gets OpenMetrics.
    let (status, ctype, body) = admin_get(&s, "/metrics", None).await;
    assert_eq!(status, 200);
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!body.contains("# EOF"), "{body}");
    let bad_result = format!("result=\"{bad_code}\"");
    let bad_refusal = format!("code=\"{bad_code}\"");
    for (name, labels, want) in [
        ("tapproof_server_joins_total", &["result=\"ok\""][..], 1.0),
        ("tapproof_server_joins_total", &[bad_result.as_str()][..], 1.0),
        ("tapproof_server_signings_total", &["result=\"ok\""][..], 1.0),
        (
            "tapproof_server_coverage_reports_total",
            &["result=\"ok\""][..],
            1.0,
        ),
        ("tapproof_server_refusals_total", &[bad_refusal.as_str()][..], 1.0),
        (
            "tapproof_server_requests_total",
            &["route=\"/v1/join\"", "result=\"ok\""][..],
            1.0,
        ),
        ("tapproof_server_feed_watchers", &[][..], 0.0),
        ("tapproof_server_feed_fanout_duration_seconds_count", &[][..], 1.0),
        ("tapproof_server_store_up", &[][..], 1.0),
        ("tapproof_build_info", &["role=\"server\""][..], 1.0),
    ] {
        assert_eq!(
            metric_value(&body, name, labels),
            want,
            "{name}{labels:?} in\n{body}"
        );
    }
    assert!(metric_value(&body, "tapproof_server_store_probe_duration_seconds_count", &[]) >= 1.0);
    assert!(metric_value(&body, "process_resident_memory_bytes", &[]) > 0.0);
    let root_expiry = body
        .lines()
        .find(|l| {
            l.starts_with("tapproof_server_ca_not_after_timestamp_seconds{kind=\"root\",state=\"active\"")
        })
        .unwrap_or_else(|| panic!("no root expiry in\n{body}"));
    let expiry: f64 = root_expiry.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        expiry > now_unix() as f64 + 9.0 * 365.0 * 86400.0,
        "{root_expiry}"
    );
    tapproof_test_util::promtool::check_metrics(&body);

    let (_, ctype, open) = admin_get(
        &s,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    )
    .await;
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(open.ends_with("# EOF\n"), "{open}");

    // Draining: not ready (the listener stops with the server).
    s.stop().await;
}

/// A reusable (kubeadm-style) token: each agent names itself within the pattern; exactly `uses`
/// joins succeed; a name outside the pattern, a name that already joined and a missing name are
/// refused with `bad_node`, a spent token with `token_used`, an expired one with
/// `token_expired`; every use and every refusal has its audit row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reusable_token_joins_its_uses_within_its_pattern() {
    let s = start().await;
    let nodes = tapproof_server::TokenFor::Pattern {
        pattern: "k8s-*".into(),
        uses: 2,
    };
    let token = tapproof_server::create_token_for(
        &*s.store,
        &s.td,
        s.addr.to_string(),
        &nodes,
        &["web".to_owned()],
        Duration::from_secs(300),
    )
    .await
    .unwrap();
    let join = |name: Option<&str>| {
        let (token, name) = (token.to_string(), name.map(str::to_owned));
        async move {
            let (csr, _) = tapproof_identity::new_csr(None).unwrap();
            let body = serde_json::to_vec(&JoinRequest {
                token,
                csr,
                node: name,
            })
            .unwrap();
            let mut anon = ApiConn::open(s.addr, TD, ServerTrust::Pin(s.pin), None)
                .await
                .unwrap();
            anon.call("POST", paths::JOIN, body).await.unwrap()
        }
    };
    let (status, v) = join(Some("k8s-a")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["node"], "k8s-a");
    assert_eq!(v["identity"]["id"], format!("spiffe://{TD}/node/k8s-a"));
    assert_eq!(v["services"], json!(["web"]));
    for (name, why) in [
        (Some("k8s-a"), "already joined"),
        (Some("db-1"), "outside the token's pattern"),
        (Some("k8s-A/x"), "must be 1 to 63"),
        (None, "must name itself"),
    ] {
        let (status, v) = join(name).await;
        assert_eq!((status, code(&v)), (400, "bad_node"), "{name:?}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(why),
            "{name:?}: {v}"
        );
    }
    let (status, v) = join(Some("k8s-b")).await;
    assert_eq!(status, 200, "refusals use nothing up: {v}");
    let (status, v) = join(Some("k8s-c")).await;
    assert_eq!(code(&v), "token_used", "{status} {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("all of its 2 uses"),
        "{v}"
    );

    let joins = s.audit_rows("node.join").await;
    let uses: Vec<(String, i64)> = joins
        .iter()
        .map(|r| {
            (
                details(r)["node"].as_str().unwrap().to_owned(),
                details(r)["token_use"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(uses, vec![("k8s-a".to_owned(), 1), ("k8s-b".to_owned(), 2)]);
    assert!(joins.iter().all(|r| details(r)["node_pattern"] == "k8s-*"));
    let refused = s.audit_rows("join.refused").await;
    let reasons: Vec<String> = refused
        .iter()
        .map(|r| details(r)["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        reasons,
        vec!["bad_node", "bad_node", "bad_node", "bad_node", "token_used"],
        "{refused:?}"
    );
    let created = s.audit_rows("token.create").await;
    assert_eq!(details(created.last().unwrap())["uses"], 2);

    // Past its TTL.
    let expired =
        tapproof_server::create_token_for(&*s.store, &s.td, s.addr.to_string(), &nodes, &[], Duration::ZERO)
            .await
            .unwrap();
    let (csr, _) = tapproof_identity::new_csr(None).unwrap();
    let body = serde_json::to_vec(&JoinRequest {
        token: expired.to_string(),
        csr,
        node: Some("k8s-z".into()),
    })
    .unwrap();
    let mut anon = ApiConn::open(s.addr, TD, ServerTrust::Pin(s.pin), None)
        .await
        .unwrap();
    let (_, v) = anon.call("POST", paths::JOIN, body).await.unwrap();
    assert_eq!(code(&v), "token_expired", "{v}");
    s.stop().await;
}

fn details(row: &tapproof_store::AuditEntry) -> Value {
    serde_json::from_str(&row.details).unwrap()
}

/// The dashboard shows per tunnel the service, both identities and the TLS the agent reported,
/// labels a control-plane connection as such, and lists the CA and the revocations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_each_tunnels_identities_and_tls_the_ca_and_revocations() {
    let s = start().await;
    let admin = s.admin("ops").await;
    let web = s.join("web-1", &[]).await;
    let mut report = tapproof_audit::classify(
        &tapproof_audit::scan::Scan::default(),
        &tapproof_audit::Options::default(),
        "web-1".into(),
        0,
    );
    let link = |remote: &str, via, session| tapproof_audit::Link {
        class: tapproof_audit::Class::Tapproof,
        role: tapproof_audit::Role::Client,
        local: "10.0.0.1:40000".parse().unwrap(),
        remote: remote.parse().unwrap(),
        process: Some("tapproof".into()),
        pid: Some(1),
        detail: "vouched".into(),
        via: Some(via),
        session,
    };
    report.links.push(link(
        "10.0.0.2:15008",
        tapproof_audit::VouchedKind::TunnelOut,
        Some(tapproof_audit::VouchedSession {
            peer_id: format!("spiffe://{TD}/node/db-1"),
            tls_version: "TLSv1.3".into(),
            cipher: "TLS_AES_256_GCM_SHA384".into(),
            group: "X25519MLKEM768".into(),
            service: Some("db".into()),
        }),
    ));
    report
        .links
        .push(link("10.0.0.9:15443", tapproof_audit::VouchedKind::Control, None));
    let upload = serde_json::to_value(tapproof_audit::CoverageUpload {
        report,
        denials: vec![],
        handshakes: vec![],
        selftest: None,
    })
    .unwrap();
    let (status, v) = s.call(Some(&web), "POST", paths::COVERAGE, upload).await.unwrap();
    assert_eq!(status, 204, "{v}");
    s.revoke(&admin, RevocationKind::Node, "old-1").await;

    let (status, d) = s
        .call(Some(&admin), "GET", paths::DASHBOARD_DATA, Value::Null)
        .await
        .unwrap();
    assert_eq!(status, 200, "{d}");
    let links = d["links"].as_array().unwrap();
    let tunnel = links
        .iter()
        .find(|l| l["via"] == "tunnel_out")
        .unwrap_or_else(|| panic!("{d}"));
    assert_eq!(tunnel["from"], "web-1");
    assert_eq!(tunnel["from_id"], format!("spiffe://{TD}/node/web-1"));
    assert_eq!(tunnel["peer_id"], format!("spiffe://{TD}/node/db-1"));
    assert_eq!(tunnel["service"], "db");
    assert_eq!(tunnel["tls_version"], "TLSv1.3");
    assert_eq!(tunnel["cipher"], "TLS_AES_256_GCM_SHA384");
    assert_eq!(tunnel["group"], "X25519MLKEM768");
    let control = links.iter().find(|l| l["via"] == "control").unwrap();
    assert_eq!(control["to"], "control plane");
    assert!(control["peer_id"].is_null());
    let revoked = d["revocations"].as_array().unwrap();
    assert_eq!((revoked.len(), &revoked[0]["value"]), (1, &json!("old-1")), "{d}");
    let ca: Vec<(&str, &str)> = d["ca"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["kind"].as_str().unwrap(), c["state"].as_str().unwrap()))
        .collect();
    assert_eq!(ca, [("root", "active"), ("intermediate", "active")], "{d}");
}

#[tokio::test]
async fn the_dashboard_shows_each_nodes_capture_mode_and_plaintext_attempts_over_time() {
    let s = start().await;
    let admin = s.admin("ops").await;
    let db = s.join("db-1", &[]).await;
    let web = s.join("web-1", &[]).await;
    let upload = |mode: tapproof_audit::InboundMode, sources: &[&str]| {
        let capture = tapproof_audit::CaptureState {
            inbound: mode,
            rules_installed: true,
            inbound_ports: vec![5432],
            attempts: sources
                .iter()
                .map(|s| tapproof_audit::PlaintextAttempt {
                    source: s.parse().unwrap(),
                    port: 5432,
                    packets: 1,
                })
                .collect(),
            ..Default::default()
        };
        let sockets = tapproof_audit::AgentSockets {
            capture: Some(capture),
            ..Default::default()
        };
        let options = tapproof_audit::Options {
            agent: tapproof_audit::AgentView::Vouched(sockets),
            ..Default::default()
        };
        let report =
            tapproof_audit::classify(&tapproof_audit::scan::Scan::default(), &options, "db-1".into(), 0);
        serde_json::to_value(tapproof_audit::CoverageUpload {
            report,
            denials: vec![],
            handshakes: vec![],
            selftest: None,
        })
        .unwrap()
    };
    let monitor = tapproof_audit::InboundMode::Monitor;
    let post = |who, body| s.call(Some(who), "POST", paths::COVERAGE, body);
    assert_eq!(
        post(&db, upload(monitor, &["10.0.0.7", "10.0.0.8"]))
            .await
            .unwrap()
            .0,
        204
    );
    // The agent without capture reports none: its row says so (no mode, no count).
    assert_eq!(post(&web, coverage_body()).await.unwrap().0, 204);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        post(&db, upload(tapproof_audit::InboundMode::Enforce, &["10.0.0.7"]))
            .await
            .unwrap()
            .0,
        204
    );
    let (status, d) = s
        .call(Some(&admin), "GET", paths::DASHBOARD_DATA, Value::Null)
        .await
        .unwrap();
    assert_eq!(status, 200, "{d}");
    let row = |name: &str| {
        d["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
            .unwrap()
    };
    // Latest report: enforce, and dropped attempts are not plaintext that got through.
    assert_eq!(row("db-1")["capture_mode"], "enforce", "{d}");
    assert_eq!(row("db-1")["plaintext_attempts"], 0, "{d}");
    assert!(
        row("web-1")["capture_mode"].is_null() && row("web-1")["plaintext_attempts"].is_null(),
        "{d}"
    );
    let attempts: Vec<i64> = d["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["plaintext_attempts"].as_i64().unwrap())
        .collect();
    assert_eq!(
        attempts.first(),
        Some(&2),
        "the monitor-mode report's two sources: {d}"
    );
    assert_eq!(attempts.last(), Some(&0), "{d}");
    // Per node over time: db-1's two states in order; web-1 runs no capture, so none.
    let db_history: Vec<(String, i64)> = row("db-1")["capture_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["mode"].as_str().unwrap().to_owned(),
                p["plaintext_attempts"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        db_history,
        [("monitor".to_owned(), 2), ("enforce".to_owned(), 0)],
        "{d}"
    );
    assert_eq!(row("web-1")["capture_history"], json!([]), "{d}");
}

/// A site gateway's report carries its traffic per remote site: the dashboard lists each site
/// pair and direction with flows, bytes, refusals and what its rules did with routed traffic.
#[tokio::test]
async fn the_dashboard_shows_each_gateways_sites_and_interconnect_traffic() {
    let s = start().await;
    let admin = s.admin("ops").await;
    let gw = s.join("gw-a", &[]).await;
    let traffic = |direction: &str, tcp, udp, sent, received, refused| tapproof_audit::SiteTraffic {
        site: "dc-b".into(),
        direction: direction.into(),
        tcp_flows: tcp,
        udp_flows: udp,
        bytes_sent: sent,
        bytes_received: received,
        refused,
    };
    let capture = tapproof_audit::CaptureState {
        rules_installed: true,
        gateway: Some(tapproof_audit::GatewayReport {
            site: "dc-a".into(),
            routed_connections: 7,
            routed_datagrams: 3,
            dropped_packets: 2,
            sites: vec![
                traffic("to", 5, 2, 1000, 90_000, 0),
                traffic("from", 1, 0, 10, 20, 4),
            ],
        }),
        ..Default::default()
    };
    let options = tapproof_audit::Options {
        agent: tapproof_audit::AgentView::Vouched(tapproof_audit::AgentSockets {
            capture: Some(capture),
            ..Default::default()
        }),
        ..Default::default()
    };
    let report = tapproof_audit::classify(&tapproof_audit::scan::Scan::default(), &options, "gw-a".into(), 0);
    let body = serde_json::to_value(tapproof_audit::CoverageUpload {
        report,
        denials: vec![],
        handshakes: vec![],
        selftest: None,
    })
    .unwrap();
    assert_eq!(
        s.call(Some(&gw), "POST", paths::COVERAGE, body).await.unwrap().0,
        204
    );
    let (status, d) = s
        .call(Some(&admin), "GET", paths::DASHBOARD_DATA, Value::Null)
        .await
        .unwrap();
    assert_eq!(status, 200, "{d}");
    let sites = d["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 2, "{d}");
    let from = &sites[0];
    let to = &sites[1];
    assert_eq!(
        (from["direction"].as_str(), to["direction"].as_str()),
        (Some("from"), Some("to")),
        "{d}"
    );
    assert_eq!(to["node"], "gw-a");
    assert_eq!(to["site"], "dc-a");
    assert_eq!(to["remote_site"], "dc-b");
    assert_eq!(
        (to["tcp_flows"].as_u64(), to["udp_flows"].as_u64()),
        (Some(5), Some(2))
    );
    assert_eq!(
        (to["bytes_sent"].as_u64(), to["bytes_received"].as_u64()),
        (Some(1000), Some(90_000))
    );
    assert_eq!(from["refused"], 4);
    assert_eq!(
        (
            to["routed_connections"].as_u64(),
            to["routed_datagrams"].as_u64(),
            to["dropped_packets"].as_u64()
        ),
        (Some(7), Some(3), Some(2))
    );
}

/// Where clients reach a service: a node announces the addresses of the services it is
/// registered for (others are ignored), the directory lists them for every node, a new
/// announcement replaces the old, and a malformed one is refused naming the pair and stores
/// nothing. The policy's capture modes reach every agent in the feed, and a change of them is an
/// audit row of its own with the modes before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_addresses_and_the_policys_capture_modes_reach_the_feed() {
    let s = start().await;
    let admin = s.admin("ops").await;
    let db = s.join("db-1", &["db"]).await;
    let web = s.join("web-1", &[]).await;
    let feed = |who: &Identity, query: String| {
        let who = Identity {
            chain: who.chain.clone(),
            key: who.key.clone(),
            serial: who.serial.clone(),
        };
        let s = &s;
        async move {
            let (status, v) = s
                .call(
                    Some(&who),
                    "GET",
                    &format!("{}?{query}", paths::STATE),
                    Value::Null,
                )
                .await
                .unwrap();
            (status, v)
        }
    };
    // `[`, `]`, `=` and `,` percent-encoded, as the agent sends them.
    let q = "tunnel=10.0.0.2:15008&addresses=db%3D10.0.0.2%3A5432%2Cdb%3D%5Bfd00%3A%3A2%5D%3A5432%2Cother%3D10.0.0.2%3A1";
    let (status, v) = feed(&db, q.into()).await;
    assert_eq!(status, 200, "{v}");
    let addresses = |v: &Value| -> Vec<String> {
        let state: StateResponse = serde_json::from_value(v.clone()).unwrap();
        state
            .directory
            .into_iter()
            .filter(|e| e.node == "db-1")
            .flat_map(|e| e.addresses)
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, v) = feed(&web, String::new()).await;
        if addresses(&v) == ["10.0.0.2:5432", "[fd00::2]:5432"] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "directory: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        s.store.registrations().await.unwrap()[0].addresses,
        ["10.0.0.2:5432", "[fd00::2]:5432"],
        "the unregistered service's address is not stored"
    );
    for (bad, says) in [
        ("addresses=db%3D10.0.0.2", "not ADDR:PORT"),
        ("addresses=db%3D0.0.0.0%3A5432", "unspecified"),
        ("addresses=nonsense", "not SERVICE=ADDR:PORT"),
    ] {
        let (status, v) = feed(&db, bad.into()).await;
        assert_eq!((status, code(&v)), (400, "bad_query"), "{bad}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(says), "{v}");
    }
    assert_eq!(s.store.registrations().await.unwrap()[0].addresses.len(), 2);
    // A parameter the server does not know is named in the refusal: agents read exactly this
    // ("unknown field `addresses`") from an older server and go on without announcing.
    let (status, v) = feed(&db, "bogus=1".into()).await;
    assert_eq!((status, code(&v)), (400, "bad_query"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `bogus`"),
        "{v}"
    );
    // An empty announcement withdraws them.
    let (status, _) = feed(&db, "addresses=".into()).await;
    assert_eq!(status, 200);
    assert!(s.store.registrations().await.unwrap()[0].addresses.is_empty());

    // The policy's capture modes, in the feed and in the audit log.
    let policy =
        json!({ "services": {}, "capture": { "inbound": "monitor", "nodes": { "db-1": "enforce" } } });
    let (status, v) = s.call(Some(&admin), "POST", paths::POLICY, policy).await.unwrap();
    assert_eq!(status, 200, "{v}");
    // The feed's document is rebuilt at its next version (the server sees the store change
    // within a second).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let state = loop {
        let (_, v) = feed(&web, String::new()).await;
        let state: StateResponse = serde_json::from_value(v).unwrap();
        if !state.capture.is_empty() || std::time::Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        state.capture.mode_for("db-1"),
        Some(tapproof_api::InboundMode::Enforce)
    );
    assert_eq!(
        state.capture.mode_for("web-1"),
        Some(tapproof_api::InboundMode::Monitor)
    );
    let rows = s.audit_rows("capture.mode.set").await;
    assert_eq!(rows.len(), 1);
    let d = details(&rows[0]);
    assert_eq!(d["before"], json!({}));
    assert_eq!(d["after"]["nodes"]["db-1"], "enforce");
    assert!(rows[0].actor.ends_with("/admin/ops"), "{}", rows[0].actor);
    // The same capture section again (another service rule): no new capture row.
    let policy = json!({ "services": { "db": { "allow": ["spiffe://example.org/node/web-1"] } }, "capture": { "inbound": "monitor", "nodes": { "db-1": "enforce" } } });
    let (status, _) = s.call(Some(&admin), "POST", paths::POLICY, policy).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(s.audit_rows("capture.mode.set").await.len(), 1);
    // Bad modes and node names are refused.
    for bad in [
        json!({ "capture": { "inbound": "block" } }),
        json!({ "capture": { "nodes": { "Not A Node/x": "enforce" } } }),
    ] {
        let (status, v) = s
            .call(Some(&admin), "POST", paths::POLICY, bad.clone())
            .await
            .unwrap();
        assert_eq!(status, 400, "{bad}: {v}");
    }
    s.stop().await;
}

/// `POST /v1/events`: a node records what an operator did on it; the row names the node as
/// actor. Unknown kinds, oversized or control-character text, strangers and admins are refused,
/// and nothing is recorded for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_records_what_an_operator_did_on_it() {
    let s = start().await;
    let admin = s.admin("ops").await;
    let node = s.join("db-1", &["db"]).await;
    let event = json!({ "kind": "capture_removed", "by": "alice (via sudo as root, uid 0)", "reason": "decommissioning", "captured": 3, "inbound": "enforce" });
    let (status, v) = s
        .call(Some(&node), "POST", paths::EVENTS, event.clone())
        .await
        .unwrap();
    assert_eq!(status, 204, "{v}");
    let rows = s.audit_rows("capture.removed").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].actor, "spiffe://example.org/node/db-1");
    let d = details(&rows[0]);
    assert_eq!(
        (d["by"].as_str(), d["reason"].as_str()),
        (Some("alice (via sudo as root, uid 0)"), Some("decommissioning"))
    );
    assert_eq!(
        (d["captured"].as_u64(), d["inbound"].as_str()),
        (Some(3), Some("enforce"))
    );
    for (who, body, status_wanted) in [
        (
            Some(&node),
            json!({ "kind": "anything", "by": "x", "reason": "y" }),
            400,
        ),
        (
            Some(&node),
            json!({ "kind": "capture_removed", "by": "x".repeat(2000), "reason": "y" }),
            400,
        ),
        (
            Some(&node),
            json!({ "kind": "capture_removed", "by": "x\ny", "reason": "y" }),
            400,
        ),
        (
            Some(&node),
            json!({ "kind": "capture_removed", "by": "x", "reason": "y", "extra": 1 }),
            400,
        ),
        (Some(&admin), event.clone(), 403),
        (None, event.clone(), 401),
    ] {
        let (status, v) = s.call(who, "POST", paths::EVENTS, body.clone()).await.unwrap();
        assert_eq!(status, status_wanted, "{body}: {v}");
    }
    assert_eq!(
        s.audit_rows("capture.removed").await.len(),
        1,
        "nothing refused was recorded"
    );
    s.stop().await;
}

//! The tapproof control plane: a certificate authority and registry behind an HTTPS API.
//! `init` makes the root and intermediate CAs (keys sealed with the key-encryption key) in the
//! store; `run` serves `/v1` (join with a token, signing over mTLS, the trust bundle, OpenAPI);
//! `create_token` issues single-use join tokens; `verify_audit` checks the audit log's chain.

pub mod admin;
mod app;
mod auth;
mod ca;
mod coverage;
mod dashboard;
mod enrol;
mod events;
pub mod evidence;
mod evidence_report;
mod feed;
pub mod kek;
pub mod limits;
mod metrics;
mod openapi;
mod ops;
pub mod probes;
pub mod rollover;
mod routes;
mod serve;

pub use ca::Ca;
pub use limits::Limits;
pub use serve::{run, RunOptions, DEFAULT_HANDSHAKE_RETENTION};

use kek::{Kek, KekError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
pub use tapproof_api::{Policy, ServicePolicy};
use tapproof_identity::{JoinToken, TrustDomain};
use tapproof_store::{CaKind, CaState, NewAudit, NewToken, Store, StoreError};

pub const DEFAULT_LISTEN: &str = "0.0.0.0:15443";
pub const ROOT_LIFETIME: time::Duration = time::Duration::days(3650);
pub const INTERMEDIATE_LIFETIME: time::Duration = time::Duration::days(365);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kek(#[from] KekError),
    #[error("data dir {path}: {detail}")]
    DataDir { path: PathBuf, detail: String },
    #[error("the store already holds a CA; `tapproof server init` runs once per trust domain")]
    AlreadyInitialised,
    #[error("the store holds no active CA; run `tapproof server init` first")]
    NotInitialised,
    #[error("certificate authority: {0}")]
    Ca(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot listen on {addr}: {detail}")]
    Bind {
        addr: std::net::SocketAddr,
        detail: String,
    },
}

/// `server.json` in the data dir: what `init` decided, read by every later command.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerMeta {
    pub trust_domain: String,
    /// `sqlite:<path>` or a PostgreSQL URL (without password: give that with --store).
    pub store: String,
}

pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn data_err(path: &Path, e: impl std::fmt::Display) -> ServerError {
    ServerError::DataDir {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

pub fn default_kek_file(data_dir: &Path) -> PathBuf {
    data_dir.join("kek.key")
}

pub fn default_store(data_dir: &Path) -> String {
    format!("sqlite:{}", data_dir.join("tapproof.db").display())
}

pub fn read_meta(data_dir: &Path) -> Result<ServerMeta, ServerError> {
    let path = data_dir.join("server.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| data_err(&path, format!("{e}; run `tapproof server init` first")))?;
    serde_json::from_str(&text).map_err(|e| data_err(&path, e))
}

pub struct InitReport {
    pub trust_domain: TrustDomain,
    pub root_pin: [u8; 32],
    pub store: String,
}

/// Makes the root and intermediate CA of `trust_domain`, seals their keys, records them.
pub async fn init(
    trust_domain: TrustDomain,
    data_dir: &Path,
    store_url: Option<String>,
    kek_file: Option<PathBuf>,
) -> Result<InitReport, ServerError> {
    init_with(
        trust_domain,
        data_dir,
        store_url,
        kek_file,
        tapproof_identity::KeyAlgorithm::EcdsaP256,
    )
    .await
}

/// `init` with CA keys of `algorithm` (`server init --profile cnsa2`: ML-DSA-87).
pub async fn init_with(
    trust_domain: TrustDomain,
    data_dir: &Path,
    store_url: Option<String>,
    kek_file: Option<PathBuf>,
    algorithm: tapproof_identity::KeyAlgorithm,
) -> Result<InitReport, ServerError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| data_err(data_dir, e))?;
    let kek = Kek::create_or_load(&kek_file.unwrap_or_else(|| default_kek_file(data_dir)))?;
    let store_url = store_url.unwrap_or_else(|| default_store(data_dir));
    let store = tapproof_store::open(&store_url).await?;
    if !store.ca_list().await?.is_empty() {
        return Err(ServerError::AlreadyInitialised);
    }
    let (root_id, inter_id, root_pin) =
        ca::create_pair(&*store, &kek, &trust_domain, CaState::Active, algorithm).await?;
    let t = now();
    store
        .audit_append(
            NewAudit {
                actor: "cli".into(),
                action: "ca.init".into(),
                details: serde_json::json!({
                    "trust_domain": trust_domain.as_str(),
                    "root_id": root_id,
                    "intermediate_id": inter_id,
                    "root_sha256": hex::encode(root_pin),
                    "key_algorithm": algorithm.as_str(),
                }),
            },
            t,
        )
        .await?;
    let meta = ServerMeta {
        trust_domain: trust_domain.to_string(),
        store: redact_store(&store_url),
    };
    let meta_path = data_dir.join("server.json");
    std::fs::write(
        &meta_path,
        serde_json::to_vec_pretty(&meta).expect("plain struct serialises"),
    )
    .map_err(|e| data_err(&meta_path, e))?;
    Ok(InitReport {
        trust_domain,
        root_pin,
        store: meta.store,
    })
}

fn redact_store(url: &str) -> String {
    if url.starts_with("postgres") {
        tapproof_store::PostgresStore::redacted(url)
    } else {
        url.to_owned()
    }
}

/// Opens the store named by `--store`, else the one `init` recorded.
pub async fn open_store(
    data_dir: &Path,
    store_url: Option<&str>,
) -> Result<(ServerMeta, Arc<dyn Store>), ServerError> {
    let meta = read_meta(data_dir)?;
    let url = store_url.map(str::to_owned).unwrap_or_else(|| meta.store.clone());
    let store = tapproof_store::open_existing(&url).await?;
    Ok((meta, store))
}

/// Which nodes a join token is for.
#[derive(Debug, Clone)]
pub enum TokenFor {
    /// One node, named here; single-use.
    Node(String),
    /// Up to `uses` nodes, each naming itself within the pattern (kubeadm-style, for a DaemonSet
    /// or an autoscaling group). Anyone holding it can make that many node identities until it
    /// expires: keep the TTL and the count small, the pattern narrow (README).
    Pattern { pattern: String, uses: u32 },
}

/// Issues a single-use join token for `node`.
pub async fn create_token(
    store: &dyn Store,
    trust_domain: &TrustDomain,
    server: String,
    node: &str,
    services: &[String],
    ttl: std::time::Duration,
) -> Result<JoinToken, ServerError> {
    create_token_for(
        store,
        trust_domain,
        server,
        &TokenFor::Node(node.to_owned()),
        services,
        ttl,
    )
    .await
}

/// Issues a join token for one node or (reusable) for nodes matching a pattern; audited as
/// `token.create`.
pub async fn create_token_for(
    store: &dyn Store,
    trust_domain: &TrustDomain,
    server: String,
    nodes: &TokenFor,
    services: &[String],
    ttl: std::time::Duration,
) -> Result<JoinToken, ServerError> {
    let (node, pattern, max_uses) = match nodes {
        TokenFor::Node(node) => {
            trust_domain
                .node_id(node)
                .map_err(|e| ServerError::Invalid(format!("--node {node:?}: {e}")))?;
            (node.clone(), false, 1)
        }
        TokenFor::Pattern { pattern, uses } => {
            tapproof_identity::NodePattern::parse(pattern)
                .map_err(|e| ServerError::Invalid(format!("--node-pattern: {e}")))?;
            if *uses == 0 {
                return Err(ServerError::Invalid("--uses must be at least 1".into()));
            }
            (pattern.clone(), true, i64::from(*uses))
        }
    };
    for s in services {
        trust_domain
            .service_id(s)
            .map_err(|e| ServerError::Invalid(format!("--service {s:?}: {e}")))?;
    }
    let root = store
        .ca_list()
        .await?
        .into_iter()
        .filter(|c| c.kind == CaKind::Root && c.state == CaState::Active)
        .max_by_key(|c| c.id)
        .ok_or(ServerError::NotInitialised)?;
    let pin = tapproof_tls::cert_pin(&root.cert_pem).map_err(|e| ServerError::Ca(e.to_string()))?;
    let token = JoinToken::new(server, pin);
    let t = now();
    store
        .token_insert(NewToken {
            id: token.id.clone(),
            secret_hash: token.secret_hash(),
            node: node.clone(),
            pattern,
            services: services.to_vec(),
            expires_at: t + ttl.as_secs() as i64,
            created_at: t,
            max_uses,
        })
        .await?;
    let mut details =
        serde_json::json!({ "token_id": token.id, "services": services, "ttl_s": ttl.as_secs() });
    if pattern {
        details["node_pattern"] = node.into();
        details["uses"] = max_uses.into();
    } else {
        details["node"] = node.into();
    }
    store
        .audit_append(
            NewAudit {
                actor: "cli".into(),
                action: "token.create".into(),
                details,
            },
            t,
        )
        .await?;
    Ok(token)
}

/// Walks the whole audit log; `Ok(rows)` when intact.
pub async fn verify_audit(
    store: &dyn Store,
) -> Result<Result<i64, Vec<tapproof_store::AuditProblem>>, ServerError> {
    let mut head = (0, tapproof_store::GENESIS_HASH.to_vec());
    let mut problems = Vec::new();
    loop {
        let rows = store.audit_list(head.0, 1000).await?;
        let Some(last) = rows.last() else { break };
        let next = (last.seq, last.hash.clone());
        if let Err(mut p) = tapproof_store::verify_chain(&rows, head) {
            problems.append(&mut p);
        }
        head = next;
    }
    Ok(if problems.is_empty() {
        Ok(head.0)
    } else {
        Err(problems)
    })
}

/// Revokes a node, a SPIFFE ID or a certificate serial: agents refuse it and close its tunnels
/// within seconds (through the state feed), and the server refuses its renewals.
pub async fn revoke(
    store: &dyn Store,
    kind: tapproof_store::RevocationKind,
    value: &str,
    reason: &str,
) -> Result<tapproof_store::Revocation, ServerError> {
    revoke_as(store, kind, value, reason, "cli").await
}

/// `revoke`, recording `actor` (an admin's SPIFFE ID over the API) in the audit log.
pub async fn revoke_as(
    store: &dyn Store,
    kind: tapproof_store::RevocationKind,
    value: &str,
    reason: &str,
    actor: &str,
) -> Result<tapproof_store::Revocation, ServerError> {
    use tapproof_store::RevocationKind;
    if value.is_empty() {
        return Err(ServerError::Invalid("say what to revoke".into()));
    }
    // Checked here, once, for the CLI and the API alike: a revocation that can match nothing is
    // refused rather than kept as a false comfort.
    let value = match kind {
        RevocationKind::Serial => tapproof_identity::normalize_serial(value).ok_or_else(|| {
            ServerError::Invalid(format!(
                "serial {value:?} is not hex (copy it from `tapproof status` or `openssl x509 -serial`)"
            ))
        })?,
        RevocationKind::SpiffeId => tapproof_identity::SpiffeId::parse(value)
            .map_err(|e| ServerError::Invalid(format!("SPIFFE ID {value:?}: {e}")))?
            .to_string(),
        RevocationKind::Node => {
            tapproof_identity::spiffe::validate_segment(value)
                .map_err(|e| ServerError::Invalid(format!("node {value:?}: {e}")))?;
            value.to_owned()
        }
    };
    let value = value.as_str();
    let t = now();
    let revocation = store.revoke(kind, value, reason, t).await?;
    store.notify_change().await?;
    store
        .audit_append(
            NewAudit {
                actor: actor.to_owned(),
                action: "revocation.add".into(),
                details: serde_json::json!({ "kind": kind.as_str(), "value": value, "reason": reason, "id": revocation.id }),
            },
            t,
        )
        .await?;
    Ok(revocation)
}

/// Adds (`add`) or removes a service registration for a node; true when something changed.
pub async fn register(
    store: &dyn Store,
    td: &TrustDomain,
    node: &str,
    service: &str,
    add: bool,
) -> Result<bool, ServerError> {
    register_as(store, td, node, service, add, "cli").await
}

/// `register`, recording `actor` (an admin's SPIFFE ID over the API) in the audit log.
pub async fn register_as(
    store: &dyn Store,
    td: &TrustDomain,
    node: &str,
    service: &str,
    add: bool,
    actor: &str,
) -> Result<bool, ServerError> {
    td.node_id(node)
        .map_err(|e| ServerError::Invalid(format!("--node {node:?}: {e}")))?;
    td.service_id(service)
        .map_err(|e| ServerError::Invalid(format!("--service {service:?}: {e}")))?;
    let changed = if add {
        store.registration_add(node, service).await?
    } else {
        store.registration_remove(node, service).await?
    };
    if changed {
        store.notify_change().await?;
        let action = if add {
            "registration.add"
        } else {
            "registration.remove"
        };
        store
            .audit_append(
                NewAudit {
                    actor: actor.to_owned(),
                    action: action.into(),
                    details: serde_json::json!({ "node": node, "service": service }),
                },
                now(),
            )
            .await?;
    }
    Ok(changed)
}

/// Issues an admin identity `spiffe://<td>/admin/<name>` into `out` (admin.pem, admin.key 0600,
/// bundle.pem), for the admin commands' `--admin-dir`. Runs on the server host (it needs the KEK).
pub async fn issue_admin(
    store: &dyn Store,
    kek: &Kek,
    td: &TrustDomain,
    name: &str,
    lifetime: std::time::Duration,
    out: &Path,
) -> Result<String, ServerError> {
    let id = tapproof_identity::SpiffeId::new(td.clone(), &format!("/admin/{name}"))
        .map_err(|e| ServerError::Invalid(format!("--name {name:?}: {e}")))?;
    let ca = Ca::load(store, kek, td).await?;
    let lifetime = time::Duration::try_from(lifetime).map_err(|e| ServerError::Invalid(e.to_string()))?;
    let issued = ca
        .signer
        .issue_with_new_key(&id, lifetime)
        .map_err(|e| ServerError::Ca(e.to_string()))?;
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .map_err(|e| data_err(out, e))?;
    // The one identity-file writer: mode from the first byte, fsync, rename, so an existing
    // admin.key is replaced by a 0600 file whatever mode it had.
    for (file, contents, mode) in [
        ("admin.key", issued.key_pem.as_str(), 0o600),
        ("admin.pem", issued.chain_pem.as_str(), 0o644),
        ("bundle.pem", &ca.bundle.concat(), 0o644),
    ] {
        let path = out.join(file);
        tapproof_tls::write_identity_file(&path, contents.as_bytes(), mode)
            .map_err(|e| data_err(&path, e))?;
    }
    store
        .audit_append(
            NewAudit {
                actor: "cli".into(),
                action: "admin.issue".into(),
                details: serde_json::json!({ "id": id.to_string(), "not_after": issued.not_after.unix_timestamp() }),
            },
            now(),
        )
        .await?;
    Ok(id.to_string())
}

/// Parses a policy document (TOML, or JSON when it starts with `{`) and checks every service
/// name and pattern against `td`. A blank document is refused: it would replace the fleet's
/// policy with an empty one by accident (an empty body, a file truncated on the way); clearing
/// the policy stays possible, on purpose, with `{}` or `[services]`.
pub fn parse_policy(text: &str, td: &TrustDomain) -> Result<Policy, ServerError> {
    if text.trim().is_empty() {
        return Err(ServerError::Invalid(
            "policy: the document is empty; to clear the policy on purpose send `{}` (JSON) or `[services]` (TOML)"
                .into(),
        ));
    }
    let policy: Policy = if text.trim_start().starts_with('{') {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ServerError::Invalid(format!("policy: {e}")))?;
        // serde takes a JSON array for a struct (its fields by position): `"capture": []` would
        // pass as an empty capture policy. The document's tables must be objects.
        let tables = value.get("capture").into_iter().chain(
            value
                .get("services")
                .and_then(|s| s.as_object())
                .into_iter()
                .flat_map(|s| s.values()),
        );
        if tables.into_iter().any(|t| !t.is_object()) {
            return Err(ServerError::Invalid(
                "policy: capture and each services entry must be JSON objects".into(),
            ));
        }
        serde_json::from_value(value).map_err(|e| ServerError::Invalid(format!("policy: {e}")))?
    } else {
        toml::from_str(text).map_err(|e| ServerError::Invalid(format!("policy: {e}")))?
    };
    for (service, rule) in &policy.services {
        td.service_id(service)
            .map_err(|e| ServerError::Invalid(format!("policy: service {service:?}: {e}")))?;
        for p in &rule.allow {
            let pattern: tapproof_identity::AllowPattern = p
                .parse()
                .map_err(|e| ServerError::Invalid(format!("policy: services.{service}.allow: {e}")))?;
            if pattern.trust_domain() != td {
                return Err(ServerError::Invalid(format!(
                    "policy: services.{service}.allow: {p} is not in trust domain {td}"
                )));
            }
        }
    }
    for node in policy.capture.nodes.keys() {
        td.node_id(node)
            .map_err(|e| ServerError::Invalid(format!("policy: capture.nodes: {node:?}: {e}")))?;
    }
    Ok(policy)
}

/// Replaces the policy; agents apply it within seconds (state feed). A change of the capture
/// modes gets an audit row of its own (`capture.mode.set`, before and after), beside `policy.set`.
pub async fn set_policy(store: &dyn Store, policy: &Policy, actor: &str) -> Result<(), ServerError> {
    let before = get_policy(store).await.unwrap_or_default().capture;
    let json = serde_json::to_string(policy).map_err(|e| ServerError::Invalid(e.to_string()))?;
    store.policy_set(&json, now()).await?;
    store.notify_change().await?;
    store
        .audit_append(
            NewAudit {
                actor: actor.to_owned(),
                action: "policy.set".into(),
                details: serde_json::to_value(policy).unwrap_or_default(),
            },
            now(),
        )
        .await?;
    if before != policy.capture {
        store
            .audit_append(
                NewAudit {
                    actor: actor.to_owned(),
                    action: "capture.mode.set".into(),
                    details: serde_json::json!({ "before": before, "after": policy.capture }),
                },
                now(),
            )
            .await?;
    }
    Ok(())
}

pub async fn get_policy(store: &dyn Store) -> Result<Policy, ServerError> {
    match store.policy_get().await? {
        Some(json) => serde_json::from_str(&json)
            .map_err(|e| ServerError::Ca(format!("stored policy is malformed: {e}"))),
        None => Ok(Policy::default()),
    }
}

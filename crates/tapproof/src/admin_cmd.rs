//! Admin commands that run against the local store or, with `--server --admin-dir`, against the
//! running server over mTLS. One function per command; both ways give it the same typed answers
//! (`tapproof_api`), so both print the same thing: the local way calls the server crate's
//! functions, the remote way the one control-plane client.

use crate::cli::{RemoteArgs, ServerStoreArgs};
use crate::exit::ConfigProblem;
use anyhow::Context;
use std::sync::Arc;
use tapproof_agent::control::{ClientError, ControlClient};
use tapproof_api::{
    AuditEntry, AuditQuery, Handshake, HandshakeQuery, NodeView, Policy, Registration, RegistrationChange,
    Revocation, RevocationKind, RevocationPropagation, RevokeRequest,
};
use tapproof_identity::TrustDomain;
use tapproof_store::Store;

/// Where admin commands act.
pub enum Admin {
    Local { store: Arc<dyn Store>, td: TrustDomain },
    Remote(ControlClient),
}

/// A refusal or outage of the remote server as the CLI reports it: bad input is a config problem
/// (exit 2), the rest a runtime failure (exit 1).
fn remote(e: ClientError) -> anyhow::Error {
    match e.code() {
        Some(tapproof_api::ErrorCode::BadRequest | tapproof_api::ErrorCode::BadPolicy) => {
            ConfigProblem(e.to_string()).into()
        }
        _ => e.into(),
    }
}

impl Admin {
    /// The running server when `--server` is given, else the local store.
    pub async fn open(store: &ServerStoreArgs, remote: &RemoteArgs) -> anyhow::Result<Self> {
        if remote.server.is_some() {
            let (server, tls) = admin_client(remote)?;
            return Ok(Self::Remote(ControlClient::new(server, tls)));
        }
        let (meta, db) = tapproof_server::open_store(&store.data_dir, store.store.as_deref())
            .await
            .map_err(crate::exit::classify)?;
        let td = TrustDomain::new(&meta.trust_domain).context("server.json holds a bad trust domain")?;
        Ok(Self::Local { store: db, td })
    }

    async fn nodes(&self) -> anyhow::Result<Vec<NodeView>> {
        match self {
            Self::Local { store, .. } => local(tapproof_server::admin::list_nodes(&**store).await),
            Self::Remote(c) => c.nodes().await.map_err(remote),
        }
    }

    async fn registrations(&self) -> anyhow::Result<Vec<Registration>> {
        match self {
            Self::Local { store, .. } => local(tapproof_server::admin::list_registrations(&**store).await),
            Self::Remote(c) => c.registrations().await.map_err(remote),
        }
    }

    async fn register(&self, change: &RegistrationChange) -> anyhow::Result<bool> {
        match self {
            Self::Local { store, td } => local(
                tapproof_server::register(&**store, td, &change.node, &change.service, change.add).await,
            ),
            Self::Remote(c) => c.register(change).await.map(|c| c.changed).map_err(remote),
        }
    }

    async fn revoke(&self, request: &RevokeRequest) -> anyhow::Result<Revocation> {
        match self {
            Self::Local { store, .. } => {
                local(tapproof_server::admin::revoke_request(&**store, request, "cli").await)
            }
            Self::Remote(c) => c.revoke(request).await.map_err(remote),
        }
    }

    async fn revocation_propagation(&self) -> anyhow::Result<Vec<RevocationPropagation>> {
        match self {
            Self::Local { store, .. } => {
                local(tapproof_server::admin::revocation_propagation(&**store).await)
            }
            Self::Remote(c) => c.revocation_propagation().await.map_err(remote),
        }
    }

    async fn handshakes(&self, query: &HandshakeQuery) -> anyhow::Result<Vec<Handshake>> {
        match self {
            Self::Local { store, .. } => local(tapproof_server::admin::handshakes(&**store, query).await),
            Self::Remote(c) => c.handshakes(query).await.map_err(remote),
        }
    }

    async fn audit_log(&self, query: &AuditQuery) -> anyhow::Result<Vec<AuditEntry>> {
        match self {
            Self::Local { store, .. } => local(tapproof_server::admin::audit_rows(&**store, query).await),
            Self::Remote(c) => c.audit_log(query).await.map_err(remote),
        }
    }

    async fn policy(&self) -> anyhow::Result<Policy> {
        match self {
            Self::Local { store, .. } => local(tapproof_server::get_policy(&**store).await),
            Self::Remote(c) => c.policy().await.map_err(remote),
        }
    }

    async fn set_policy(&self, document: String) -> anyhow::Result<Policy> {
        match self {
            Self::Local { store, td } => {
                let policy = tapproof_server::parse_policy(&document, td).map_err(crate::exit::classify)?;
                local(tapproof_server::set_policy(&**store, &policy, "cli").await)?;
                Ok(policy)
            }
            Self::Remote(c) => c.set_policy(document).await.map_err(remote),
        }
    }
}

fn local<T>(r: Result<T, tapproof_server::ServerError>) -> anyhow::Result<T> {
    r.map_err(crate::exit::classify)
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `server node list`.
pub async fn node_list(admin: &Admin, json: bool) -> anyhow::Result<()> {
    let now = now();
    for node in admin.nodes().await? {
        if json {
            println!("{}", serde_json::to_string(&node)?);
            continue;
        }
        let expires = match node.cert_not_after {
            Some(t) if t > now => format!(
                "expires in {}",
                humantime::format_duration(std::time::Duration::from_secs((t - now) as u64))
            ),
            Some(_) => "expired".to_owned(),
            None => "no certificate".to_owned(),
        };
        let state = if node.revoked_at.is_some() {
            "REVOKED"
        } else {
            "active"
        };
        let seen = node
            .last_seen
            .map(|t| format!("seen {} ago", tapproof_identity::when::duration((now - t).max(0))))
            .unwrap_or_default();
        println!(
            "{:<20} {:<8} {:<22} {:<18} services [{}]  {}",
            node.name,
            state,
            expires,
            seen,
            node.services.join(", "),
            node.spiffe_id
        );
    }
    Ok(())
}

/// `server registration add|remove`.
pub async fn registration_change(admin: &Admin, change: RegistrationChange) -> anyhow::Result<()> {
    let changed = admin.register(&change).await?;
    let verb = if change.add { "registered" } else { "unregistered" };
    let (node, service) = (&change.node, &change.service);
    if changed {
        println!("changed: {verb} service {service} for node {node}");
    } else {
        println!("no change: {node} / {service} was already {verb}");
    }
    Ok(())
}

/// `server registration list`.
pub async fn registration_list(admin: &Admin) -> anyhow::Result<()> {
    for r in admin.registrations().await? {
        if r.addresses.is_empty() {
            println!("{:<20} {}", r.node, r.service);
        } else {
            // Where clients reach it, as the node announced (what capture.directory captures).
            println!("{:<20} {:<20} {}", r.node, r.service, r.addresses.join(" "));
        }
    }
    Ok(())
}

/// `server revoke`: exactly one of node, SPIFFE ID, serial.
pub async fn revoke(
    admin: &Admin,
    kind: RevocationKind,
    value: String,
    reason: String,
) -> anyhow::Result<()> {
    let r = admin.revoke(&RevokeRequest { kind, value, reason }).await?;
    println!(
        "revoked {} {} (revocation {}); the server refuses it at once, agents close its tunnels within seconds",
        r.kind.as_str(),
        r.value,
        r.id
    );
    Ok(())
}

/// `server handshakes`: one line per record (time, node and side, peers, what TLS agreed or why
/// it was refused).
pub async fn handshakes(admin: &Admin, query: &HandshakeQuery, json: bool) -> anyhow::Result<()> {
    let rows = admin.handshakes(query).await?;
    if rows.is_empty() && !json {
        println!("no handshake records in this period");
    }
    for r in rows {
        if json {
            println!("{}", serde_json::to_string(&r)?);
            continue;
        }
        let at = tapproof_identity::when::rfc3339(r.at_ms.div_euclid(1000));
        let peer = r.peer_id.as_deref().unwrap_or("(no certificate)");
        let what = match r.outcome.as_str() {
            "ok" => format!(
                "{} {} {} {}{}",
                r.tls_version.as_deref().unwrap_or("?"),
                r.cipher.as_deref().unwrap_or("?"),
                r.group.as_deref().unwrap_or("?"),
                r.signature_scheme.as_deref().unwrap_or("?"),
                if r.resumed { " resumed" } else { "" }
            ),
            _ => format!("REFUSED: {}", r.reason.as_deref().unwrap_or("?")),
        };
        println!(
            "{at} {:<16} {:<8} {} <-> {} {peer}: {what}",
            r.node, r.side, r.local, r.remote
        );
    }
    Ok(())
}

/// `server revocation show`: per revocation, when each node applied it, the slowest and median
/// propagation time, and the live nodes that have not applied it yet.
pub async fn revocation_show(admin: &Admin, id: Option<i64>, json: bool) -> anyhow::Result<()> {
    let all = admin.revocation_propagation().await?;
    let shown: Vec<_> = all
        .into_iter()
        .filter(|p| id.is_none_or(|id| p.revocation.id == id))
        .collect();
    if let (Some(id), true) = (id, shown.is_empty()) {
        return Err(ConfigProblem(format!(
            "there is no revocation {id} (see `tapproof server revocation show`)"
        ))
        .into());
    }
    for p in &shown {
        if json {
            println!("{}", serde_json::to_string(p)?);
            continue;
        }
        let r = &p.revocation;
        let mut times: Vec<i64> = p
            .applied
            .iter()
            .filter(|a| !a.joined_after)
            .map(|a| a.seconds)
            .collect();
        times.sort_unstable();
        let spread = match (times.get(times.len() / 2), times.last()) {
            (Some(median), Some(max)) => format!("median {median} s, slowest {max} s"),
            _ => "no propagation measured".to_owned(),
        };
        println!(
            "revocation {} {} {} ({}) at {}: applied by {} node(s), {}; pending: {}",
            r.id,
            r.kind.as_str(),
            r.value,
            r.reason,
            tapproof_identity::when::rfc3339(r.revoked_at),
            p.applied.len(),
            spread,
            if p.pending.is_empty() {
                "none".to_owned()
            } else {
                p.pending.join(", ")
            }
        );
        for a in &p.applied {
            println!(
                "  {:<24} applied {} after {} s{}",
                a.node,
                tapproof_identity::when::rfc3339(a.applied_at),
                a.seconds,
                if a.joined_after {
                    " (joined after the revocation)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// `server policy set`.
pub async fn policy_set(admin: &Admin, file: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    admin.set_policy(text).await?;
    println!(
        "policy from {} set; agents apply it within seconds",
        file.display()
    );
    Ok(())
}

/// `server policy show`.
pub async fn policy_show(admin: &Admin) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&admin.policy().await?)?);
    Ok(())
}

/// `server audit-log show`.
pub async fn audit_show(admin: &Admin, query: AuditQuery, json: bool) -> anyhow::Result<()> {
    for row in admin.audit_log(&query).await? {
        if json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            let at = time::OffsetDateTime::from_unix_timestamp(row.at)
                .map(|t| t.to_string())
                .unwrap_or_default();
            println!(
                "{:>6} {at} {:<28} {:<16} {}",
                row.seq, row.actor, row.action, row.details
            );
        }
    }
    Ok(())
}

/// The server's address and a client config presenting the admin identity in `--admin-dir`.
pub fn admin_client(remote: &RemoteArgs) -> anyhow::Result<(String, tapproof_tls::ControlClientTls)> {
    let server = remote.server.as_deref().context("--server is required")?;
    let dir = remote
        .admin_dir
        .as_deref()
        .context("--admin-dir is required with --server")?;
    let files = tapproof_tls::IdentityFiles {
        cert: dir.join("admin.pem"),
        key: dir.join("admin.key"),
        bundle: dir.join("bundle.pem"),
    };
    let (tls, _) = tapproof_tls::ControlClientTls::from_files(&files, None)
        .map_err(|e| ConfigProblem(format!("--admin-dir {}: {e}", dir.display())))?;
    Ok((server.to_owned(), tls))
}

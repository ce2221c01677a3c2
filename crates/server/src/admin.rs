//! Admin endpoints (admin identities over mTLS, checked by `auth::authorize` like every other
//! caller): nodes, registrations, revocations, the audit log and the policy. Each change goes
//! through the same function the local CLI uses (`crate::register_as`, `crate::revoke_as`,
//! `crate::set_policy`), which writes the audit row. Store rows are mapped to the wire types of
//! `tapproof_api` here. The `list_*`, `audit_rows` and `revoke_request` functions are what the
//! CLI runs against a local store: one function per admin command, local and remote alike.

use crate::app::{parse, query, ApiError, AppState, Peer};
use crate::auth::{authorize, Need};
use crate::ServerError;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::{Extension, Json};
use bytes::Bytes;
use std::sync::Arc;
use tapproof_api::{
    AuditEntry, AuditQuery, Changed, ErrorCode, Handshake, HandshakeQuery, NodeApplied, NodeView, Policy,
    Registration, RegistrationChange, Revocation, RevocationKind, RevocationPropagation, RevokeRequest,
};
use tapproof_store::Store;

/// A store revocation as the API shows it.
pub(crate) fn revocation(r: tapproof_store::Revocation) -> Revocation {
    Revocation {
        id: r.id,
        kind: match r.kind {
            tapproof_store::RevocationKind::Node => RevocationKind::Node,
            tapproof_store::RevocationKind::SpiffeId => RevocationKind::SpiffeId,
            tapproof_store::RevocationKind::Serial => RevocationKind::Serial,
        },
        value: r.value,
        reason: r.reason,
        revoked_at: r.revoked_at,
    }
}

/// Every node with its services and newest certificate's expiry.
pub async fn list_nodes(store: &dyn Store) -> Result<Vec<NodeView>, ServerError> {
    let registrations = store.registrations().await?;
    let mut out = Vec::new();
    for node in store.node_list().await? {
        let certs = store.cert_list(&node.name).await?;
        let cert_not_after = certs
            .iter()
            .filter(|c| c.spiffe_id == node.spiffe_id)
            .map(|c| c.not_after)
            .max();
        let services = registrations
            .iter()
            .filter(|r| r.node == node.name)
            .map(|r| r.service.clone())
            .collect();
        out.push(NodeView {
            name: node.name,
            spiffe_id: node.spiffe_id,
            tunnel_addr: node.tunnel_addr,
            created_at: node.created_at,
            last_seen: node.last_seen,
            revoked_at: node.revoked_at,
            services,
            cert_not_after,
        });
    }
    Ok(out)
}

/// Every registration (which node fronts which service).
pub async fn list_registrations(store: &dyn Store) -> Result<Vec<Registration>, ServerError> {
    Ok(store
        .registrations()
        .await?
        .into_iter()
        .map(|r| Registration {
            node: r.node,
            service: r.service,
            addresses: r.addresses,
        })
        .collect())
}

/// Every revocation in force.
pub async fn list_revocations(store: &dyn Store) -> Result<Vec<Revocation>, ServerError> {
    Ok(store.revocations().await?.into_iter().map(revocation).collect())
}

/// Every revocation with the nodes that applied it (and when) and the live nodes that have not.
pub async fn revocation_propagation(store: &dyn Store) -> Result<Vec<RevocationPropagation>, ServerError> {
    let rows = store.revocations().await?;
    let nodes = store.node_list().await?;
    let live: Vec<String> = crate::app::live_nodes(store, &rows)
        .await?
        .into_iter()
        .map(|n| n.name)
        .collect();
    let acks = store.revocation_acks().await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let applied: Vec<NodeApplied> = acks
                .iter()
                .filter(|a| a.revocation_id == r.id)
                .map(|a| NodeApplied {
                    node: a.node.clone(),
                    applied_at: a.applied_at,
                    seconds: a.applied_at - r.revoked_at,
                    joined_after: nodes
                        .iter()
                        .any(|n| n.name == a.node && crate::app::joined_after(n.created_at, r.revoked_at)),
                })
                .collect();
            let pending = live
                .iter()
                .filter(|n| !applied.iter().any(|a| &a.node == *n))
                .cloned()
                .collect();
            RevocationPropagation {
                version: r.version,
                revocation: revocation(r),
                applied,
                pending,
            }
        })
        .collect())
}

/// Handshake records in `q`'s window, oldest first (at most `q.limit`, 1 to 10000).
pub async fn handshakes(store: &dyn Store, q: &HandshakeQuery) -> Result<Vec<Handshake>, ServerError> {
    if !(1..=10_000).contains(&q.limit) || q.from_ms > q.to_ms {
        return Err(ServerError::Invalid(format!(
            "limit must be 1 to 10000 and from_ms at most to_ms (got limit={}, from_ms={}, to_ms={})",
            q.limit, q.from_ms, q.to_ms
        )));
    }
    let rows = store.handshakes_list(q.from_ms, q.to_ms, q.limit).await?;
    Ok(rows.into_iter().map(handshake).collect())
}

pub(crate) fn handshake(r: tapproof_store::HandshakeRow) -> Handshake {
    Handshake {
        node: r.node,
        at_ms: r.at_ms,
        seq: r.seq,
        side: r.side,
        local: r.local_addr,
        remote: r.remote_addr,
        local_id: r.local_id,
        local_serial: r.local_serial,
        peer_id: r.peer_id,
        peer_serial: r.peer_serial,
        tls_version: r.tls_version,
        cipher: r.cipher,
        group: r.group,
        signature_scheme: r.signature_scheme,
        resumed: r.resumed,
        outcome: r.outcome,
        reason: r.reason,
    }
}

/// Audit-log rows after `q.after`, at most `q.limit` (1 to 1000).
pub async fn audit_rows(store: &dyn Store, q: &AuditQuery) -> Result<Vec<AuditEntry>, ServerError> {
    let rows = store.audit_list(q.after, q.limit.clamp(1, 1000)).await?;
    Ok(rows.into_iter().map(audit_entry).collect())
}

/// A revocation as the API asks for it (checked and audited by `crate::revoke_as`).
pub async fn revoke_request(
    store: &dyn Store,
    req: &RevokeRequest,
    actor: &str,
) -> Result<Revocation, ServerError> {
    let kind = match req.kind {
        RevocationKind::Node => tapproof_store::RevocationKind::Node,
        RevocationKind::SpiffeId => tapproof_store::RevocationKind::SpiffeId,
        RevocationKind::Serial => tapproof_store::RevocationKind::Serial,
        RevocationKind::Unknown => {
            return Err(ServerError::Invalid(
                "kind must be node, spiffe_id or serial".into(),
            ))
        }
    };
    Ok(revocation(
        crate::revoke_as(store, kind, &req.value, &req.reason, actor).await?,
    ))
}

/// A `ServerError` from an admin operation as an API error: bad input is `bad_request`.
fn refused(e: ServerError) -> ApiError {
    match e {
        ServerError::Store(e) => e.into(),
        ServerError::Invalid(m) => ApiError::new(ErrorCode::BadRequest, m),
        other => ApiError::new(ErrorCode::Internal, other.to_string()),
    }
}

pub(crate) async fn nodes(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    authorize(&s, &peer, Need::Admin, "admin.nodes").await?;
    list_nodes(&*s.store).await.map(Json).map_err(refused)
}

pub(crate) async fn registrations(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Vec<Registration>>, ApiError> {
    authorize(&s, &peer, Need::Admin, "admin.registrations").await?;
    list_registrations(&*s.store).await.map(Json).map_err(refused)
}

pub(crate) async fn register(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Changed>, ApiError> {
    let actor = authorize(&s, &peer, Need::Admin, "admin.register").await?.actor;
    let change: RegistrationChange = parse(body)?;
    let td = s.ca().trust_domain.clone();
    let changed = crate::register_as(&*s.store, &td, &change.node, &change.service, change.add, &actor)
        .await
        .map_err(refused)?;
    Ok(Json(Changed { changed }))
}

pub(crate) async fn revocations(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Vec<Revocation>>, ApiError> {
    authorize(&s, &peer, Need::Admin, "admin.revocations").await?;
    list_revocations(&*s.store).await.map(Json).map_err(refused)
}

pub(crate) async fn handshakes_view(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    q: Result<Query<HandshakeQuery>, QueryRejection>,
) -> Result<Json<Vec<Handshake>>, ApiError> {
    authorize(&s, &peer, Need::Admin, "admin.handshakes").await?;
    let q: HandshakeQuery = query(q)?;
    handshakes(&*s.store, &q).await.map(Json).map_err(|e| match e {
        ServerError::Invalid(m) => ApiError::new(ErrorCode::BadQuery, m),
        other => refused(other),
    })
}

pub(crate) async fn revocation_propagation_view(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Vec<RevocationPropagation>>, ApiError> {
    authorize(&s, &peer, Need::Admin, "admin.revocation_propagation").await?;
    revocation_propagation(&*s.store).await.map(Json).map_err(refused)
}

pub(crate) async fn revoke(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Revocation>, ApiError> {
    let actor = authorize(&s, &peer, Need::Admin, "admin.revoke").await?.actor;
    let req: RevokeRequest = parse(body)?;
    let revoked = revoke_request(&*s.store, &req, &actor).await.map_err(refused)?;
    // In force on this replica at once; the others follow through the change feed.
    s.refresh_revocations().await?;
    Ok(Json(revoked))
}

pub(crate) async fn audit_log(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    authorize(&s, &peer, Need::Admin, "admin.audit_log").await?;
    let q: AuditQuery = query(q)?;
    if !(1..=1000).contains(&q.limit) || q.after < 0 {
        return Err(ApiError::new(
            ErrorCode::BadQuery,
            format!(
                "limit must be 1 to 1000 and after at least 0 (got limit={}, after={})",
                q.limit, q.after
            ),
        ));
    }
    audit_rows(&*s.store, &q).await.map(Json).map_err(refused)
}

/// A store audit row as the API shows it (hashes in hex).
pub(crate) fn audit_entry(e: tapproof_store::AuditEntry) -> AuditEntry {
    AuditEntry {
        seq: e.seq,
        at: e.at,
        actor: e.actor,
        action: e.action,
        details: e.details,
        prev_hash: hex::encode(e.prev_hash),
        hash: hex::encode(e.hash),
    }
}

pub(crate) async fn policy(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Policy>, ApiError> {
    authorize(&s, &peer, Need::Admin, "admin.policy").await?;
    crate::get_policy(&*s.store)
        .await
        .map(Json)
        .map_err(|e| ApiError::new(ErrorCode::PolicyUnavailable, e.to_string()))
}

pub(crate) async fn set_policy(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Policy>, ApiError> {
    let actor = authorize(&s, &peer, Need::Admin, "admin.set_policy").await?.actor;
    let body = body.map_err(|e| ApiError::new(ErrorCode::BadBody, e.body_text()))?;
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::new(ErrorCode::BadJson, "body is not UTF-8"))?;
    let td = s.ca().trust_domain.clone();
    let policy =
        crate::parse_policy(text, &td).map_err(|e| ApiError::new(ErrorCode::BadPolicy, e.to_string()))?;
    crate::set_policy(&*s.store, &policy, &actor)
        .await
        .map_err(|e| ApiError::new(ErrorCode::StoreUnavailable, e.to_string()))?;
    Ok(Json(policy))
}

//! The `/v1` HTTP API. Every error is JSON `{"error": {"code": "...", "message": "..."}}` with a
//! stable code; security events (refused tokens, CSRs, identities) also get an audit row. A
//! refused request changes no stored state.

use crate::{now, Ca};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tapproof_identity::{check_csr, inspect_svid, JoinToken, SpiffeId};
use tapproof_store::{IssuedCert, NewAudit, RevocationKind, Store, StoreError};
use tracing::{info, warn};

/// Requests are small JSON documents; anything larger is refused before parsing.
pub const MAX_BODY: usize = 64 * 1024;
/// At most this many CSRs in one signing request (a node and its services).
pub const MAX_CSRS: usize = 64;

/// The client's verified SPIFFE ID, if it presented a certificate (set per connection).
#[derive(Clone, Debug)]
pub struct Peer {
    pub id: Option<SpiffeId>,
    pub addr: std::net::SocketAddr,
}

pub struct AppState {
    pub store: Arc<dyn Store>,
    pub ca: RwLock<Arc<Ca>>,
    pub leaf_ttl: Duration,
    /// The state feed's version (the newest revocation's id); long-polls wait on it.
    pub version: tokio::sync::watch::Receiver<i64>,
    /// The state feed's answer for the newest version, built once per version: a revocation
    /// wakes every long-poll at once, and 10,000 agents must not mean 10,000 rounds of queries.
    pub feed_cache: tokio::sync::Mutex<Option<(i64, Bytes)>>,
}

/// How long `/v1/state` holds a request open when nothing changed.
pub const LONG_POLL: Duration = Duration::from_secs(25);

impl AppState {
    fn ca(&self) -> Arc<Ca> {
        self.ca.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Token(_) => StatusCode::UNAUTHORIZED,
            StoreError::Duplicate { .. } => StatusCode::CONFLICT,
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/v1/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        )
        .route("/v1/bundle", get(bundle))
        .route("/v1/join", post(join))
        .route("/v1/sign", post(sign))
        .route("/v1/state", get(state_feed))
        .route("/v1/nodes", get(admin_nodes))
        .route("/v1/registrations", get(admin_registrations).post(admin_register))
        .route("/v1/revocations", get(admin_revocations).post(admin_revoke))
        .route("/v1/audit-log", get(admin_audit_log))
        .route("/v1/policy", get(admin_policy).post(admin_set_policy))
        .route(
            "/v1/coverage",
            post(crate::coverage::report).layer(DefaultBodyLimit::max(crate::coverage::MAX_COVERAGE_BODY)),
        )
        .route("/v1/dashboard", get(crate::coverage::dashboard_data))
        .route("/dashboard", get(crate::coverage::index))
        .route("/dashboard/", get(crate::coverage::index))
        .route("/dashboard/app.js", get(crate::coverage::script))
        .route("/dashboard/style.css", get(crate::coverage::style))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see /v1/openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Parses a JSON body strictly, mapping every failure to a JSON error.
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body exceeds {MAX_BODY} bytes"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_body", e.body_text())
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("invalid request JSON: {e}"),
        )
    })
}

async fn audit(store: &dyn Store, actor: String, action: &str, details: serde_json::Value) {
    let entry = NewAudit {
        actor,
        action: action.into(),
        details,
    };
    if let Err(e) = store.audit_append(entry, now()).await {
        // The request's own outcome stands; the gap is logged loudly for the operator.
        warn!(error = %e, action, "cannot append to the audit log");
    }
}

#[derive(Serialize)]
struct BundleResponse {
    trust_domain: String,
    roots: Vec<String>,
}

async fn bundle(State(s): State<Arc<AppState>>) -> Json<BundleResponse> {
    let ca = s.ca();
    Json(BundleResponse {
        trust_domain: ca.trust_domain.to_string(),
        roots: ca.bundle.clone(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token: String,
    pub csr: String,
}

#[derive(Serialize, Deserialize)]
pub struct IssuedIdentity {
    pub id: String,
    /// Leaf first, then intermediates.
    pub chain_pem: String,
    pub not_after: i64,
}

#[derive(Serialize, Deserialize)]
pub struct JoinResponse {
    pub node: String,
    pub identity: IssuedIdentity,
    pub bundle: Vec<String>,
    /// Services registered to this node: ask `/v1/sign` for their identities.
    pub services: Vec<String>,
}

/// Signs `public_key` for `id`, records the certificate.
async fn issue(
    s: &AppState,
    ca: &Ca,
    id: &SpiffeId,
    node: &str,
    public_key: &tapproof_identity::ca::PublicKey,
) -> Result<IssuedIdentity, ApiError> {
    let lifetime = time::Duration::try_from(s.leaf_ttl).unwrap_or(time::Duration::HOUR);
    let (chain_pem, not_after) = ca
        .signer
        .sign_leaf(id, public_key, lifetime)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "ca_error", e.to_string()))?;
    let leaf = rustls_pem_first(&chain_pem)?;
    let info = inspect_svid(&leaf)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "ca_error", e.to_string()))?;
    s.store
        .cert_record(IssuedCert {
            serial: info.serial.clone(),
            spiffe_id: id.to_string(),
            node: node.to_owned(),
            not_before: info.not_before,
            not_after: info.not_after,
            issued_at: now(),
        })
        .await?;
    Ok(IssuedIdentity {
        id: id.to_string(),
        chain_pem,
        not_after: not_after.unix_timestamp(),
    })
}

fn rustls_pem_first(chain_pem: &str) -> Result<Vec<u8>, ApiError> {
    tapproof_identity::ca::first_der(chain_pem)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "ca_error", e))
}

async fn join_refused(
    s: &AppState,
    peer: &Peer,
    token: &JoinToken,
    actor: String,
    e: StoreError,
) -> ApiError {
    let err = ApiError::from(e);
    warn!(peer = %peer.addr, token_id = %token.id, code = err.code, "join refused");
    let details = serde_json::json!({ "token_id": token.id, "reason": err.code });
    audit(&*s.store, actor, "join.refused", details).await;
    err
}

async fn join(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<JoinResponse>, ApiError> {
    let req: JoinRequest = parse(body)?;
    let actor = format!("peer:{}", peer.addr);
    let token = match JoinToken::parse(&req.token) {
        Ok(t) => t,
        Err(e) => {
            audit(
                &*s.store,
                actor,
                "join.refused",
                serde_json::json!({ "reason": "token_malformed" }),
            )
            .await;
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "token_malformed",
                e.to_string(),
            ));
        }
    };
    let ca = s.ca();
    // Check token and CSR before consuming the token: a refused join leaves it usable.
    let record = match s.store.token_check(&token.id, &token.secret_hash(), now()).await {
        Ok(r) => r,
        Err(e) => return Err(join_refused(&s, &peer, &token, actor, e).await),
    };
    let node_id = ca
        .trust_domain
        .node_id(&record.node)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_node", e.to_string()))?;
    let public_key = match check_csr(req.csr.as_bytes(), &node_id) {
        Ok(k) => k,
        Err(e) => {
            let details = serde_json::json!({ "node": record.node, "reason": e.to_string() });
            audit(&*s.store, format!("token:{}", token.id), "csr.refused", details).await;
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "csr_invalid",
                e.to_string(),
            ));
        }
    };
    // Consuming is the atomic step: of two concurrent joins with one token, one wins.
    if let Err(e) = s
        .store
        .token_consume(&token.id, &token.secret_hash(), now())
        .await
    {
        return Err(join_refused(&s, &peer, &token, actor, e).await);
    }
    let identity = issue(&s, &ca, &node_id, &record.node, &public_key).await?;
    s.store
        .node_upsert(&record.node, &node_id.to_string(), now())
        .await?;
    for service in &record.services {
        s.store.registration_add(&record.node, service).await?;
    }
    audit(
        &*s.store,
        format!("token:{}", token.id),
        "node.join",
        serde_json::json!({ "node": record.node, "id": node_id.to_string(), "services": record.services, "not_after": identity.not_after }),
    )
    .await;
    info!(node = %record.node, peer = %peer.addr, "node joined");
    let services = s
        .store
        .registrations()
        .await?
        .into_iter()
        .filter(|r| r.node == record.node)
        .map(|r| r.service)
        .collect();
    Ok(Json(JoinResponse {
        node: record.node,
        identity,
        bundle: ca.bundle.clone(),
        services,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    pub csrs: Vec<SignItem>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SignItem {
    pub id: String,
    pub csr: String,
}

#[derive(Serialize, Deserialize)]
pub struct SignResponse {
    pub identities: Vec<IssuedIdentity>,
    pub bundle: Vec<String>,
    pub services: Vec<String>,
}

/// Audits a refused signing request and builds its error.
pub(crate) async fn refused(
    store: &dyn Store,
    actor: &str,
    node: &str,
    code: &'static str,
    message: String,
) -> ApiError {
    refused_as(store, "sign.refused", actor, node, code, message).await
}

/// Audits a refused node request (`action`, e.g. `coverage.refused`) and builds its error.
async fn refused_as(
    store: &dyn Store,
    action: &str,
    actor: &str,
    node: &str,
    code: &'static str,
    message: String,
) -> ApiError {
    let details = serde_json::json!({ "node": node, "reason": code, "message": message });
    audit(store, actor.to_owned(), action, details).await;
    let status = if code == "csr_invalid" || code == "bad_request" {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::FORBIDDEN
    };
    ApiError::new(status, code, message)
}

/// The calling node: its SPIFFE ID (the actor) and name, registered and not revoked. `what` names
/// the request in errors and in the audit row of a refusal (`<what>.refused`).
pub(crate) async fn live_node(s: &AppState, peer: &Peer, what: &str) -> Result<(String, String), ApiError> {
    let Some(caller) = peer.id.clone() else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "identity_required",
            format!("present your node certificate (mTLS) to {what}"),
        ));
    };
    let actor = caller.to_string();
    let node = caller
        .path()
        .strip_prefix("/node/")
        .filter(|n| !n.contains('/'))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "not_a_node",
                format!("{caller} is not a node identity"),
            )
        })?
        .to_owned();
    let action = format!("{what}.refused");
    let Some(record) = s.store.node_get(&node).await? else {
        let message = format!("node {node} is not registered");
        return Err(refused_as(&*s.store, &action, &actor, &node, "unknown_node", message).await);
    };
    let revoked = s.store.revocations().await?.into_iter().any(|r| {
        (r.kind == RevocationKind::Node && r.value == node)
            || (r.kind == RevocationKind::SpiffeId && r.value == actor)
    });
    if revoked || record.revoked_at.is_some() {
        let message = format!("node {node} is revoked");
        return Err(refused_as(&*s.store, &action, &actor, &node, "node_revoked", message).await);
    }
    Ok((actor, node))
}

/// Renewal and service identities, authenticated by the node's current certificate.
async fn sign(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SignResponse>, ApiError> {
    let (actor, node) = live_node(&s, &peer, "sign").await?;
    let req: SignRequest = parse(body)?;
    if req.csrs.is_empty() || req.csrs.len() > MAX_CSRS {
        return Err(refused(
            &*s.store,
            &actor,
            &node,
            "bad_request",
            format!("send between 1 and {MAX_CSRS} CSRs"),
        )
        .await);
    }
    let ca = s.ca();
    let services: Vec<String> = s
        .store
        .registrations()
        .await?
        .into_iter()
        .filter(|r| r.node == node)
        .map(|r| r.service)
        .collect();
    // Check everything before signing anything: a refused request issues nothing.
    let mut checked = Vec::new();
    for item in &req.csrs {
        let id = SpiffeId::parse(&item.id)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_id", format!("{}: {e}", item.id)))?;
        let allowed = id.to_string() == actor
            || id
                .path()
                .strip_prefix("/svc/")
                .is_some_and(|svc| services.iter().any(|s| s == svc))
                && id.trust_domain() == &ca.trust_domain;
        if !allowed {
            return Err(refused(
                &*s.store,
                &actor,
                &node,
                "not_registered",
                format!("{id} is not registered to node {node}"),
            )
            .await);
        }
        match check_csr(item.csr.as_bytes(), &id) {
            Ok(k) => checked.push((id, k)),
            Err(e) => return Err(refused(&*s.store, &actor, &node, "csr_invalid", e.to_string()).await),
        }
    }
    let mut identities = Vec::new();
    for (id, key) in &checked {
        identities.push(issue(&s, &ca, id, &node, key).await?);
    }
    s.store.node_seen(&node, now()).await?;
    audit(
        &*s.store,
        actor,
        "cert.issue",
        serde_json::json!({ "node": node, "ids": identities.iter().map(|i| i.id.clone()).collect::<Vec<_>>() }),
    )
    .await;
    Ok(Json(SignResponse {
        identities,
        bundle: ca.bundle.clone(),
        services,
    }))
}

#[derive(Deserialize)]
pub struct StateQuery {
    #[serde(default)]
    pub since: i64,
    /// Where the calling agent's tunnel listener is reached, for the service directory.
    #[serde(default)]
    pub tunnel: Option<String>,
}

/// One service as the directory lists it: which node fronts it and where its tunnel listens.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DirectoryEntry {
    pub service: String,
    pub node: String,
    pub id: String,
    pub tunnel: String,
}

#[derive(Serialize, Deserialize)]
pub struct StateResponse {
    /// Pass this as `since` next time.
    pub version: i64,
    pub revocations: Vec<tapproof_store::Revocation>,
    pub bundle: Vec<String>,
    pub directory: Vec<DirectoryEntry>,
    /// Service -> SPIFFE ID patterns allowed to open it.
    #[serde(default)]
    pub policy: std::collections::BTreeMap<String, Vec<String>>,
}

/// The state feed: answers at once when `version > since`, else holds the request until
/// something changes or `LONG_POLL` passes. Agents only (mTLS).
async fn state_feed(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    query: Result<axum::extract::Query<StateQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Some(caller) = peer.id.clone() else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "identity_required",
            "present your node certificate (mTLS)",
        ));
    };
    let query = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?
        .0;
    let since = query.since;
    if let (Some(tunnel), Some(node)) = (&query.tunnel, caller.path().strip_prefix("/node/")) {
        let addr: std::net::SocketAddr = tunnel.parse().map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("tunnel {tunnel:?}: {e}"),
            )
        })?;
        if s.store.node_set_tunnel(node, &addr.to_string()).await? {
            s.store.notify_change().await?;
            info!(node, tunnel = %addr, "directory: tunnel address announced");
        }
    }
    let mut version = s.version.clone();
    if *version.borrow() <= since {
        let _ = tokio::time::timeout(LONG_POLL, version.wait_for(|v| *v > since)).await;
    }
    let current = *version.borrow();
    // One request builds the answer for this version; the others wait for it and reuse it.
    let mut cache = s.feed_cache.lock().await;
    let bytes = match &*cache {
        Some((v, bytes)) if *v == current => bytes.clone(),
        _ => {
            let built =
                Bytes::from(serde_json::to_vec(&build_state(&s, current).await?).map_err(|e| {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?);
            *cache = Some((current, built.clone()));
            built
        }
    };
    drop(cache);
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

/// The state feed's answer at `current`, from the store.
async fn build_state(s: &AppState, current: i64) -> Result<StateResponse, ApiError> {
    let revocations = s.store.revocations().await?;
    let nodes = s.store.node_list().await?;
    let directory = s
        .store
        .registrations()
        .await?
        .into_iter()
        .filter_map(|r| {
            let node = nodes
                .iter()
                .find(|n| n.name == r.node && n.revoked_at.is_none())?;
            Some(DirectoryEntry {
                service: r.service,
                node: node.name.clone(),
                id: node.spiffe_id.clone(),
                tunnel: node.tunnel_addr.clone()?,
            })
        })
        .collect();
    let policy = crate::get_policy(&*s.store)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "policy_unavailable",
                e.to_string(),
            )
        })?
        .services
        .into_iter()
        .map(|(service, rule)| (service, rule.allow))
        .collect();
    Ok(StateResponse {
        version: current,
        revocations,
        bundle: s.ca().bundle.clone(),
        directory,
        policy,
    })
}

/// Admin endpoints require an admin identity, `spiffe://<td>/admin/<name>`, issued by
/// `tapproof server admin-cert` on the server host.
pub(crate) fn require_admin(peer: &Peer) -> Result<String, ApiError> {
    match &peer.id {
        Some(id) if id.path().starts_with("/admin/") => Ok(id.to_string()),
        Some(id) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_required",
            format!("{id} is not an admin identity"),
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "identity_required",
            "present an admin certificate (mTLS)",
        )),
    }
}

#[derive(Serialize, Deserialize)]
pub struct NodeView {
    pub node: tapproof_store::Node,
    pub services: Vec<String>,
    /// The newest node certificate's expiry (Unix seconds).
    pub cert_not_after: Option<i64>,
}

async fn admin_nodes(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    require_admin(&peer)?;
    let registrations = s.store.registrations().await?;
    let mut out = Vec::new();
    for node in s.store.node_list().await? {
        let certs = s.store.cert_list(&node.name).await?;
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
            node,
            services,
            cert_not_after,
        });
    }
    Ok(Json(out))
}

async fn admin_registrations(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Vec<tapproof_store::Registration>>, ApiError> {
    require_admin(&peer)?;
    Ok(Json(s.store.registrations().await?))
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationChange {
    pub node: String,
    pub service: String,
    /// true: add; false: remove.
    pub add: bool,
}

async fn admin_register(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let actor = require_admin(&peer)?;
    let change: RegistrationChange = parse(body)?;
    let td = s.ca().trust_domain.clone();
    let changed = crate::register_as(&*s.store, &td, &change.node, &change.service, change.add, &actor)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    Ok(Json(serde_json::json!({ "changed": changed })))
}

async fn admin_revocations(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Vec<tapproof_store::Revocation>>, ApiError> {
    require_admin(&peer)?;
    Ok(Json(s.store.revocations().await?))
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub kind: RevocationKind,
    pub value: String,
    #[serde(default)]
    pub reason: String,
}

async fn admin_revoke(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<tapproof_store::Revocation>, ApiError> {
    let actor = require_admin(&peer)?;
    let req: RevokeRequest = parse(body)?;
    let revocation = crate::revoke_as(&*s.store, req.kind, &req.value, &req.reason, &actor)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    Ok(Json(revocation))
}

#[derive(Deserialize)]
pub struct AuditQuery {
    #[serde(default)]
    pub after: i64,
    #[serde(default = "default_audit_limit")]
    pub limit: i64,
}

fn default_audit_limit() -> i64 {
    100
}

async fn admin_audit_log(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    query: Result<axum::extract::Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<tapproof_store::AuditEntry>>, ApiError> {
    require_admin(&peer)?;
    let q = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?
        .0;
    Ok(Json(s.store.audit_list(q.after, q.limit.clamp(1, 1000)).await?))
}

async fn admin_policy(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<crate::Policy>, ApiError> {
    require_admin(&peer)?;
    crate::get_policy(&*s.store).await.map(Json).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "policy_unavailable",
            e.to_string(),
        )
    })
}

async fn admin_set_policy(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<crate::Policy>, ApiError> {
    let actor = require_admin(&peer)?;
    let body = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_body", e.body_text()))?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", "body is not UTF-8"))?;
    let td = s.ca().trust_domain.clone();
    let policy = crate::Policy::parse(text, &td)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_policy", e.to_string()))?;
    crate::set_policy(&*s.store, &policy, &actor).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
    })?;
    Ok(Json(policy))
}

//! What every handler shares: the server's state, the caller as the TLS listener saw it, the
//! error answer (`{"error": {"code", "message"}}` with a `tapproof_api::ErrorCode`), strict body
//! parsing, and the audit-log helper. A refused request changes no stored state.

use crate::Ca;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tapproof_api::{ErrorBody, ErrorCode, ErrorDetail, MAX_BODY};
use tapproof_identity::{RevocationSet, RevokedBy, SpiffeId};
use tapproof_store::{NewAudit, RevocationKind, Store, StoreError, TokenRejection};
use tracing::warn;

/// The client's verified SPIFFE ID and certificate serial, if it presented a certificate (set per
/// connection by the TLS listener).
#[derive(Clone, Debug)]
pub struct Peer {
    pub id: Option<SpiffeId>,
    /// The client certificate's serial (hex), for revocation by serial.
    pub serial: Option<String>,
    /// When the client certificate expires (Unix seconds). The TLS listener lets a certificate
    /// through up to `Limits::expired_renewal_window` after it; `auth::authorize` decides.
    pub not_after: Option<i64>,
    pub addr: std::net::SocketAddr,
}

pub struct AppState {
    pub store: Arc<dyn Store>,
    pub ca: RwLock<Arc<Ca>>,
    pub leaf_ttl: Duration,
    /// The state feed's version (the store's change version); long-polls wait on it.
    pub version: tokio::sync::watch::Receiver<i64>,
    /// The state feed's answer for the newest version, built once per version: a revocation
    /// wakes every long-poll at once, and 10,000 agents must not mean 10,000 rounds of queries.
    pub feed_cache: tokio::sync::Mutex<Option<(i64, Bytes)>>,
    /// Every revocation in force, reloaded from the store whenever the feed version changes
    /// (and at once after a revocation made through this server's API).
    pub revoked: RwLock<Arc<RevocationSet>>,
    /// Cancelled when the server drains: waiting long-polls answer at once.
    pub draining: tokio_util::sync::CancellationToken,
    pub limits: crate::limits::Limits,
    pub rate: crate::limits::RateLimits,
    pub metrics: crate::metrics::ServerMetrics,
    /// What this replica already recorded of nodes' revocation acknowledgements.
    pub acks: crate::feed::Acks,
}

impl AppState {
    pub(crate) fn ca(&self) -> Arc<Ca> {
        self.ca.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn revocations(&self) -> Arc<RevocationSet> {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reloads the revocation list from the store.
    pub(crate) async fn refresh_revocations(&self) -> Result<(), StoreError> {
        let set = load_revocations(&*self.store).await?;
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(())
    }
}

/// The store's revocations as the one rule's set.
pub(crate) async fn load_revocations(store: &dyn Store) -> Result<RevocationSet, StoreError> {
    Ok(revocation_set(&store.revocations().await?))
}

/// Revocation rows as the one rule's set.
pub(crate) fn revocation_set(rows: &[tapproof_store::Revocation]) -> RevocationSet {
    let mut set = RevocationSet::default();
    for r in rows {
        set.insert(revoked_by(r.kind), &r.value);
    }
    set
}

/// Whether `node` is still in the fleet under `revoked`: not revoked by name or ID, and its
/// newest node certificate not revoked by serial (it cannot renew past that). The directory and
/// the revocation-propagation report both ask this.
pub(crate) async fn node_is_live(
    store: &dyn Store,
    revoked: &RevocationSet,
    node: &tapproof_store::Node,
) -> Result<bool, StoreError> {
    let newest = store
        .cert_list(&node.name)
        .await?
        .into_iter()
        .filter(|c| c.spiffe_id == node.spiffe_id)
        .max_by_key(|c| c.issued_at);
    Ok(SpiffeId::parse(&node.spiffe_id).is_ok_and(|id| {
        revoked
            .covers(&id, newest.as_ref().map(|c| c.serial.as_str()))
            .is_none()
    }))
}

/// The nodes still in the fleet under `revocations` (`node_is_live`), in the store's order.
pub(crate) async fn live_nodes(
    store: &dyn Store,
    revocations: &[tapproof_store::Revocation],
) -> Result<Vec<tapproof_store::Node>, StoreError> {
    let revoked = revocation_set(revocations);
    let mut live = Vec::new();
    for node in store.node_list().await? {
        if node_is_live(store, &revoked, &node).await? {
            live.push(node);
        }
    }
    Ok(live)
}

/// Whether a node that joined at `joined_at` applied a revocation made at `revoked_at` on joining
/// (it joined after): its acknowledgement is not a propagation time.
pub(crate) fn joined_after(joined_at: i64, revoked_at: i64) -> bool {
    joined_at > revoked_at
}

fn revoked_by(kind: RevocationKind) -> RevokedBy {
    match kind {
        RevocationKind::Node => RevokedBy::Node,
        RevocationKind::SpiffeId => RevokedBy::SpiffeId,
        RevocationKind::Serial => RevokedBy::Serial,
    }
}

/// An error answer: the code decides the HTTP status (`ErrorCode::status`).
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::Token(TokenRejection::Unknown | TokenRejection::WrongSecret) => {
                ErrorCode::TokenInvalid
            }
            StoreError::Token(TokenRejection::Expired { .. }) => ErrorCode::TokenExpired,
            StoreError::Token(TokenRejection::AlreadyUsed { .. } | TokenRejection::UsesSpent { .. }) => {
                ErrorCode::TokenUsed
            }
            StoreError::Duplicate { .. } => ErrorCode::Duplicate,
            StoreError::NotFound { .. } => ErrorCode::NotFound,
            StoreError::Unavailable(_) => ErrorCode::StoreUnavailable,
            _ => ErrorCode::StoreFailed,
        };
        Self::new(code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        // The metrics middleware reads the code from here (`metrics::track`).
        let mut response = (status, Json(body)).into_response();
        response.extensions_mut().insert(self.code);
        response
    }
}

/// Parses a JSON body strictly, mapping every failure to a JSON error.
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::BodyTooLarge,
                format!("request body exceeds {MAX_BODY} bytes"),
            )
        } else {
            ApiError::new(ErrorCode::BadBody, e.body_text())
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::BadJson, format!("invalid request JSON: {e}")))
}

/// Parses a query string strictly.
pub(crate) fn query<T>(
    query: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    query
        .map(|q| q.0)
        .map_err(|e| ApiError::new(ErrorCode::BadQuery, e.body_text()))
}

/// Appends to the audit log; a failure is logged, the request's own outcome stands.
pub(crate) async fn audit(store: &dyn Store, actor: String, action: &str, details: serde_json::Value) {
    if let Err(e) = audit_required(store, actor, action, details).await {
        tracing::error!(error = %e.message, action, "cannot append to the audit log");
    }
}

/// Appends an audit row; the caller's operation fails with it (an issued certificate or a join
/// whose row cannot be written is answered `store_failed`, and the client retries).
pub(crate) async fn audit_required(
    store: &dyn Store,
    actor: String,
    action: &str,
    details: serde_json::Value,
) -> Result<(), ApiError> {
    let entry = NewAudit {
        actor,
        action: action.into(),
        details,
    };
    store
        .audit_append(entry, crate::now())
        .await
        .map(drop)
        .map_err(|e| {
            warn!(error = %e, action, "cannot append to the audit log; the request fails");
            ApiError::new(ErrorCode::StoreFailed, format!("cannot write the audit log: {e}"))
        })
}

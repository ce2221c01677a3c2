//! Who may call what. Every mTLS endpoint asks [`authorize`] first: node endpoints (sign, state
//! feed and its address announcement, coverage) want a registered node identity, admin endpoints
//! and the dashboard an admin identity; both must not be covered by a revocation (node, SPIFFE ID
//! or serial: `RevocationSet::covers`, the one rule agents use too). The TLS listener asks
//! [`revoked`] right after the handshake, so a certificate revoked by serial gets no HTTP at all.
//! Refusals of identified callers are audited as `<what>.refused` with the stable code.
//!
//! Expired certificates: the TLS listener lets a client certificate through for
//! `Limits::expired_renewal_window` after its expiry (so a node cut off during an outage renews
//! by itself, with no new token); here such a caller gets renewal (`Need::Renewal`) only, and only
//! with the newest certificate the server issued to that node, so an older key taken from a
//! backup or a decommissioned disk recovers nothing. Everything else answers `certificate_expired`.
//!
//! Requests per client (its SPIFFE ID, or its address without one) are rate-limited here too.

use crate::app::{audit, ApiError, AppState, Peer};
use tapproof_api::ErrorCode;
use tapproof_identity::{node_name, Covered, RevokedBy, SpiffeId};

/// What an endpoint needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A registered, unrevoked node identity (`spiffe://<td>/node/<name>`).
    Node,
    /// An unrevoked admin identity (`spiffe://<td>/admin/<name>`).
    Admin,
    /// `Node`, for renewal: the certificate may have expired (within the recovery window) if it
    /// is the newest one issued to the node.
    Renewal,
}

/// An authorised caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The SPIFFE ID, as the audit log names the actor.
    pub actor: String,
    /// For `Need::Node`: the node's name. For admins: the admin's name.
    pub name: String,
}

/// The stable code for a revocation of each kind.
pub fn revoked_code(by: RevokedBy) -> ErrorCode {
    match by {
        RevokedBy::Node => ErrorCode::NodeRevoked,
        RevokedBy::SpiffeId => ErrorCode::IdentityRevoked,
        RevokedBy::Serial => ErrorCode::CertificateRevoked,
    }
}

/// Whether the certificate (`id`, `serial`) is revoked now, by the server's current list.
pub fn revoked(s: &AppState, id: &SpiffeId, serial: Option<&str>) -> Option<Covered> {
    s.revocations().covers(id, serial)
}

/// Checks the caller of `what` (for example `sign`, `state`, `admin.nodes`) against `need`.
pub async fn authorize(s: &AppState, peer: &Peer, need: Need, what: &str) -> Result<Caller, ApiError> {
    rate_limit(s, peer)?;
    let Some(id) = peer.id.as_ref() else {
        let wanted = match need {
            Need::Node | Need::Renewal => "your node certificate",
            Need::Admin => "an admin certificate (tapproof server admin-cert)",
        };
        return Err(ApiError::new(
            ErrorCode::IdentityRequired,
            format!("present {wanted} (mTLS) to call {what}"),
        ));
    };
    refuse_revoked(s, peer, what).await?;
    let actor = id.to_string();
    let refuse = |code: ErrorCode, message: String| refused(s, what, &actor, code, message);
    let expired = peer.not_after.is_some_and(|t| t < crate::now());
    if expired && need != Need::Renewal {
        return Err(refuse(
            ErrorCode::CertificateExpired,
            format!(
                "the certificate of {id} expired; the agent renews it (POST /v1/sign) before anything else"
            ),
        )
        .await);
    }
    match need {
        Need::Admin => {
            let Some(name) = id.path().strip_prefix("/admin/") else {
                return Err(refuse(
                    ErrorCode::AdminRequired,
                    format!("{id} is not an admin identity; use one from `tapproof server admin-cert`"),
                )
                .await);
            };
            Ok(Caller {
                actor,
                name: name.to_owned(),
            })
        }
        Need::Node | Need::Renewal => {
            let Some(node) = node_name(id) else {
                return Err(refuse(ErrorCode::NotANode, format!("{id} is not a node identity")).await);
            };
            let node = node.to_owned();
            if s.store.node_get(&node).await?.is_none() {
                return Err(refuse(
                    ErrorCode::UnknownNode,
                    format!("node {node} is not registered; join with a token first"),
                )
                .await);
            }
            if expired {
                // The newest: issued last (the store keeps seconds, so all of that second).
                let certs: Vec<_> = s
                    .store
                    .cert_list(&node)
                    .await?
                    .into_iter()
                    .filter(|c| c.spiffe_id == actor)
                    .collect();
                let last = certs.iter().map(|c| c.issued_at).max();
                let theirs = peer
                    .serial
                    .as_deref()
                    .and_then(tapproof_identity::normalize_serial);
                let ours = theirs.is_some()
                    && certs.iter().any(|c| {
                        Some(c.issued_at) == last && tapproof_identity::normalize_serial(&c.serial) == theirs
                    });
                if !ours {
                    return Err(refuse(
                        ErrorCode::CertificateExpired,
                        format!("the certificate of {id} expired and is not the newest one issued to node {node}; join again with a new token"),
                    )
                    .await);
                }
                tracing::info!(node = %node, serial = %peer.serial.as_deref().unwrap_or(""), "renewal with an expired certificate (recovery after an outage)");
            }
            Ok(Caller { actor, name: node })
        }
    }
}

/// Refuses a client over its request rate (its SPIFFE ID, or its address without a certificate).
/// Not audited: a flood must not write a row per request. Logged once a minute per client.
pub fn rate_limit(s: &AppState, peer: &Peer) -> Result<(), ApiError> {
    let Some(buckets) = &s.rate.requests else {
        return Ok(());
    };
    let key = match &peer.id {
        Some(id) => id.to_string(),
        None => peer.addr.ip().to_string(),
    };
    match buckets.take(&key) {
        crate::limits::Take::Ok => Ok(()),
        crate::limits::Take::Refused { log } => {
            s.rate.refusals.requests.inc();
            if log {
                tracing::warn!(client = %key, limit_per_s = s.limits.requests_per_second, "control plane: client over its request rate; refusing (logged once a minute)");
            }
            Err(ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} requests per second; slow down",
                    s.limits.requests_per_second
                ),
            ))
        }
    }
}

/// Refuses (and audits) a caller whose certificate the revocation set covers. `authorize` starts
/// with it; a long-poll asks it again after its wait, the rest of `authorize` having passed.
pub async fn refuse_revoked(s: &AppState, peer: &Peer, what: &str) -> Result<(), ApiError> {
    let Some(id) = peer.id.as_ref() else {
        return Ok(());
    };
    match revoked(s, id, peer.serial.as_deref()) {
        None => Ok(()),
        Some(why) => {
            let message = format!("{why}; ask an operator for a new identity");
            Err(refused(s, what, &id.to_string(), revoked_code(why.by), message).await)
        }
    }
}

/// Audits a refusal of `what` (action `<what>.refused`, with the code as `reason`) and builds its
/// error.
pub async fn refused(s: &AppState, what: &str, actor: &str, code: ErrorCode, message: String) -> ApiError {
    let details = serde_json::json!({ "reason": code, "message": message });
    audit(&*s.store, actor.to_owned(), &format!("{what}.refused"), details).await;
    ApiError::new(code, message)
}

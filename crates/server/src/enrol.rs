//! Enrolment: the trust bundle, joining with a single-use token (no client certificate; the
//! token and CSR are checked before the token is consumed, so a refused join leaves it usable),
//! and signing over mTLS (renewal of the node identity and the identities of the services
//! registered to it). Nothing is signed before every CSR of a request passed.

use crate::app::{audit, audit_required, parse, ApiError, AppState, Peer};
use crate::auth::{authorize, Need};
use crate::{now, Ca};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::{Extension, Json};
use bytes::Bytes;
use std::sync::Arc;
use tapproof_api::{
    BundleResponse, ErrorCode, IssuedIdentity, JoinRequest, JoinResponse, SignRequest, SignResponse, MAX_CSRS,
};
use tapproof_identity::{check_csr, inspect_svid, JoinToken, SpiffeId};
use tapproof_store::{IssuedCert, StoreError};
use tracing::{info, warn};

pub(crate) async fn bundle(State(s): State<Arc<AppState>>) -> Json<BundleResponse> {
    let ca = s.ca();
    Json(BundleResponse {
        trust_domain: ca.trust_domain.to_string(),
        roots: ca.bundle.clone(),
    })
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
        .map_err(|e| ApiError::new(ErrorCode::CaError, e.to_string()))?;
    let leaf = rustls_pem_first(&chain_pem)?;
    let info = inspect_svid(&leaf).map_err(|e| ApiError::new(ErrorCode::CaError, e.to_string()))?;
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
    tapproof_identity::ca::first_der(chain_pem).map_err(|e| ApiError::new(ErrorCode::CaError, e))
}

async fn join_refused(
    s: &AppState,
    peer: &Peer,
    token: &JoinToken,
    actor: String,
    e: StoreError,
) -> ApiError {
    let err = ApiError::from(e);
    warn!(peer = %peer.addr, token_id = %token.id, code = %err.code, "join refused");
    let details = serde_json::json!({ "token_id": token.id, "reason": err.code.as_str() });
    audit(&*s.store, actor, "join.refused", details).await;
    err
}

pub(crate) async fn join(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<JoinResponse>, ApiError> {
    // Before anything is parsed, checked or audited: a brute-force attempt costs the attacker.
    if let crate::limits::Take::Refused { log } = s.rate.joins.take(&peer.addr.ip()) {
        s.rate.refusals.joins.inc();
        if log {
            warn!(peer = %peer.addr, limit_per_min = s.limits.joins_per_minute, "join attempts over the limit for this source; refusing (logged and audited once a minute)");
            audit(
                &*s.store,
                format!("peer:{}", peer.addr.ip()),
                "join.rate_limited",
                serde_json::json!({ "limit_per_minute": s.limits.joins_per_minute }),
            )
            .await;
        }
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "more than {} join attempts a minute from {}; wait",
                s.limits.joins_per_minute,
                peer.addr.ip()
            ),
        ));
    }
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
            return Err(ApiError::new(ErrorCode::TokenMalformed, e.to_string()));
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
        .map_err(|e| ApiError::new(ErrorCode::BadNode, e.to_string()))?;
    let public_key = match check_csr(req.csr.as_bytes(), &node_id) {
        Ok(k) => k,
        Err(e) => {
            let details = serde_json::json!({ "node": record.node, "reason": e.to_string() });
            audit(&*s.store, format!("token:{}", token.id), "csr.refused", details).await;
            return Err(ApiError::new(ErrorCode::CsrInvalid, e.to_string()));
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
    audit_required(
        &*s.store,
        format!("token:{}", token.id),
        "node.join",
        serde_json::json!({ "node": record.node, "id": node_id.to_string(), "services": record.services, "not_after": identity.not_after }),
    )
    .await?;
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

/// A refused signing request, audited as `sign.refused`.
async fn refused(s: &AppState, actor: &str, code: ErrorCode, message: String) -> ApiError {
    crate::auth::refused(s, "sign", actor, code, message).await
}

/// Renewal and service identities, authenticated by the node's current certificate.
pub(crate) async fn sign(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SignResponse>, ApiError> {
    let caller = authorize(&s, &peer, Need::Renewal, "sign").await?;
    let (actor, node) = (caller.actor, caller.name);
    let req: SignRequest = parse(body)?;
    if req.csrs.is_empty() || req.csrs.len() > MAX_CSRS {
        return Err(refused(
            &s,
            &actor,
            ErrorCode::BadRequest,
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
            .map_err(|e| ApiError::new(ErrorCode::BadId, format!("{}: {e}", item.id)))?;
        let allowed = id.to_string() == actor
            || id
                .path()
                .strip_prefix("/svc/")
                .is_some_and(|svc| services.iter().any(|s| s == svc))
                && id.trust_domain() == &ca.trust_domain;
        if !allowed {
            return Err(refused(
                &s,
                &actor,
                ErrorCode::NotRegistered,
                format!("{id} is not registered to node {node}"),
            )
            .await);
        }
        match check_csr(item.csr.as_bytes(), &id) {
            Ok(k) => checked.push((id, k)),
            Err(e) => return Err(refused(&s, &actor, ErrorCode::CsrInvalid, e.to_string()).await),
        }
    }
    let mut identities = Vec::new();
    for (id, key) in &checked {
        identities.push(issue(&s, &ca, id, &node, key).await?);
    }
    s.store.node_seen(&node, now()).await?;
    audit_required(
        &*s.store,
        actor,
        "cert.issue",
        serde_json::json!({ "node": node, "ids": identities.iter().map(|i| i.id.clone()).collect::<Vec<_>>() }),
    )
    .await?;
    Ok(Json(SignResponse {
        identities,
        bundle: ca.bundle.clone(),
        services,
    }))
}

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

/// `GET /v1/spiffe-bundle`: the trust bundle as a SPIFFE bundle endpoint serves it (JWK Set
/// with x509-svid keys), so another trust domain (tapproof or SPIRE) can federate with this one
/// by the https_spiffe profile: the endpoint proves the server's SVID, checked against the bundle
/// the other side already holds. No sequence number: nothing here counts bundle changes yet.
pub(crate) async fn spiffe_bundle(
    State(s): State<Arc<AppState>>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let ca = s.ca();
    let roots = ca
        .bundle
        .iter()
        .map(|pem| tapproof_identity::ca::first_der(pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ApiError::new(
                ErrorCode::CaError,
                format!("a root of the bundle cannot be read: {e}"),
            )
        })?;
    let doc = tapproof_identity::bundle::encode(&roots, tapproof_identity::bundle::REFRESH_HINT_S, None)
        .map_err(|e| ApiError::new(ErrorCode::CaError, e.to_string()))?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], doc).into_response())
}

/// Signs `public_key` for `id`, records the certificate.
async fn issue(
    s: &AppState,
    ca: &Ca,
    id: &SpiffeId,
    node: &str,
    public_key: &tapproof_identity::csr::CsrKey,
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
    // A single-use token names the node; a reusable one lets the agent name itself within its
    // pattern, once per name.
    let name = if record.pattern {
        match chosen_name(&s, &record, req.node.as_deref()).await {
            Ok(name) => name,
            Err(message) => {
                warn!(peer = %peer.addr, token_id = %token.id, node = %req.node.as_deref().unwrap_or(""), "join refused: {message}");
                let details = serde_json::json!({ "token_id": token.id, "reason": "bad_node", "node": req.node, "detail": message });
                audit(&*s.store, actor, "join.refused", details).await;
                return Err(ApiError::new(ErrorCode::BadNode, message));
            }
        }
    } else {
        record.node.clone()
    };
    let node_id = ca
        .trust_domain
        .node_id(&name)
        .map_err(|e| ApiError::new(ErrorCode::BadNode, e.to_string()))?;
    let public_key = match check_csr(req.csr.as_bytes(), &node_id) {
        Ok(k) => k,
        Err(e) => {
            let details = serde_json::json!({ "node": name, "reason": e.to_string() });
            audit(&*s.store, format!("token:{}", token.id), "csr.refused", details).await;
            return Err(ApiError::new(ErrorCode::CsrInvalid, e.to_string()));
        }
    };
    // Consuming is the atomic step: of two concurrent joins with one token, one wins.
    let used = match s
        .store
        .token_consume(&token.id, &token.secret_hash(), now())
        .await
    {
        Ok(used) => used,
        Err(e) => return Err(join_refused(&s, &peer, &token, actor, e).await),
    };
    let identity = issue(&s, &ca, &node_id, &name, &public_key).await?;
    s.store.node_upsert(&name, &node_id.to_string(), now()).await?;
    for service in &record.services {
        s.store.registration_add(&name, service).await?;
    }
    let mut details = serde_json::json!({ "node": name, "id": node_id.to_string(), "services": record.services, "not_after": identity.not_after });
    if record.pattern {
        details["node_pattern"] = record.node.clone().into();
        details["token_use"] = used.uses.into();
        details["token_uses"] = used.max_uses.into();
    }
    audit_required(&*s.store, format!("token:{}", token.id), "node.join", details).await?;
    info!(node = %name, peer = %peer.addr, "node joined");
    let services = s
        .store
        .registrations()
        .await?
        .into_iter()
        .filter(|r| r.node == name)
        .map(|r| r.service)
        .collect();
    Ok(Json(JoinResponse {
        node: name,
        identity,
        bundle: ca.bundle.clone(),
        services,
    }))
}

/// The name a node joining with a reusable token gave itself, if the token allows it: a valid
/// name, within the pattern, and not a node that joined before (a reusable token must not hand
/// out an existing node's identity).
async fn chosen_name(
    s: &AppState,
    record: &tapproof_store::JoinToken,
    name: Option<&str>,
) -> Result<String, String> {
    let name = name
        .ok_or("this token is reusable: the agent must name itself (`[control] node`, or its host name)")?;
    tapproof_identity::valid_chosen_name(name)?;
    let pattern =
        tapproof_identity::NodePattern::parse(&record.node).map_err(|e| format!("the token's {e}"))?;
    if !pattern.matches(name) {
        return Err(format!(
            "node name {name:?} is outside the token's pattern {:?}",
            record.node
        ));
    }
    match s.store.node_get(name).await {
        Ok(None) => Ok(name.to_owned()),
        Ok(Some(_)) => Err(format!(
            "node {name:?} has already joined; a reusable token cannot take over an existing node (it keeps its identity in its data dir; revoke it first if it must join anew)"
        )),
        Err(e) => Err(format!("cannot check node {name:?}: {e}")),
    }
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

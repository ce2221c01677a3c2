//! The state feed (`GET /v1/state`, node identities): a long-poll that answers at once when the
//! caller's version is old, else when something changes or `LONG_POLL_SECS` pass. The answer for
//! a version is built once and shared by every waiting agent. The caller's tunnel address and the
//! addresses where clients reach its services, when given, go into the service directory; nodes
//! revoked by any kind leave it.

use crate::app::{node_is_live, query, revocation_set, ApiError, AppState, Peer};
use crate::auth::{authorize, Need};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tapproof_api::{DirectoryEntry, ErrorCode, StateQuery, StateResponse};
use tracing::info;

const LONG_POLL: Duration = Duration::from_secs(tapproof_api::LONG_POLL_SECS);

/// The state feed: answers at once when `since` is absent or older than the version, else holds
/// the request until
/// something changes or `LONG_POLL` passes. Registered, unrevoked nodes only (mTLS), checked
/// again after the wait.
pub(crate) async fn state_feed(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    q: Result<axum::extract::Query<StateQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let caller = authorize(&s, &peer, Need::Node, "state").await?;
    let query = query(q)?;
    let since = query.since;
    if let Some(tunnel) = &query.tunnel {
        let addr: std::net::SocketAddr = tunnel
            .parse()
            .map_err(|e| ApiError::new(ErrorCode::BadQuery, format!("tunnel {tunnel:?}: {e}")))?;
        if s.store.node_set_tunnel(&caller.name, &addr.to_string()).await? {
            s.store.notify_change().await?;
            info!(node = %caller.name, tunnel = %addr, "directory: tunnel address announced");
        }
    }
    if let Some(text) = &query.addresses {
        let announced = tapproof_api::Announced::parse(text)
            .map_err(|e| ApiError::new(ErrorCode::BadQuery, format!("addresses: {e}")))?;
        let mut by_service: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (service, addr) in &announced.0 {
            by_service
                .entry(service.clone())
                .or_default()
                .push(addr.to_string());
        }
        if s.store
            .registration_set_addresses(&caller.name, &by_service)
            .await?
        {
            s.store.notify_change().await?;
            info!(node = %caller.name, addresses = %text, "directory: service addresses announced");
        }
    }
    if let Some(since) = since {
        // Never past the newest version: a node cannot acknowledge what no document carried.
        let newest = *s.version.borrow();
        acknowledge(&s, &caller.name, since.min(newest)).await?;
    }
    let mut version = s.version.clone();
    let mut waited_since = None;
    if let Some(since) = since.filter(|since| *version.borrow() <= *since) {
        // A node holds a few long-polls at most (one per agent, plus a restart's overlap).
        let Ok(_held) = s.rate.long_polls.admit(caller.name.clone()) else {
            s.rate.refusals.long_polls.inc();
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "node {} already holds {} state-feed long-polls",
                    caller.name, s.limits.long_polls_per_node
                ),
            ));
        };
        let _watching = s.metrics.watching();
        waited_since = Some(since);
        tokio::select! {
            _ = tokio::time::timeout(LONG_POLL, version.wait_for(|v| *v > since)) => {}
            // A draining server answers now, so agents move to another replica at once.
            _ = s.draining.cancelled() => {}
        }
    }
    // A revocation made while this request waited covers it too (the registration was checked
    // above and is never removed, so the in-memory revocation set is all there is to ask).
    crate::auth::refuse_revoked(&s, &peer, "state").await?;
    let current = *version.borrow();
    // One request builds the answer for this version; the others wait for it and reuse it.
    let mut cache = s.feed_cache.lock().await;
    let bytes = match &*cache {
        Some((v, bytes)) if *v == current => bytes.clone(),
        _ => {
            let document = build_state(&s, current).await?;
            let built = Bytes::from(
                serde_json::to_vec(&document)
                    .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?,
            );
            *cache = Some((current, built.clone()));
            built
        }
    };
    drop(cache);
    if waited_since.is_some_and(|since| current > since) {
        s.metrics.change_delivered(current);
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

/// Revocation acknowledgements this replica already recorded: per node, the highest `since` it
/// recorded. A node's polls record once per feed version, not once per long-poll; another
/// replica's records of the same are idempotent (the store keeps the first).
#[derive(Default)]
pub struct Acks {
    recorded: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

/// `node` asks the feed with `since`: an agent does so only after applying that version's
/// document, so it has applied every revocation the documents up to `since` carried.
async fn acknowledge(s: &AppState, node: &str, since: i64) -> Result<(), ApiError> {
    let last = s
        .acks
        .recorded
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(node)
        .copied();
    // Nothing new since this node's last record here (after a restart `last` is unknown: one
    // idempotent write).
    if last.is_some_and(|last| since <= last) {
        return Ok(());
    }
    let now = crate::now();
    let added = s.store.revocation_ack(node, since, now).await?;
    if !added.is_empty() {
        let joined = s.store.node_get(node).await?.map(|n| n.created_at);
        for r in s.store.revocations().await? {
            // A node that joined after the revocation applied it on joining: not a propagation.
            if added.contains(&r.id)
                && !joined.is_some_and(|joined| crate::app::joined_after(joined, r.revoked_at))
            {
                s.metrics.revocation_applied(now - r.revoked_at);
            }
        }
        info!(%node, revocations = ?added, "revocations applied by the node (acknowledged)");
    }
    s.acks
        .recorded
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(node.to_owned(), since);
    Ok(())
}

/// The state feed's answer at `current`, from the store. Revocations it carries for the first
/// time are stamped with `current` (what nodes' acknowledgements are measured against).
async fn build_state(s: &AppState, current: i64) -> Result<StateResponse, ApiError> {
    let rows = s.store.revocations().await?;
    if let Some(newest) = rows.iter().filter(|r| r.version.is_none()).map(|r| r.id).max() {
        s.store.revocations_stamp(current, newest).await?;
    }
    let revoked = revocation_set(&rows);
    let revocations = rows.into_iter().map(crate::admin::revocation).collect();
    let nodes = s.store.node_list().await?;
    let mut directory = Vec::new();
    let mut listed: std::collections::HashMap<String, bool> = Default::default();
    for r in s.store.registrations().await? {
        let Some(node) = nodes.iter().find(|n| n.name == r.node) else {
            continue;
        };
        let Some(tunnel) = node.tunnel_addr.clone() else {
            continue;
        };
        // A node revoked by any kind leaves the directory: by name or ID at once, by serial when
        // its newest node certificate is the revoked one (it cannot renew past that).
        let live = match listed.get(&node.name) {
            Some(live) => *live,
            None => {
                let live = node_is_live(&*s.store, &revoked, node).await?;
                listed.insert(node.name.clone(), live);
                live
            }
        };
        if !live {
            continue;
        }
        directory.push(DirectoryEntry {
            service: r.service,
            node: node.name.clone(),
            id: node.spiffe_id.clone(),
            tunnel,
            addresses: r.addresses,
        });
    }
    let policy = crate::get_policy(&*s.store)
        .await
        .map_err(|e| ApiError::new(ErrorCode::PolicyUnavailable, e.to_string()))?;
    Ok(StateResponse {
        version: current,
        revocations,
        bundle: s.ca().bundle.clone(),
        directory,
        policy: policy
            .services
            .into_iter()
            .map(|(service, rule)| (service, rule.allow))
            .collect(),
        capture: policy.capture,
    })
}

//! Root rollover in three steps, none of which breaks a connection:
//! 1. `prepare`: a new root and intermediate are made but sign nothing; the new root joins the
//!    trust bundle, which agents pick up from the state feed.
//! 2. `activate`: the new intermediate signs from now on (agents get new-root leaves at their next
//!    renewal); the old intermediate stops signing; the old root stays in the bundle, so leaves
//!    it signed stay valid.
//! 3. `retire`: the old root leaves the bundle, refused while any certificate issued before the
//!    activation is still valid (unless forced).

use crate::kek::Kek;
use crate::{now, ServerError};
use tapproof_identity::TrustDomain;
use tapproof_store::{CaKind, CaState, NewAudit, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotateStep {
    /// A new root and intermediate with keys of `algorithm` (default: the active CA's).
    Prepare {
        algorithm: Option<tapproof_identity::KeyAlgorithm>,
    },
    Activate,
    Retire {
        force: bool,
    },
}

/// Records the step and wakes every replica's state feed.
async fn audit(store: &dyn Store, action: &str, details: serde_json::Value) -> Result<i64, ServerError> {
    store.notify_change().await?;
    let t = now();
    store
        .audit_append(
            NewAudit {
                actor: "cli".into(),
                action: action.into(),
                details,
            },
            t,
        )
        .await?;
    Ok(t)
}

/// Runs one step; returns a sentence saying what changed.
pub async fn rotate(
    store: &dyn Store,
    kek: &Kek,
    td: &TrustDomain,
    step: RotateStep,
) -> Result<String, ServerError> {
    let cas = store.ca_list().await?;
    let prepared: Vec<_> = cas.iter().filter(|c| c.state == CaState::Prepared).collect();
    let active_inter = cas
        .iter()
        .filter(|c| c.kind == CaKind::Intermediate && c.state == CaState::Active)
        .max_by_key(|c| c.id);
    match step {
        RotateStep::Prepare { algorithm } => {
            if !prepared.is_empty() {
                return Err(ServerError::Invalid(
                    "a new root is already prepared; run `tapproof server ca rotate activate`".into(),
                ));
            }
            // Without a choice, the new root keeps the active one's algorithm: a rollover never
            // changes it unasked.
            let algorithm = match (algorithm, active_inter) {
                (Some(a), _) => a,
                (None, Some(inter)) => tapproof_identity::key_algorithm_of(&inter.cert_pem)
                    .map_err(|e| ServerError::Ca(e.to_string()))?,
                (None, None) => tapproof_identity::KeyAlgorithm::EcdsaP256,
            };
            let (root_id, inter_id, pin) =
                crate::ca::create_pair(store, kek, td, CaState::Prepared, algorithm).await?;
            audit(store, "ca.prepare", serde_json::json!({ "root_id": root_id, "intermediate_id": inter_id, "root_sha256": hex::encode(pin), "key_algorithm": algorithm.as_str() })).await?;
            Ok(format!("prepared root {root_id} ({}, sha256 {}): it is in every bundle now and signs nothing yet; activate once agents have it", algorithm.as_str(), hex::encode(pin)))
        }
        RotateStep::Activate => {
            let inter = prepared
                .iter()
                .find(|c| c.kind == CaKind::Intermediate)
                .ok_or_else(|| {
                    ServerError::Invalid(
                        "nothing prepared; run `tapproof server ca rotate prepare` first".into(),
                    )
                })?;
            let root_id = inter
                .parent_id
                .ok_or_else(|| ServerError::Ca("prepared intermediate has no root".into()))?;
            store.ca_set_state(root_id, CaState::Active).await?;
            store.ca_set_state(inter.id, CaState::Active).await?;
            if let Some(old) = active_inter {
                store.ca_set_state(old.id, CaState::Retired).await?;
            }
            audit(store, "ca.activate", serde_json::json!({ "root_id": root_id, "intermediate_id": inter.id, "retired_intermediate": active_inter.map(|c| c.id) })).await?;
            Ok(format!(
                "root {root_id} now signs; the old root stays trusted until `retire`"
            ))
        }
        RotateStep::Retire { force } => {
            let signing_root = active_inter.and_then(|c| c.parent_id);
            let old: Vec<_> = cas
                .iter()
                .filter(|c| {
                    c.kind == CaKind::Root && c.state == CaState::Active && Some(c.id) != signing_root
                })
                .collect();
            if old.is_empty() {
                return Err(ServerError::Invalid("no old root to retire".into()));
            }
            let activated_at = last_activation(store).await?;
            let live = store.cert_count_live(activated_at, now()).await?;
            if live > 0 && !force {
                return Err(ServerError::Invalid(format!(
                    "{live} certificate(s) issued before the activation are still valid; retiring now would break them. Wait until they expire (at most one leaf lifetime) or pass --force"
                )));
            }
            for c in &old {
                store.ca_set_state(c.id, CaState::Retired).await?;
            }
            let ids: Vec<i64> = old.iter().map(|c| c.id).collect();
            audit(
                store,
                "ca.retire",
                serde_json::json!({ "root_ids": ids, "forced": force, "live_certificates": live }),
            )
            .await?;
            let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
            Ok(format!(
                "retired root(s) {}; they leave every bundle",
                ids.join(", ")
            ))
        }
    }
}

async fn last_activation(store: &dyn Store) -> Result<i64, ServerError> {
    let mut after = 0;
    let mut at = 0;
    loop {
        let rows = store.audit_list(after, 1000).await?;
        let Some(last) = rows.last() else { break };
        after = last.seq;
        if let Some(r) = rows.iter().rev().find(|r| r.action == "ca.activate") {
            at = r.at;
        }
    }
    Ok(at)
}

/// The state feed's version: grows with every change agents must learn of.
pub async fn feed_version(store: &dyn Store) -> Result<i64, ServerError> {
    Ok(store.change_version().await?)
}

/// When `tapproof server run` rolls the root over by itself.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Prepare a new root once the signing root is this old.
    pub root_max_age: std::time::Duration,
    /// Activate a prepared root after this long (time for every agent to fetch the new bundle).
    pub propagation: std::time::Duration,
}

/// One look at the schedule: runs the step that is due, if any. Safe with several replicas: a
/// step another replica already took fails its precondition and nothing happens.
pub async fn scheduled_step(
    store: &dyn Store,
    kek: &Kek,
    td: &TrustDomain,
    schedule: &Schedule,
) -> Result<Option<String>, ServerError> {
    let cas = store.ca_list().await?;
    let t = now();
    if let Some(prepared) = cas
        .iter()
        .find(|c| c.state == CaState::Prepared && c.kind == CaKind::Intermediate)
    {
        if t - prepared.created_at >= schedule.propagation.as_secs() as i64 {
            return rotate(store, kek, td, RotateStep::Activate).await.map(Some);
        }
        return Ok(None);
    }
    let signing_root = cas
        .iter()
        .filter(|c| c.kind == CaKind::Intermediate && c.state == CaState::Active)
        .max_by_key(|c| c.id)
        .and_then(|i| i.parent_id)
        .and_then(|id| cas.iter().find(|c| c.id == id));
    let old_roots = cas.iter().any(|c| {
        c.kind == CaKind::Root && c.state == CaState::Active && Some(c.id) != signing_root.map(|r| r.id)
    });
    if old_roots {
        // Retire refuses while certificates from before the activation live; try again later.
        return Ok(rotate(store, kek, td, RotateStep::Retire { force: false })
            .await
            .ok());
    }
    match signing_root {
        Some(root) if t - root.created_at >= schedule.root_max_age.as_secs() as i64 => {
            rotate(store, kek, td, RotateStep::Prepare { algorithm: None })
                .await
                .map(Some)
        }
        _ => Ok(None),
    }
}

//! The control plane's probes of each agent: connections every agent's tunnel listener must
//! refuse that only the CA can make (agents probe themselves for the rest, `tls/selftest.rs`):
//! a certificate of the trust domain that expired an hour ago, and a valid one whose identity
//! (`spiffe://<td>/node/tapproof-probe-revoked`) is revoked. The revocation is made on the first
//! round and kept; a node is probed with it only once it acknowledged that revocation (the
//! propagation record, `feed.rs`), so a slow feed is not mistaken for an agent that ignores
//! revocations. Each round is one audit row (`selftest.server_round`); an accepted probe is an
//! ERROR log line and `selftest.accepted` in the audit log. Rounds run every `--probe-interval`
//! (`serve.rs`) and on demand (`tapproof server probe`).

use crate::{Ca, ServerError};
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;
use tapproof_store::{NewAudit, RevocationKind, Store};
use tapproof_tls::selftest::{run_with_identity, Verdict};
use tracing::{error, info};

/// The node name of the revoked probe identity (never a real node: `tapproof-` names are ours).
pub const REVOKED_NODE: &str = "tapproof-probe-revoked";
/// The node name of the expired probe identity.
pub const EXPIRED_NODE: &str = "tapproof-probe-expired";
/// How long one probe waits for each step.
pub const WAIT: Duration = Duration::from_secs(5);

/// One probe of one node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeProbe {
    pub node: String,
    pub target: String,
    /// `expired` or `revoked`.
    pub probe: &'static str,
    /// `refused`, `accepted` (an alarm), `not_applicable` or `error`.
    pub result: &'static str,
    pub detail: String,
}

fn verdict(v: Verdict) -> (&'static str, String) {
    let result = v.result();
    let detail = match v {
        Verdict::Refused(why) | Verdict::Error(why) => why,
        Verdict::Accepted => "the listener accepted it".into(),
        Verdict::NotApplicable(why) => why.into(),
    };
    (result, detail)
}

/// Runs one round against every live node that announced a tunnel listener; records it.
pub async fn round(store: &dyn Store, ca: &Ca, actor: &str) -> Result<Vec<NodeProbe>, ServerError> {
    let td = &ca.trust_domain;
    let bad = |e: tapproof_identity::SpiffeIdError| ServerError::Ca(e.to_string());
    let revoked_id = td.node_id(REVOKED_NODE).map_err(bad)?;
    let expired_id = td.node_id(EXPIRED_NODE).map_err(bad)?;
    let mut revocations = store.revocations().await?;
    let existing = revocations
        .iter()
        .find(|r| r.kind == RevocationKind::SpiffeId && r.value == revoked_id.to_string())
        .cloned();
    let probe_revocation = match existing {
        Some(r) => r,
        None => {
            let r = crate::revoke_as(
                store,
                RevocationKind::SpiffeId,
                &revoked_id.to_string(),
                "self-test probe identity, revoked on purpose: the control plane checks that agents refuse it",
                actor,
            )
            .await?;
            revocations.push(r.clone());
            r
        }
    };
    let applied: std::collections::HashSet<String> = store
        .revocation_acks()
        .await?
        .into_iter()
        .filter(|a| a.revocation_id == probe_revocation.id)
        .map(|a| a.node)
        .collect();
    let issue = |e: tapproof_identity::CaError| ServerError::Ca(format!("cannot make a probe identity: {e}"));
    let expired = ca.signer.issue_expired_for_probe(&expired_id).map_err(issue)?;
    let revoked = ca
        .signer
        .issue_with_new_key(&revoked_id, time::Duration::minutes(10))
        .map_err(issue)?;
    // The probes offer what any agent's profile accepts (ML-KEM-1024 too): the identity is
    // what must be refused, not the key exchange.
    let policy = tapproof_tls::CryptoPolicy::PreferPostQuantum;
    let mut out = Vec::new();
    for node in crate::app::live_nodes(store, &revocations).await? {
        let Some(target) = node
            .tunnel_addr
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            continue;
        };
        let (result, detail) =
            verdict(run_with_identity(target, &expired.chain_pem, &expired.key_pem, policy, WAIT).await);
        out.push(NodeProbe {
            node: node.name.clone(),
            target: target.to_string(),
            probe: "expired",
            result,
            detail,
        });
        let (result, detail) = if applied.contains(&node.name) {
            verdict(run_with_identity(target, &revoked.chain_pem, &revoked.key_pem, policy, WAIT).await)
        } else {
            (
                "not_applicable",
                "the node has not acknowledged the probe identity's revocation yet".to_owned(),
            )
        };
        out.push(NodeProbe {
            node: node.name.clone(),
            target: target.to_string(),
            probe: "revoked",
            result,
            detail,
        });
    }
    let now = crate::now();
    let accepted: Vec<&NodeProbe> = out.iter().filter(|p| p.result == "accepted").collect();
    for p in &accepted {
        error!(node = %p.node, target = %p.target, probe = p.probe, "control-plane probe: a certificate that must be refused was ACCEPTED by the node's tunnel listener");
    }
    store
        .audit_append(
            NewAudit {
                actor: actor.to_owned(),
                action: if accepted.is_empty() {
                    "selftest.server_round".into()
                } else {
                    "selftest.accepted".into()
                },
                details: serde_json::json!({ "probes": out }),
            },
            now,
        )
        .await?;
    info!(
        probes = out.len(),
        accepted = accepted.len(),
        "control-plane probe round done"
    );
    Ok(out)
}

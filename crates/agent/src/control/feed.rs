//! Following the state feed: revocations (open tunnels of revoked peers close, their handshakes
//! are refused), the trust bundle (written and swapped in during a root rollover), the service
//! directory that outbounds without `peers` dial from (and the addresses `capture.directory`
//! captures), and the control plane's policy (with its capture modes). Our tunnel address and the
//! addresses where clients reach our inbound services are announced with each poll.

use super::files::{data_err, identity_files, Staged};
use super::{node_client, ControlError, RETRY_MAX, RETRY_MIN};
use crate::config::ControlConfig;
use crate::state::AgentState;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tapproof_api::RevocationKind;
use tapproof_identity::{RevokedBy, SpiffeId};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What a state-feed document means to this agent. Entries it cannot use (a revocation of a
/// kind it does not know, a directory entry with a bad address or ID, a pattern it cannot parse)
/// are left out and logged; nothing in the document can make it panic (fuzzed: `state_feed`).
#[derive(Debug, Default)]
pub struct FeedView {
    pub version: i64,
    pub revoked: tapproof_identity::RevocationSet,
    pub directory: std::collections::HashMap<String, Vec<(SocketAddr, SpiffeId)>>,
    pub policy: std::collections::HashMap<String, Vec<crate::policy::AllowPattern>>,
    pub bundle: Vec<String>,
    /// The directory's client addresses and the policy's capture modes.
    pub capture: crate::capture::Inputs,
}

/// Reads a state-feed document.
pub fn read_feed(feed: tapproof_api::StateResponse) -> FeedView {
    let mut revoked = tapproof_identity::RevocationSet::default();
    for r in feed.revocations {
        let by = match r.kind {
            RevocationKind::Node => RevokedBy::Node,
            RevocationKind::SpiffeId => RevokedBy::SpiffeId,
            RevocationKind::Serial => RevokedBy::Serial,
            RevocationKind::Unknown => {
                warn!(value = %r.value, "state feed: a revocation of a kind this agent does not know is ignored; upgrade the agent");
                continue;
            }
        };
        revoked.insert(by, &r.value);
    }
    let mut directory: std::collections::HashMap<String, Vec<(SocketAddr, SpiffeId)>> = Default::default();
    let mut addresses = Vec::new();
    for e in feed.directory {
        match (e.tunnel.parse(), SpiffeId::parse(&e.id)) {
            (Ok(tunnel), Ok(id)) => {
                for a in &e.addresses {
                    match a.parse() {
                        Ok(addr) => addresses.push(crate::capture::DirectoryAddress {
                            addr,
                            service: e.service.clone(),
                            node: e.node.clone(),
                            id: id.clone(),
                            tunnel,
                        }),
                        Err(_) => {
                            warn!(service = %e.service, node = %e.node, address = %a, "state feed: unusable directory address")
                        }
                    }
                }
                directory.entry(e.service).or_default().push((tunnel, id));
            }
            _ => warn!(service = %e.service, tunnel = %e.tunnel, "state feed: unusable directory entry"),
        }
    }
    let mut policy: std::collections::HashMap<String, Vec<crate::policy::AllowPattern>> = Default::default();
    for (service, patterns) in feed.policy {
        let parsed: Vec<_> = patterns.iter().filter_map(|p| p.parse().ok()).collect();
        if parsed.len() != patterns.len() {
            warn!(service = %service, "state feed: policy has patterns this agent cannot parse; they are ignored");
        }
        policy.insert(service, parsed);
    }
    FeedView {
        version: feed.version,
        revoked,
        directory,
        policy,
        bundle: feed.bundle,
        capture: crate::capture::Inputs {
            addresses,
            policy: feed.capture,
        },
    }
}

/// Follows the control plane's state feed (long-poll) and applies revocations: revoked peers'
/// tunnels are closed and their new handshakes refused.
pub async fn state_loop(state: Arc<AgentState>, cfg: ControlConfig, stop: CancellationToken) {
    // None: the first call, answered at once whatever the server's version.
    let mut since: Option<i64> = None;
    let mut retry = RETRY_MIN;
    // A server older than the `addresses` query parameter refuses it (its query type refuses
    // unknown fields): then the feed goes on without it, and tries it again an hour later.
    let mut announce_after: Option<tokio::time::Instant> = None;
    loop {
        let announce = announce_after.is_none_or(|at| tokio::time::Instant::now() >= at);
        let step = async {
            let client = node_client(&state, &cfg)?.with_attempts(1);
            let announced = crate::capture::announced(&state.applied(), state.advertise.get().copied());
            Ok::<_, ControlError>(
                client
                    .state(
                        since,
                        state.advertise.get().copied(),
                        announce.then_some(&announced),
                    )
                    .await?,
            )
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            o = step => o,
            // A reload changed the services: poll again now, announcing them (not after the
            // long-poll's hold).
            _ = state.announce_changed.notified() => continue,
        };
        match outcome {
            Ok(feed) => {
                retry = RETRY_MIN;
                if since != Some(feed.version) {
                    let FeedView {
                        version,
                        revoked,
                        directory,
                        policy,
                        bundle,
                        capture,
                    } = read_feed(feed);
                    let closed = state.apply_revocations(revoked);
                    state.set_directory(directory);
                    state.set_policy(policy);
                    state.set_capture_inputs(capture);
                    if let Err(e) = install_bundle(&state, &cfg, &bundle) {
                        warn!(error = %e, "cannot install the new trust bundle");
                    }
                    info!(
                        version,
                        closed_tunnels = closed,
                        "state feed: revocations applied"
                    );
                    since = Some(version);
                }
            }
            Err(ControlError::Refused {
                code: tapproof_api::ErrorCode::BadQuery,
                message,
                ..
            }) if announce && message.contains("unknown field `addresses`") => {
                warn!(%message, "state feed: the control plane does not take the addresses of this node's services (an older server?); following the feed without announcing them, and trying again in an hour; other agents' capture.directory does not see them meanwhile");
                announce_after = Some(tokio::time::Instant::now() + std::time::Duration::from_secs(3600));
            }
            Err(e) => {
                tracing::debug!(error = %e, retry_in_s = retry.as_secs(), "state feed unavailable");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Writes a changed trust bundle (root rollover) and swaps it in for new handshakes.
fn install_bundle(state: &AgentState, cfg: &ControlConfig, bundle: &[String]) -> Result<(), ControlError> {
    let path = identity_files(&cfg.data_dir).bundle;
    let new = bundle.concat();
    if bundle.is_empty() || std::fs::read_to_string(&path).is_ok_and(|old| old == new) {
        return Ok(());
    }
    state.renewing.store(true, Ordering::Release);
    let result = Staged::begin(&cfg.data_dir)
        .and_then(|mut set| set.write_bundle(bundle).and_then(|()| set.commit()))
        .and_then(|()| state.material.reload().map(drop).map_err(|e| data_err(&path, e)));
    state.renewing.store(false, Ordering::Release);
    result?;
    info!(
        roots = bundle.len(),
        "trust bundle changed (root rollover): new handshakes trust the new set"
    );
    Ok(())
}

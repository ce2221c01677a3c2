//! Self-test probes against this agent's own tunnel listener (`tapproof_tls::selftest`): on a
//! schedule (`tunnel.selftest_interval`, the first round one interval after start) and on demand
//! (`POST /v1/selftest` on the admin endpoint). Every probe must be refused; one the listener
//! accepts is an alarm: `tapproof_selftest_accepted` (probes accepted in the latest round) goes
//! above 0 and an error is logged. Each round is kept (`GET /v1/selftest`) with its time.

use crate::metrics::ProbeLabels;
use crate::state::AgentState;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tapproof_tls::selftest::{run, Probe, Verdict};
use tracing::{error, info};

/// How long one probe step may wait.
const WAIT: Duration = Duration::from_secs(5);

/// A round and its probes' results: the audit crate's types, since rounds travel to the control
/// plane with the coverage report.
pub use tapproof_audit::{SelftestProbe as ProbeResult, SelftestRound as Round};

/// Where the probes dial: the tunnel listener, on loopback when it listens on every address.
pub fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Runs every probe once against `target`, records and returns the round.
pub async fn round(state: &AgentState, target: SocketAddr) -> Round {
    let at = tapproof_identity::when::now();
    let material = state.material.current();
    let policy = state.config.tunnel.crypto_policy();
    let mut probes = Vec::new();
    let mut accepted = 0;
    for probe in Probe::ALL {
        let verdict = run(probe, target, &material, policy, WAIT).await;
        let detail = match &verdict {
            Verdict::Refused(why) => why.clone(),
            Verdict::Accepted => "the listener accepted it".to_owned(),
            Verdict::NotApplicable(why) => (*why).to_owned(),
            Verdict::Error(why) => why.clone(),
        };
        state
            .metrics
            .selftest_probes
            .get_or_create(&ProbeLabels {
                probe: probe.name(),
                result: verdict.result(),
            })
            .inc();
        if verdict == Verdict::Accepted {
            accepted += 1;
            error!(probe = probe.name(), %target, "self-test: a connection that must fail was ACCEPTED by this agent's tunnel listener");
        }
        probes.push(ProbeResult {
            probe: probe.name().to_owned(),
            result: verdict.result().to_owned(),
            detail,
        });
    }
    state.metrics.selftest_accepted.set(accepted);
    state.metrics.selftest_last_round.set(at);
    let refused = probes.iter().filter(|p| p.result == "refused").count();
    info!(%target, refused, accepted, "self-test round done");
    let round = Round {
        at,
        target: target.to_string(),
        probes,
    };
    *state.selftest.lock().unwrap_or_else(|p| p.into_inner()) = Some(round.clone());
    round
}

/// Rounds every `interval` (the first after `first`) until the agent stops.
pub async fn schedule(
    state: std::sync::Arc<AgentState>,
    target: SocketAddr,
    first: Duration,
    interval: Duration,
) {
    tokio::time::sleep(first).await;
    loop {
        round(&state, target).await;
        tokio::time::sleep(interval).await;
    }
}

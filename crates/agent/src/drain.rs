//! Lifecycle pieces that run beside the listeners: the identity reload loop, and the drain on
//! shutdown (stop accepting, let open streams finish up to the deadline, then return).

use crate::state::AgentState;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub(crate) async fn reload_loop(state: Arc<AgentState>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(state.config.reload_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = String::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if state.renewing.load(Ordering::Acquire) {
            continue;
        }
        reload_identity(&state, &mut last_error);
    }
}

/// Re-reads the identity files; a change is applied to new handshakes (open tunnels stay up). A
/// problem is logged once per distinct message (`last_error`), not on every tick.
pub(crate) fn reload_identity(state: &AgentState, last_error: &mut String) {
    match state.material.reload() {
        Ok(true) => {
            let m = state.material.current();
            state.metrics.cert_reloads.inc();
            last_error.clear();
            info!(id = %m.id(), serial = %m.svid().serial, expires_in_s = m.seconds_to_expiry(),
                  "identity files changed: new handshakes use the new certificate; open tunnels stay up");
        }
        Ok(false) => last_error.clear(),
        Err(e) => {
            state.metrics.cert_reload_failures.inc();
            let msg = e.to_string();
            // Once per distinct problem, not every tick: an operator mid-rotation sees it once.
            if msg != *last_error {
                warn!(error = %msg, "identity files changed but cannot be used; keeping the current identity");
                *last_error = msg;
            }
        }
    }
    let left = state.material.current().seconds_to_expiry();
    state.metrics.cert_expiry_seconds.set(left);
}

pub(crate) async fn drain(
    state: &AgentState,
    stop: CancellationToken,
    streams: TaskTracker,
    listeners: Vec<JoinHandle<()>>,
) {
    state.ready.store(false, Ordering::Release);
    stop.cancel();
    for l in listeners {
        let _ = l.await;
    }
    streams.close();
    let open = streams.len();
    let deadline = state.config.tunnel.drain_timeout;
    info!(
        open_connections = open,
        deadline_s = deadline.as_secs_f64(),
        "draining: no new connections accepted"
    );
    if tokio::time::timeout(deadline, streams.wait()).await.is_err() {
        warn!(
            still_open = streams.len(),
            "drain deadline reached; closing what is left"
        );
    } else {
        info!("drained: every stream finished");
    }
}

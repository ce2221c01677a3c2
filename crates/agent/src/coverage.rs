//! The agent's part of the fleet view: it audits its own host on a schedule and sends the report
//! (and its recent denials) to the control plane, which keeps the history for the dashboard.

use crate::config::ControlConfig;
use crate::control::ControlError;
use crate::state::AgentState;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tapproof_audit::{AgentView, CoverageUpload, Options, MAX_UPLOAD_HANDSHAKES, MAX_UPLOAD_LINKS};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The first report goes out soon after start, so a new node shows up on the dashboard at once.
const FIRST_REPORT: Duration = Duration::from_secs(3);

pub async fn report_loop(state: Arc<AgentState>, cfg: ControlConfig, stop: CancellationToken) {
    let every = state.config.audit.report_interval_secs;
    if every == 0 {
        return;
    }
    let mut wait = FIRST_REPORT;
    // A server older than handshake records refuses the field (its upload type refuses unknown
    // fields): then reports go without them, and the field is tried again an hour later.
    let mut records_after: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        // Jitter, so a fleet restarted together does not report in lockstep.
        wait = Duration::from_secs(every).mul_f64(rand::rng().random_range(0.8..1.2));
        let applied = state.applied();
        let mut options = Options {
            allow: applied.audit.allow.clone(),
            known: applied.audit_known(),
            ..Options::default()
        };
        let report = match tokio::task::spawn_blocking(move || {
            let scan = tapproof_audit::scan::scan(std::path::Path::new("/proc"));
            // Asked after the scan: every vouched socket the scan saw was open before this list.
            options.agent = AgentView::Vouched(crate::vouch::sockets().snapshot());
            tapproof_audit::classify(&scan, &options, tapproof_audit::hostname(), tapproof_audit::now())
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "coverage: the audit did not finish");
                continue;
            }
        };
        let mut report = report;
        report.links.truncate(MAX_UPLOAD_LINKS);
        let with_records = records_after.is_none_or(|at| tokio::time::Instant::now() >= at);
        let mut upload = CoverageUpload {
            report,
            denials: state.recent_denials(),
            handshakes: if with_records {
                state.handshakes.unshipped(MAX_UPLOAD_HANDSHAKES)
            } else {
                Vec::new()
            },
            selftest: if with_records {
                state.selftest.lock().unwrap_or_else(|p| p.into_inner()).clone()
            } else {
                None
            },
        };
        let mut outcome = send(&state, &cfg, &upload).await;
        if let Err(ControlError::Refused {
            code: tapproof_api::ErrorCode::BadJson,
            message,
            ..
        }) = &outcome
        {
            if message.contains("unknown field `handshakes`") || message.contains("unknown field `selftest`")
            {
                warn!(%message, "coverage: the control plane does not take handshake records or self-test rounds (an older server?); reporting without them, trying again in an hour; the records stay on this node meanwhile");
                records_after = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
                upload.handshakes.clear();
                upload.selftest = None;
                outcome = send(&state, &cfg, &upload).await;
            }
        }
        match outcome {
            Ok(()) => {
                state.handshakes.shipped(&upload.handshakes);
                debug!(
                    links = upload.report.summary.links,
                    plaintext = upload.report.summary.plaintext,
                    handshakes = upload.handshakes.len(),
                    "coverage report sent"
                )
            }
            Err(e) => warn!(error = %e, "coverage: report not accepted"),
        }
    }
}

async fn send(state: &AgentState, cfg: &ControlConfig, upload: &CoverageUpload) -> Result<(), ControlError> {
    let body =
        serde_json::to_vec(upload).map_err(|e| ControlError::Encode(format!("coverage report: {e}")))?;
    crate::control::post_coverage(state, cfg, body).await
}

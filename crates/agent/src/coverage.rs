//! The agent's part of the fleet view: it audits its own host on a schedule and sends the report
//! (and its recent denials) to the control plane, which keeps the history for the dashboard.

use crate::config::ControlConfig;
use crate::state::AgentState;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tapproof_audit::{AgentView, CoverageUpload, Options, MAX_UPLOAD_LINKS};
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
        let upload = CoverageUpload {
            report,
            denials: state.recent_denials(),
        };
        let body = match serde_json::to_vec(&upload) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "coverage: cannot encode the report");
                continue;
            }
        };
        match crate::control::post_coverage(&state, &cfg, body).await {
            Ok(()) => debug!(
                links = upload.report.summary.links,
                plaintext = upload.report.summary.plaintext,
                "coverage report sent"
            ),
            Err(e) => warn!(error = %e, "coverage: report not accepted"),
        }
    }
}

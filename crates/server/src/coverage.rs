//! Coverage reports from agents (`POST /v1/coverage`, registered unrevoked node identities):
//! each is kept whole for the dashboard, with its counts for the fleet's history.

use crate::app::{parse, ApiError, AppState, Peer};
use crate::auth::{authorize, Need};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use bytes::Bytes;
use std::sync::Arc;
use tapproof_api::ErrorCode;
use tapproof_audit::{Class, CoverageUpload, MAX_UPLOAD_DENIALS, MAX_UPLOAD_LINKS};
use tapproof_store::NewCoverage;
use tracing::info;

/// A coverage upload may be larger than other requests (up to MAX_UPLOAD_LINKS links).
pub const MAX_COVERAGE_BODY: usize = 2 * 1024 * 1024;

pub async fn report(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let node = authorize(&s, &peer, Need::Node, "coverage").await?.name;
    let upload: CoverageUpload = parse(body)?;
    if upload.report.links.len() > MAX_UPLOAD_LINKS || upload.denials.len() > MAX_UPLOAD_DENIALS {
        return Err(ApiError::new(
            ErrorCode::ReportTooLarge,
            format!("send at most {MAX_UPLOAD_LINKS} links and {MAX_UPLOAD_DENIALS} denials"),
        ));
    }
    let summary = &upload.report.summary;
    let encrypted = upload.report.links.iter().filter(|l| l.class.encrypted()).count();
    let plaintext = upload
        .report
        .links
        .iter()
        .filter(|l| l.class == Class::Plaintext)
        .count();
    let at = crate::now();
    s.store
        .coverage_add(NewCoverage {
            node: node.clone(),
            at,
            links: upload.report.links.len() as i64,
            encrypted: encrypted as i64,
            plaintext: plaintext as i64,
            capture_mode: upload
                .report
                .capture
                .as_ref()
                .map(|c| c.inbound.as_str().to_owned()),
            plaintext_attempts: summary.plaintext_attempts as i64,
            report: serde_json::to_string(&upload)
                .map_err(|e| ApiError::new(ErrorCode::BadBody, e.to_string()))?,
        })
        .await?;
    s.store.node_seen(&node, at).await?;
    info!(
        node,
        links = summary.links,
        plaintext,
        coverage = summary.coverage_percent,
        "coverage report"
    );
    Ok(StatusCode::NO_CONTENT)
}

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
use tapproof_audit::{
    Class, CoverageUpload, HandshakeRecord, SelftestRound, MAX_UPLOAD_DENIALS, MAX_UPLOAD_HANDSHAKES,
    MAX_UPLOAD_LINKS,
};
use tapproof_store::{HandshakeRow, NewCoverage};
use tracing::info;

/// A coverage upload may be larger than other requests (up to MAX_UPLOAD_LINKS links).
pub const MAX_COVERAGE_BODY: usize = 4 * 1024 * 1024;

pub async fn report(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let node = authorize(&s, &peer, Need::Node, "coverage").await?.name;
    let mut upload: CoverageUpload = parse(body)?;
    if upload.report.links.len() > MAX_UPLOAD_LINKS
        || upload.denials.len() > MAX_UPLOAD_DENIALS
        || upload.handshakes.len() > MAX_UPLOAD_HANDSHAKES
    {
        return Err(ApiError::new(
            ErrorCode::ReportTooLarge,
            format!("send at most {MAX_UPLOAD_LINKS} links, {MAX_UPLOAD_DENIALS} denials and {MAX_UPLOAD_HANDSHAKES} handshake records"),
        ));
    }
    if let Some(round) = &upload.selftest {
        check_selftest(round).map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("selftest: {e}")))?;
    }
    // The records are kept on their own (`handshakes`), not in the report's history.
    let handshakes = std::mem::take(&mut upload.handshakes)
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            handshake_row(&node, r)
                .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("handshakes[{i}]: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
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
    let recorded = s.store.handshakes_add(&handshakes, at).await?;
    s.store.node_seen(&node, at).await?;
    info!(
        node,
        links = summary.links,
        plaintext,
        coverage = summary.coverage_percent,
        handshakes = handshakes.len(),
        new_handshakes = recorded,
        "coverage report"
    );
    Ok(StatusCode::NO_CONTENT)
}

/// Longest text a handshake record's field may hold (a SPIFFE ID is at most 2048 bytes).
/// Counted in characters, as the OpenAPI document's `maxLength` counts.
const MAX_FIELD: usize = 2048;

/// `text` of `field` is at most `MAX_FIELD` characters, else says which field is too long.
fn fits(field: &str, text: &str) -> Result<(), String> {
    if text.chars().count() > MAX_FIELD {
        return Err(format!("{field} is longer than {MAX_FIELD} characters"));
    }
    Ok(())
}

/// Probes a self-test round may report (there are six today).
pub const MAX_SELFTEST_PROBES: usize = 32;

fn check_selftest(round: &SelftestRound) -> Result<(), String> {
    if round.probes.len() > MAX_SELFTEST_PROBES {
        return Err(format!("at most {MAX_SELFTEST_PROBES} probes"));
    }
    fits("target", &round.target)?;
    for (i, p) in round.probes.iter().enumerate() {
        if !matches!(
            p.result.as_str(),
            "refused" | "accepted" | "not_applicable" | "error"
        ) {
            return Err(format!(
                "probes[{i}].result {:?}: refused, accepted, not_applicable or error",
                p.result
            ));
        }
        fits(&format!("probes[{i}].probe"), &p.probe)?;
        fits(&format!("probes[{i}].detail"), &p.detail)?;
    }
    Ok(())
}

/// A reported handshake record as the store keeps it, or what is wrong with it.
fn handshake_row(node: &str, r: HandshakeRecord) -> Result<HandshakeRow, String> {
    if !matches!(r.side.as_str(), "inbound" | "outbound") {
        return Err(format!("side {:?}: inbound or outbound", r.side));
    }
    if !matches!(r.outcome.as_str(), "ok" | "refused") {
        return Err(format!("outcome {:?}: ok or refused", r.outcome));
    }
    let seq = i64::try_from(r.seq).map_err(|_| format!("seq {} is out of range", r.seq))?;
    let texts = [
        ("local", Some(&r.local)),
        ("remote", Some(&r.remote)),
        ("local_id", Some(&r.local_id)),
        ("local_serial", Some(&r.local_serial)),
        ("peer_id", r.peer_id.as_ref()),
        ("peer_serial", r.peer_serial.as_ref()),
        ("tls_version", r.tls_version.as_ref()),
        ("cipher", r.cipher.as_ref()),
        ("group", r.group.as_ref()),
        ("signature_scheme", r.signature_scheme.as_ref()),
        ("reason", r.reason.as_ref()),
    ];
    for (field, text) in texts {
        if let Some(text) = text {
            fits(field, text)?;
        }
    }
    Ok(HandshakeRow {
        node: node.to_owned(),
        at_ms: r.at_ms,
        seq,
        side: r.side,
        local_addr: r.local,
        remote_addr: r.remote,
        local_id: r.local_id,
        local_serial: r.local_serial,
        peer_id: r.peer_id,
        peer_serial: r.peer_serial,
        tls_version: r.tls_version,
        cipher: r.cipher,
        group: r.group,
        signature_scheme: r.signature_scheme,
        resumed: r.resumed,
        outcome: r.outcome,
        reason: r.reason,
    })
}

//! What operators did on nodes (`POST /v1/events`, registered unrevoked node identities): the
//! CLI sends it with the node's identity (today: `tapproof capture remove`), and the control
//! plane's audit log holds it, the node's SPIFFE ID as actor.

use crate::app::{audit_required, parse, ApiError, AppState, Peer};
use crate::auth::{authorize, Need};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use bytes::Bytes;
use std::sync::Arc;
use tapproof_api::{ErrorCode, NodeEvent, MAX_EVENT_TEXT};
use tracing::warn;

pub async fn record(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let caller = authorize(&s, &peer, Need::Node, "event").await?;
    let event: NodeEvent = parse(body)?;
    for (field, text) in [("by", &event.by), ("reason", &event.reason)] {
        if text.len() > MAX_EVENT_TEXT || text.chars().any(char::is_control) {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("{field}: at most {MAX_EVENT_TEXT} bytes, no control characters"),
            ));
        }
    }
    let action = event.kind.action();
    warn!(node = %caller.name, action, by = %event.by, reason = %event.reason, "node event recorded");
    audit_required(
        &*s.store,
        caller.actor,
        action,
        serde_json::json!({
            "node": caller.name,
            "by": event.by,
            "reason": event.reason,
            "captured": event.captured,
            "inbound": event.inbound,
        }),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

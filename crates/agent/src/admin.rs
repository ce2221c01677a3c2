//! The admin endpoint: `/metrics` (Prometheus text, or OpenMetrics when asked for), `/healthz` (the process serves),
//! `/readyz` (listeners bound, identity loaded, not draining) and `/v1/status` (JSON: identity,
//! listeners, open tunnels with what their handshakes negotiated), which `tapproof status` and the
//! quickstart read, and `/v1/sockets` (the TLS sockets this agent vouches for, which the coverage
//! audit matches socket by socket), `/v1/selftest` (GET the latest self-test round, POST to run
//! one now: `selftest.rs`).

use crate::state::AgentState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Where the agent actually listens (ports given as 0 in config are resolved here).
#[derive(Debug, Clone, Serialize)]
pub struct BoundAddresses {
    pub admin: SocketAddr,
    pub tunnel: Option<SocketAddr>,
    pub outbound: Vec<BoundOutbound>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BoundOutbound {
    pub service: String,
    pub listen: SocketAddr,
}

#[derive(Clone)]
struct AdminState {
    agent: Arc<AgentState>,
    /// Updated by a reload (outbound listeners added or removed).
    bound: Arc<std::sync::RwLock<BoundAddresses>>,
}

pub async fn serve(
    listener: TcpListener,
    agent: Arc<AgentState>,
    bound: Arc<std::sync::RwLock<BoundAddresses>>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route(
            "/v1/sockets",
            get(|| async { Json(crate::vouch::sockets().snapshot()) }),
        )
        .route("/v1/selftest", get(selftest_last).post(selftest_now))
        .with_state(AdminState { agent, bound });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "admin endpoint stopped");
    }
}

/// The latest self-test round (`selftest.rs`), or 404 before the first.
async fn selftest_last(State(s): State<AdminState>) -> axum::response::Response {
    let last = s.agent.selftest.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match last {
        Some(round) => Json(round).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "no self-test round yet; POST /v1/selftest runs one\n",
        )
            .into_response(),
    }
}

/// Runs a self-test round now and answers with it; 409 when this agent has no tunnel listener.
async fn selftest_now(State(s): State<AdminState>) -> axum::response::Response {
    let listen = s.bound.read().unwrap_or_else(|p| p.into_inner()).tunnel;
    match listen {
        Some(listen) => {
            Json(crate::selftest::round(&s.agent, crate::selftest::target(listen)).await).into_response()
        }
        None => (
            StatusCode::CONFLICT,
            "this agent has no tunnel listener to probe (no [[inbound]], not a gateway)\n",
        )
            .into_response(),
    }
}

/// Prometheus text for a plain scrape, OpenMetrics when `Accept` asks for it
/// (`tapproof_metrics::render`).
async fn metrics(State(s): State<AdminState>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    s.agent
        .metrics
        .cert_expiry_seconds
        .set(s.agent.material.current().seconds_to_expiry());
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = s.agent.metrics.render(accept);
    ([(header::CONTENT_TYPE, content_type)], body)
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.agent.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

#[derive(Serialize)]
struct Status {
    id: String,
    trust_domain: String,
    ready: bool,
    certificate: CertificateStatus,
    listeners: BoundAddresses,
    tunnels: Vec<Arc<crate::state::TunnelStats>>,
    handshake_records: HandshakeRecords,
}

/// Handshake records waiting for the control plane, and those lost because too many waited.
#[derive(Serialize)]
struct HandshakeRecords {
    unshipped: usize,
    dropped: u64,
}

#[derive(Serialize)]
struct CertificateStatus {
    serial: String,
    not_before_unix: i64,
    not_after_unix: i64,
    seconds_to_expiry: i64,
    bundle_roots: usize,
    reloads: u64,
}

async fn status(State(s): State<AdminState>) -> impl IntoResponse {
    let material = s.agent.material.current();
    let svid = material.svid();
    Json(Status {
        id: svid.id.to_string(),
        trust_domain: s.agent.config.trust_domain.to_string(),
        ready: s.agent.ready.load(Ordering::Acquire),
        certificate: CertificateStatus {
            serial: svid.serial.clone(),
            not_before_unix: svid.not_before,
            not_after_unix: svid.not_after,
            seconds_to_expiry: material.seconds_to_expiry(),
            bundle_roots: material.root_count(),
            reloads: s.agent.material.generation(),
        },
        listeners: s.bound.read().unwrap_or_else(|p| p.into_inner()).clone(),
        tunnels: s.agent.tunnels(),
        handshake_records: {
            let (unshipped, dropped) = s.agent.handshakes.counts();
            HandshakeRecords { unshipped, dropped }
        },
    })
}

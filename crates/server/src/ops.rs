//! The admin listener of `tapproof server run --admin-listen` (plain HTTP, loopback by default,
//! like the agent's `[admin]`): `/metrics` (Prometheus text, or OpenMetrics when asked),
//! `/healthz` (the process serves) and `/readyz` (the store answers a read and the server is not
//! draining: a load balancer or Kubernetes sends new agents elsewhere otherwise).

use crate::app::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::sync::Arc;
use tokio::net::TcpListener;

pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    stop: tokio_util::sync::CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "control plane: admin listener stopped");
    }
}

async fn metrics(State(s): State<Arc<AppState>>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = s.metrics.render(accept);
    ([(header::CONTENT_TYPE, content_type)], body)
}

async fn readyz(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    if s.draining.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: draining\n".to_owned(),
        );
    }
    match s.metrics.probe(&*s.store).await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

//! The routes of the `/v1` API and the dashboard, each to its handler.

use crate::app::{ApiError, AppState};
use crate::{admin, coverage, dashboard, enrol, events, feed};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;
use tapproof_api::{paths, ErrorCode, MAX_BODY};

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(paths::HEALTHZ, get(|| async { "ok\n" }))
        .route(paths::OPENAPI, get(|| async { Json(crate::openapi::document()) }))
        .route(paths::BUNDLE, get(enrol::bundle))
        .route(paths::SPIFFE_BUNDLE, get(enrol::spiffe_bundle))
        .route(paths::JOIN, post(enrol::join))
        .route(paths::SIGN, post(enrol::sign))
        .route(paths::STATE, get(feed::state_feed))
        .route(paths::NODES, get(admin::nodes))
        .route(
            paths::REGISTRATIONS,
            get(admin::registrations).post(admin::register),
        )
        .route(paths::REVOCATIONS, get(admin::revocations).post(admin::revoke))
        .route(
            paths::REVOCATION_PROPAGATION,
            get(admin::revocation_propagation_view),
        )
        .route(paths::AUDIT_LOG, get(admin::audit_log))
        .route(paths::HANDSHAKES, get(admin::handshakes_view))
        .route(paths::POLICY, get(admin::policy).post(admin::set_policy))
        .route(
            paths::COVERAGE,
            post(coverage::report).layer(DefaultBodyLimit::max(coverage::MAX_COVERAGE_BODY)),
        )
        .route(paths::EVENTS, post(events::record))
        .route(paths::DASHBOARD_DATA, get(dashboard::dashboard_data))
        .route(paths::DASHBOARD, get(dashboard::index))
        .route("/dashboard/", get(dashboard::index))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/style.css", get(dashboard::style))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint; see /v1/openapi.json") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .with_state(state)
}

//! `tapproof server dashboard`: the fleet dashboard for a browser on the admin's own machine. The
//! server serves the dashboard only to admin identities over mTLS; browsers do not hold those, so
//! this command holds the admin identity (from `--admin-dir`) and serves the same pages, unchanged,
//! on loopback (like `kubectl proxy`).

use crate::cli::RemoteArgs;
use crate::run_agent::ConfigProblem;
use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

struct Upstream {
    server: String,
    tls: tapproof_tls::ControlClientTls,
}

/// The paths the proxy forwards, with their content types: nothing else of the API.
const PAGES: &[(&str, &str)] = &[
    ("/dashboard", "text/html; charset=utf-8"),
    ("/dashboard/", "text/html; charset=utf-8"),
    ("/dashboard/app.js", "text/javascript; charset=utf-8"),
    ("/dashboard/style.css", "text/css; charset=utf-8"),
    ("/v1/dashboard", "application/json"),
];

async fn forward(State(up): State<Arc<Upstream>>, uri: Uri) -> Response {
    let path = uri.path();
    let Some((_, content_type)) = PAGES.iter().find(|(p, _)| *p == path) else {
        return (StatusCode::NOT_FOUND, "not part of the dashboard\n").into_response();
    };
    match tapproof_agent::control::request(
        &up.server,
        &up.tls,
        http::Method::GET,
        path,
        None,
        Duration::from_secs(15),
    )
    .await
    {
        Ok((status, body)) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "no-store"),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'",
                ),
            ],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, format!("cannot reach the tapproof server: {e}\n")).into_response(),
    }
}

pub async fn run(remote: RemoteArgs, listen: SocketAddr) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() {
        return Err(ConfigProblem(format!(
            "--listen {listen}: the dashboard proxy acts with your admin identity; bind it to loopback"
        ))
        .into());
    }
    let (server, tls) = crate::server_cmd::admin_client(&remote)?;
    let up = Arc::new(Upstream { server, tls });
    let mut app = Router::new().route("/", get(|| async { Redirect::to("/dashboard") }));
    for (path, _) in PAGES {
        app = app.route(path, get(forward));
    }
    let app = app.with_state(up);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let bound = listener.local_addr()?;
    println!("dashboard: http://{bound}/dashboard");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

//! `tapproof server dashboard`: the fleet dashboard for a browser on the admin's own machine. The
//! server serves the dashboard only to admin identities over mTLS; browsers do not hold those, so
//! this command holds the admin identity (from `--admin-dir`) and serves the same pages, unchanged,
//! on loopback (like `kubectl proxy`). Requests must name the proxy in their Host header, so a page
//! of another site whose name was rebound to 127.0.0.1 cannot read the dashboard through it.

use crate::cli::RemoteArgs;
use crate::exit::ConfigProblem;
use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;

struct Upstream {
    client: tapproof_agent::control::ControlClient,
    /// The Host values a browser uses for this proxy: anything else is a page of another origin
    /// that resolved its name to loopback (DNS rebinding) and must not read the dashboard.
    hosts: Vec<String>,
}

/// The Host header values that name the proxy bound at `bound`.
fn own_hosts(bound: SocketAddr) -> Vec<String> {
    let port = bound.port();
    let mut hosts = vec![bound.to_string(), format!("localhost:{port}")];
    if bound.ip().is_loopback() && bound.is_ipv4() {
        hosts.push(format!("127.0.0.1:{port}"));
    } else {
        hosts.push(format!("[::1]:{port}"));
    }
    hosts
}

/// The paths the proxy forwards, with their content types: nothing else of the API.
const PAGES: &[(&str, &str)] = &[
    ("/dashboard", "text/html; charset=utf-8"),
    ("/dashboard/", "text/html; charset=utf-8"),
    ("/dashboard/app.js", "text/javascript; charset=utf-8"),
    ("/dashboard/style.css", "text/css; charset=utf-8"),
    ("/v1/dashboard", "application/json"),
];

async fn forward(State(up): State<Arc<Upstream>>, headers: axum::http::HeaderMap, uri: Uri) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !up.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {host:?} is not this proxy; open http://{}/dashboard\n",
                up.hosts[0]
            ),
        )
            .into_response();
    }
    let path = uri.path();
    let Some((_, content_type)) = PAGES.iter().find(|(p, _)| *p == path) else {
        return (StatusCode::NOT_FOUND, "not part of the dashboard\n").into_response();
    };
    match up.client.get_raw(path).await {
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
    let (server, tls) = crate::admin_cmd::admin_client(&remote)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let bound = listener.local_addr()?;
    let up = Arc::new(Upstream {
        client: tapproof_agent::control::ControlClient::new(server, tls),
        hosts: own_hosts(bound),
    });
    let mut app = Router::new().route("/", get(|| async { Redirect::to("/dashboard") }));
    for (path, _) in PAGES {
        app = app.route(path, get(forward));
    }
    let app = app.with_state(up);
    println!("dashboard: http://{bound}/dashboard");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_hosts_name_the_bound_port_only() {
        let hosts = super::own_hosts("127.0.0.1:8080".parse().unwrap());
        assert!(hosts.contains(&"127.0.0.1:8080".to_owned()));
        assert!(hosts.contains(&"localhost:8080".to_owned()));
        assert!(!hosts.iter().any(|h| h.contains("evil") || h.ends_with(":80")));
    }
}

//! The plaintext side: each app connection accepted on an outbound listener becomes one HTTP/2
//! CONNECT stream, on the pooled tunnel, to the peer agent that fronts the service.

use crate::config::OutboundConfig;
use crate::copy::{carry, Carried};
use crate::metrics::Side;
use crate::pool::{Pool, Tunnel};
use crate::sites::{Direction, Protocol};
use crate::state::AgentState;
use http::{Method, Request, StatusCode};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Serves one outbound listener until `shutdown` (the agent's, or a reload's that removed it).
/// Each app connection uses the pool's config as it is when the connection arrives.
pub async fn serve(
    listener: TcpListener,
    pool: Arc<Pool>,
    state: Arc<AgentState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let what = || format!("outbound {}", pool.outbound().service);
    while let Some((tcp, app)) = crate::limits::next_connection(&listener, &shutdown, &state, what).await {
        let (pool, state) = (pool.clone(), state.clone());
        let outbound = pool.outbound();
        tracker.spawn(async move { connection(tcp, app, pool, outbound, state, None).await });
    }
}

/// Why an app connection got no stream.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error(transparent)]
    Pool(#[from] crate::pool::PoolError),
    #[error("service name {service:?} is not a valid CONNECT authority: {source}")]
    BadService { service: String, source: http::Error },
    #[error("tunnel unusable twice (last: {0})")]
    TunnelGone(h2::Error),
}

/// Opens a stream, retrying once on a fresh tunnel when the pooled one turns out to be gone
/// (the peer restarted or sent GOAWAY while draining).
async fn open_stream(
    pool: &Pool,
    service: &str,
    source: Option<SocketAddr>,
) -> Result<(Tunnel, h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>), OpenError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let tunnel = pool.tunnel().await?;
        let mut request = Request::builder().method(Method::CONNECT).uri(service);
        if let Some(source) = source {
            request = request.header(crate::gateway::SOURCE_HEADER, source.to_string());
        }
        let request = request.body(()).map_err(|source| OpenError::BadService {
            service: service.to_owned(),
            source,
        })?;
        let ready = tunnel.sender.clone().ready().await;
        match ready.and_then(|mut s| s.send_request(request, false)) {
            Ok((response, send)) => return Ok((tunnel, response, send)),
            Err(e) => {
                tunnel.mark_dead();
                if attempt == 2 {
                    return Err(OpenError::TunnelGone(e));
                }
            }
        }
    }
}

/// Carries one app connection on `pool`'s tunnel. `captured`: the destination the app dialled,
/// for a connection the capture rules redirected (`capture.rs`); such a connection is reset when
/// it gets no stream, so the app sees a refusal at once.
pub(crate) async fn connection(
    tcp: TcpStream,
    app: SocketAddr,
    pool: Arc<Pool>,
    outbound: Arc<OutboundConfig>,
    state: Arc<AgentState>,
    captured: Option<SocketAddr>,
) {
    let destination = captured.map(tracing::field::display);
    let refuse = |tcp: TcpStream| {
        if captured.is_some() {
            crate::capture::reset(tcp);
        }
    };
    // TCP_NODELAY comes from the listener (socket::nodelay_inherited).
    let metrics = &state.metrics;
    let service = outbound.service.as_str();
    let wait = state.config.tunnel.connect_timeout + state.config.tunnel.handshake_timeout;
    let started = std::time::Instant::now();
    // A stream to an address (a remote site's gateway) names the host it is for: the far
    // gateway's site policy may ask by source network (`gateway::admission`).
    let source = (captured.is_some() && service.parse::<SocketAddr>().is_ok()).then_some(app);
    // A route to a remote site is counted per site, and labelled by it: a destination address
    // must not become a metric label.
    let site = outbound.site.as_deref();
    let site_label = site.map(|s| format!("(gateway {s})"));
    let label = site_label.as_deref().unwrap_or(service);
    if let Some(site) = site {
        state.sites.opened(metrics, site, Direction::To, Protocol::Tcp);
    }
    let (tunnel, response, send) = match timeout(wait, open_stream(&pool, service, source)).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            metrics.stream_failed(Side::Outbound, "no_tunnel");
            if let Some(site) = site {
                state.sites.refused(metrics, site, Direction::To);
            }
            warn!(%app, service, destination, error = %e, "outbound: app connection closed, no tunnel");
            refuse(tcp);
            return;
        }
        Err(_) => {
            metrics.stream_failed(Side::Outbound, "timeout");
            warn!(%app, service, destination, "outbound: app connection closed, no tunnel in time");
            refuse(tcp);
            return;
        }
    };
    // The app's first bytes go out with the CONNECT, not after the peer's answer: the peer agent
    // proved its identity in the handshake and forwards nothing before its own policy check, so
    // waiting would only add a round trip to every app connection.
    let peer_id = tunnel.stats.peer_id.clone();
    let ledger = &state.sites;
    let answered = async move {
        let response = match timeout(wait, response).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                metrics.stream_failed(Side::Outbound, "stream_error");
                warn!(%app, service, error = %e, "outbound: stream failed before an answer");
                return Err(io::Error::other(e));
            }
            Err(_) => {
                metrics.stream_failed(Side::Outbound, "timeout");
                warn!(%app, service, "outbound: peer did not answer the stream in time");
                return Err(io::ErrorKind::TimedOut.into());
            }
        };
        if response.status() != StatusCode::OK {
            let reason = match response.status() {
                StatusCode::FORBIDDEN => "denied_by_peer",
                StatusCode::NOT_FOUND => "unknown_service_at_peer",
                _ => "refused_by_peer",
            };
            metrics.stream_failed(Side::Outbound, reason);
            if let Some(site) = site {
                ledger.refused(metrics, site, Direction::To);
            }
            warn!(%app, service, status = %response.status(), peer_id = %peer_id, "outbound: peer refused the stream");
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "peer refused the stream",
            ));
        }
        metrics
            .stream_open_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(response.into_body())
    };
    let carried = Carried::default();
    let result = carry(
        tcp,
        send,
        answered,
        Side::Outbound,
        label,
        metrics,
        &tunnel.stats,
        &carried,
    )
    .await;
    if let Some(site) = site {
        let (sent, received) = carried.totals();
        state.sites.ended(metrics, site, Direction::To, sent, received);
    }
    if let Err(e) = result {
        debug!(%app, service, error = %e, "outbound: stream ended with error");
    }
}

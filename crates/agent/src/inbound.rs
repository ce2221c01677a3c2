//! The tunnel listener: terminates mTLS from peer agents, then serves HTTP/2 CONNECT streams,
//! each checked against the named service's allow list and joined to its local `forward`
//! address. Everything a peer can get wrong ends in a refusal, a log line and a counter; the
//! listener keeps serving everyone else.

use crate::copy::carry;
use crate::metrics::{DenialLabels, Side};
use crate::policy::allowed;
use crate::sites::{Direction, Protocol};
use crate::state::{AgentState, TunnelStats};
use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use tapproof_identity::SpiffeId;
use tapproof_tls::{accept, failure_reason, server_session, Rekeying};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub async fn serve(
    listener: TcpListener,
    state: Arc<AgentState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    while let Some((tcp, peer)) =
        crate::limits::next_connection(&listener, &shutdown, &state, || "tunnel".into()).await
    {
        let state = state.clone();
        let shutdown = shutdown.clone();
        let streams = tracker.clone();
        tracker.spawn(async move { connection(tcp, peer, state, shutdown, streams).await });
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<AgentState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let metrics = &state.metrics;
    // Before any handshake work: in progress in total and from this source, and the fd budget.
    let handshaking = match state.limits.handshake(peer.ip()) {
        Ok(place) => place,
        Err(limit) => {
            metrics.limit_refused(limit);
            debug!(%peer, limit = limit.as_str(), "tunnel: connection refused by a limit");
            if let Some(more) = state.refused_log.tick() {
                warn!(%peer, limit = limit.as_str(), suppressed = more, "tunnel: connection refused by a limit (one line per 10 s)");
            }
            return;
        }
    };
    crate::socket::tune_tunnel(&tcp, state.config.tunnel.receive_buffer);
    // Only TLS is read or written on this socket, from the first byte: the audit may count it.
    let vouched = crate::vouch::sockets().register(&tcp, tapproof_audit::VouchedKind::TunnelIn);
    let tls = match state.server_tls() {
        Ok(tls) => tls,
        Err(e) => {
            warn!(%peer, error = %e, "tunnel: no usable TLS configuration");
            return;
        }
    };
    let tunnel_cfg = &state.config.tunnel;
    let local = tcp.local_addr().ok();
    let started = std::time::Instant::now();
    let stream = match timeout(
        tunnel_cfg.handshake_timeout,
        accept(&tls, crate::socket::buffered(tcp)),
    )
    .await
    {
        Err(_) => {
            state.handshake_refused(Side::Inbound, local, peer, "timeout", None);
            refused(&state, peer, "timeout", None);
            return;
        }
        Ok(Err(e)) => {
            let reason = failure_reason(&e);
            state.handshake_refused(Side::Inbound, local, peer, reason, None);
            refused(&state, peer, reason, Some(&e));
            return;
        }
        Ok(Ok(s)) => s,
    };
    let session = server_session(&stream);
    let Some(peer_id) = session.peer_id.clone() else {
        // Our verifier only accepts SVIDs, so this means a bug, not a hostile peer.
        state.handshake_refused(Side::Inbound, local, peer, "not_svid", Some(&session));
        warn!(%peer, "tunnel: peer certificate carried no SPIFFE ID");
        return;
    };
    if state.is_revoked(&session) {
        state.handshake_refused(Side::Inbound, local, peer, "revoked", Some(&session));
        warn!(%peer, peer_id = %peer_id, reason = "revoked", "tunnel: handshake refused");
        return;
    }
    let _tunnel_place = match state.limits.tunnel(&peer_id.to_string()) {
        Ok(place) => place,
        Err(limit) => {
            metrics.limit_refused(limit);
            warn!(%peer, peer_id = %peer_id, limit = limit.as_str(), "tunnel: refused, this peer holds its limit of tunnels");
            return;
        }
    };
    state.handshake_succeeded(Side::Inbound, local, peer, &session, started.elapsed());
    if let Some(v) = &vouched {
        v.describe(&session, None);
    }
    info!(%peer, peer_id = %peer_id, version = %session.version, cipher = %session.cipher,
          group = %session.group, resumed = session.resumed, "tunnel: accepted");

    // The handshake's place (and its fd from the budget) goes back: the tunnel is established.
    drop(handshaking);
    let stream = Rekeying::new(
        stream,
        tunnel_cfg.key_schedule(),
        metrics.key_update_counter(Side::Inbound),
    );
    serve_tunnel(stream, peer, peer_id, &session, &state, &shutdown, &tracker).await;
}

/// The tunnel after TLS: HTTP/2, one task per CONNECT stream, until the peer goes, the agent
/// drains, or a revocation closes it. Generic over the stream so the fuzz target
/// (`fuzz/fuzz_targets/tunnel.rs`) can drive it with bytes from memory.
pub(crate) async fn serve_tunnel<IO>(
    stream: IO,
    peer: SocketAddr,
    peer_id: SpiffeId,
    session: &tapproof_tls::SessionInfo,
    state: &Arc<AgentState>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let metrics = &state.metrics;
    let tunnel_cfg = &state.config.tunnel;
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(tunnel_cfg.stream_window)
        .initial_connection_window_size(tunnel_cfg.connection_window)
        .max_frame_size(tunnel_cfg.max_frame_size)
        .max_concurrent_streams(tunnel_cfg.max_concurrent_streams)
        .max_header_list_size(tunnel_cfg.max_header_list_size)
        .max_pending_accept_reset_streams(tunnel_cfg.max_pending_accept_resets)
        .max_send_buffer_size(4 * tunnel_cfg.max_frame_size as usize)
        // Extended CONNECT (RFC 8441) for CONNECT-UDP streams (`udp.rs`).
        .enable_connect_protocol();
    let mut conn = match timeout(
        tunnel_cfg.handshake_timeout,
        builder.handshake::<_, Bytes>(stream),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            metrics
                .tunnel_errors
                .get_or_create(&crate::metrics::FailureLabels {
                    side: Side::Inbound,
                    reason: "not_http2",
                })
                .inc();
            warn!(%peer, peer_id = %peer_id, error = %e, "tunnel: closed, peer did not speak HTTP/2");
            return;
        }
        Err(_) => {
            metrics
                .tunnel_errors
                .get_or_create(&crate::metrics::FailureLabels {
                    side: Side::Inbound,
                    reason: "timeout",
                })
                .inc();
            warn!(%peer, peer_id = %peer_id, "tunnel: closed, no HTTP/2 preface in time");
            return;
        }
    };
    let guard = state.open_tunnel(Side::Inbound, peer, session);
    let mut draining = false;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                // GOAWAY: the peer opens no new streams here; open ones finish.
                conn.graceful_shutdown();
                continue;
            }
            _ = guard.stats.close.cancelled() => {
                metrics.tunnel_errors.get_or_create(&crate::metrics::FailureLabels { side: Side::Inbound, reason: "revoked" }).inc();
                break;
            }
            next = conn.accept() => next,
        };
        match next {
            None => break,
            Some(Err(e)) => {
                if !e.is_go_away() && !e.is_io() {
                    metrics
                        .tunnel_errors
                        .get_or_create(&crate::metrics::FailureLabels {
                            side: Side::Inbound,
                            reason: "protocol",
                        })
                        .inc();
                }
                warn!(%peer, peer_id = %peer_id, error = %e, "tunnel: closed with error");
                break;
            }
            Some(Ok((request, respond))) => {
                let state = state.clone();
                let peer_id = peer_id.clone();
                let stats = guard.stats.clone();
                tracker.spawn(async move { serve_stream(request, respond, peer_id, state, stats).await });
            }
        }
    }
    debug!(%peer, peer_id = %peer_id, "tunnel: closed");
}

/// A refused handshake: anyone can cause one, so one WARN line per 10 s at most (the rest at
/// debug; the counter has them all).
fn refused(state: &AgentState, peer: SocketAddr, reason: &'static str, error: Option<&std::io::Error>) {
    debug!(%peer, reason, error = %error.map_or_else(String::new, tapproof_tls::failure_text), "tunnel: handshake refused");
    if let Some(more) = state.refused_log.tick() {
        warn!(%peer, reason, error = %error.map_or_else(String::new, tapproof_tls::failure_text), suppressed = more, "tunnel: handshake refused (one line per 10 s; the rest at debug)");
    }
}

fn refuse(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder()
        .status(status)
        .body(())
        .expect("static response is valid");
    let _ = respond.send_response(response, true);
}

async fn serve_stream(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer_id: SpiffeId,
    state: Arc<AgentState>,
    tunnel: Arc<TunnelStats>,
) {
    let metrics = &state.metrics;
    if request.method() != Method::CONNECT {
        metrics.stream_failed(Side::Inbound, "not_connect");
        warn!(peer_id = %peer_id, method = %request.method(), "stream refused: only CONNECT is served");
        return refuse(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
    }
    // Extended CONNECT: only CONNECT-UDP, which only a gateway serves (`udp.rs`).
    if let Some(protocol) = request.extensions().get::<h2::ext::Protocol>() {
        if protocol.as_str() != crate::udp::PROTOCOL {
            metrics.stream_failed(Side::Inbound, "unknown_protocol");
            warn!(peer_id = %peer_id, protocol = protocol.as_str(), "stream refused: the only extended CONNECT protocol served is connect-udp");
            return refuse(&mut respond, StatusCode::NOT_IMPLEMENTED);
        }
        return crate::udp::serve_stream(request, respond, peer_id, state, tunnel).await;
    }
    let service = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let applied = state.applied();
    // An authority that is an address, not a service name: a remote site's gateway asks this
    // gateway for a host of its local networks (`gateway.rs`).
    if let Ok(destination) = service.parse::<SocketAddr>() {
        return serve_gateway_stream(request, respond, peer_id, destination, &applied, state, tunnel).await;
    }
    let services = &applied.inbound;
    let known = services.iter().any(|i| i.service == service);
    let deny = |reason: &'static str| {
        let label = if known {
            service.clone()
        } else {
            crate::metrics::UNKNOWN_SERVICE.to_owned()
        };
        metrics
            .policy_denials
            .get_or_create(&DenialLabels {
                service: label,
                reason,
            })
            .inc();
        state.record_denial(&peer_id, &service, reason);
    };
    let Some(inbound) = services.iter().find(|i| i.service == service) else {
        deny("unknown_service");
        warn!(peer_id = %peer_id, service = %service, "stream refused: no such service here");
        return refuse(&mut respond, StatusCode::NOT_FOUND);
    };
    if !allowed(&inbound.allow, &peer_id) && !state.policy_allows(&service, &peer_id) {
        deny("not_allowed");
        warn!(peer_id = %peer_id, service = %service, "stream refused: policy does not allow this peer");
        return refuse(&mut respond, StatusCode::FORBIDDEN);
    }
    // This peer's streams, this service's connects in progress, and an fd from the budget.
    let (_stream_place, connecting) = match state.limits.stream(&peer_id.to_string(), &service) {
        Ok(places) => places,
        Err(limit) => {
            metrics.limit_refused(limit);
            metrics.stream_failed(Side::Inbound, "limit");
            debug!(peer_id = %peer_id, service = %service, limit = limit.as_str(), "stream refused by a limit");
            return refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    join(
        Stream {
            request,
            respond,
            peer_id: &peer_id,
            label: &service,
            what: &service,
            state: &state,
            tunnel: &tunnel,
        },
        &inbound.forward,
        connecting,
    )
    .await;
}

/// A stream admitted to be joined to a plaintext address.
struct Stream<'a> {
    request: Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
    peer_id: &'a SpiffeId,
    /// The service metric label.
    label: &'a str,
    /// The name in log lines.
    what: &'a str,
    state: &'a Arc<AgentState>,
    tunnel: &'a Arc<TunnelStats>,
}

/// A stream from a remote site's gateway to `destination` on a local network: admitted only as
/// `gateway::decide` says, then joined like a service's forward (metrics under the label
/// `(gateway)`, so addresses do not become metric labels).
async fn serve_gateway_stream(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer_id: SpiffeId,
    destination: SocketAddr,
    applied: &crate::config::AgentConfig,
    state: Arc<AgentState>,
    tunnel: Arc<TunnelStats>,
) {
    let metrics = &state.metrics;
    let label = crate::metrics::GATEWAY_SERVICE;
    let flow = crate::gateway::Flow {
        destination,
        named_source: crate::gateway::named_source(&request),
        tunnel_peer: tapproof_audit::canonical(tunnel.peer_addr).ip(),
    };
    let Ok(site) = crate::gateway::decide(&state, applied, &peer_id, flow, Protocol::Tcp) else {
        return refuse(&mut respond, StatusCode::FORBIDDEN);
    };
    let (_stream_place, connecting) = match state.limits.stream(&peer_id.to_string(), label) {
        Ok(places) => places,
        Err(limit) => {
            metrics.limit_refused(limit);
            metrics.stream_failed(Side::Inbound, "limit");
            debug!(peer_id = %peer_id, %destination, limit = limit.as_str(), "gateway stream refused by a limit");
            return refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let endpoint = crate::endpoint::Endpoint::Addr(destination);
    let what = destination.to_string();
    let stream = Stream {
        request,
        respond,
        peer_id: &peer_id,
        label,
        what: &what,
        state: &state,
        tunnel: &tunnel,
    };
    state.sites.opened(metrics, site, Direction::From, Protocol::Tcp);
    let (sent, received) = join(stream, &endpoint, connecting).await;
    state.sites.ended(metrics, site, Direction::From, sent, received);
}

/// Connects `forward` (within the connect timeout, with the agent's mark; `connecting`, the
/// connects-in-progress place, is given back once the connect ends), answers 200, and splices the
/// stream to it; refusals answer 502/504. Returns the payload bytes carried into the tunnel and
/// out of it.
async fn join<C>(stream: Stream<'_>, forward: &crate::endpoint::Endpoint, connecting: C) -> (u64, u64) {
    let Stream {
        request,
        mut respond,
        peer_id,
        label,
        what: service,
        state,
        tunnel,
    } = stream;
    let metrics = &state.metrics;
    let app = match timeout(
        state.config.tunnel.connect_timeout,
        state.forwards.connect(forward, state.capture_mark()),
    )
    .await
    {
        Ok(Ok(tcp)) => {
            drop(connecting);
            tcp
        }
        Ok(Err(e)) => {
            metrics.stream_failed(Side::Inbound, "forward_unreachable");
            warn!(peer_id = %peer_id, service = %service, forward = %forward, error = %e, "stream refused: cannot reach forward address");
            refuse(&mut respond, StatusCode::BAD_GATEWAY);
            return (0, 0);
        }
        Err(_) => {
            metrics.stream_failed(Side::Inbound, "forward_timeout");
            warn!(peer_id = %peer_id, service = %service, forward = %forward, "stream refused: forward address did not answer in time");
            refuse(&mut respond, StatusCode::GATEWAY_TIMEOUT);
            return (0, 0);
        }
    };
    let _ = app.set_nodelay(true);
    let ok = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("static response is valid");
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            debug!(peer_id = %peer_id, error = %e, "stream ended before it was answered");
            return (0, 0);
        }
    };
    let carried = crate::copy::Carried::default();
    let result = carry(
        app,
        send,
        std::future::ready(Ok(request.into_body())),
        Side::Inbound,
        label,
        metrics,
        tunnel,
        &carried,
    )
    .await;
    if let Err(e) = result {
        debug!(peer_id = %peer_id, service = %service, error = %e, "stream ended with error");
    }
    carried.totals()
}

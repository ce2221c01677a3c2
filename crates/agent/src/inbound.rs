//! The tunnel listener: terminates mTLS from peer agents, then serves HTTP/2 CONNECT streams,
//! each checked against the named service's allow list and joined to its local `forward`
//! address. Everything a peer can get wrong ends in a refusal, a log line and a counter; the
//! listener keeps serving everyone else.

use crate::copy::carry;
use crate::metrics::{DenialLabels, Side, SideLabel};
use crate::policy::allowed;
use crate::state::{AgentState, TunnelStats};
use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use tapproof_identity::SpiffeId;
use tapproof_tls::{accept, failure_reason, server_session};
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
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(error = %e, "tunnel listener: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
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
    crate::socket::tune_tunnel(&tcp);
    // Only TLS is read or written on this socket, from the first byte: the audit may count it.
    let _vouched = crate::vouch::sockets().register(&tcp, tapproof_audit::VouchedKind::TunnelIn);
    let metrics = &state.metrics;
    let tls = match state.server_tls() {
        Ok(tls) => tls,
        Err(e) => {
            warn!(%peer, error = %e, "tunnel: no usable TLS configuration");
            return;
        }
    };
    let tunnel_cfg = &state.config.tunnel;
    let stream = match timeout(
        tunnel_cfg.handshake_timeout,
        accept(&tls, crate::socket::buffered(tcp)),
    )
    .await
    {
        Err(_) => {
            metrics.handshake_failed(Side::Inbound, "timeout");
            warn!(%peer, reason = "timeout", "tunnel: handshake refused");
            return;
        }
        Ok(Err(e)) => {
            let reason = failure_reason(&e);
            metrics.handshake_failed(Side::Inbound, reason);
            warn!(%peer, reason, error = %e, "tunnel: handshake refused");
            return;
        }
        Ok(Ok(s)) => s,
    };
    let session = server_session(&stream);
    let Some(peer_id) = session.peer_id.clone() else {
        // Our verifier only accepts SVIDs, so this means a bug, not a hostile peer.
        metrics.handshake_failed(Side::Inbound, "not_svid");
        warn!(%peer, "tunnel: peer certificate carried no SPIFFE ID");
        return;
    };
    if state.is_revoked(&session) {
        metrics.handshake_failed(Side::Inbound, "revoked");
        warn!(%peer, peer_id = %peer_id, reason = "revoked", "tunnel: handshake refused");
        return;
    }
    metrics
        .handshakes
        .get_or_create(&SideLabel { side: Side::Inbound })
        .inc();
    info!(%peer, peer_id = %peer_id, version = %session.version, cipher = %session.cipher,
          group = %session.group, resumed = session.resumed, "tunnel: accepted");

    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(tunnel_cfg.stream_window)
        .initial_connection_window_size(tunnel_cfg.connection_window)
        .max_frame_size(tunnel_cfg.max_frame_size)
        .max_concurrent_streams(tunnel_cfg.max_concurrent_streams)
        .max_send_buffer_size(4 * tunnel_cfg.max_frame_size as usize);
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
    let guard = state.open_tunnel(Side::Inbound, peer, &session);
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
    let service = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let deny = |reason: &'static str| {
        metrics
            .policy_denials
            .get_or_create(&DenialLabels {
                service: service.clone(),
                reason,
            })
            .inc();
        state.record_denial(&peer_id, &service, reason);
    };
    let Some(inbound) = state.config.inbound.iter().find(|i| i.service == service) else {
        deny("unknown_service");
        warn!(peer_id = %peer_id, service = %service, "stream refused: no such service here");
        return refuse(&mut respond, StatusCode::NOT_FOUND);
    };
    if !allowed(&inbound.allow, &peer_id) && !state.policy_allows(&service, &peer_id) {
        deny("not_allowed");
        warn!(peer_id = %peer_id, service = %service, "stream refused: policy does not allow this peer");
        return refuse(&mut respond, StatusCode::FORBIDDEN);
    }
    let app = match timeout(
        state.config.tunnel.connect_timeout,
        TcpStream::connect(inbound.forward),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            metrics.stream_failed(Side::Inbound, "forward_unreachable");
            warn!(peer_id = %peer_id, service = %service, forward = %inbound.forward, error = %e, "stream refused: cannot reach forward address");
            return refuse(&mut respond, StatusCode::BAD_GATEWAY);
        }
        Err(_) => {
            metrics.stream_failed(Side::Inbound, "forward_timeout");
            warn!(peer_id = %peer_id, service = %service, forward = %inbound.forward, "stream refused: forward address did not answer in time");
            return refuse(&mut respond, StatusCode::GATEWAY_TIMEOUT);
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
            return;
        }
    };
    let result = carry(
        app,
        send,
        std::future::ready(Ok(request.into_body())),
        Side::Inbound,
        &service,
        metrics,
        &tunnel,
    )
    .await;
    if let Err(e) = result {
        debug!(peer_id = %peer_id, service = %service, error = %e, "stream ended with error");
    }
}

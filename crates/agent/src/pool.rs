//! One long-lived TLS connection per outbound, shared by all its app connections as HTTP/2
//! streams: one handshake, not one per app connection. When the connection dies the next app
//! connection dials again, trying each peer in turn; after every peer failed, new attempts wait
//! out an exponential backoff so a dead peer is not hammered.

use crate::config::OutboundConfig;
use crate::metrics::Side;
use crate::state::{AgentState, TunnelStats};
use bytes::Bytes;
use h2::client::SendRequest;
use rand::Rng;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tapproof_identity::SpiffeId;
use tapproof_tls::{client_session, connect, failure_reason, ClientTls, Rekeying};
use tokio::sync::Mutex;
use tokio::time::{timeout, Instant};
use tracing::{info, warn};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no peer of service {service} could be reached (last error: {last})")]
    AllPeersFailed { service: String, last: DialError },
    #[error("no node fronts service {service} in the control plane's directory (yet); check its registration and that its agent announced a tunnel address")]
    NoPeer { service: String },
    #[error("cannot build TLS configuration: {0}")]
    Tls(String),
}

/// Why one peer could not be dialled.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("cannot resolve {name}: {error}")]
    Resolve { name: String, error: std::io::Error },
    #[error("connect: timed out")]
    ConnectTimeout,
    #[error("TLS handshake failed ({reason}): {}", tapproof_tls::failure_text(source))]
    Handshake {
        reason: &'static str,
        source: std::io::Error,
    },
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("the peer's identity is revoked")]
    Revoked,
    #[error("HTTP/2 handshake failed: {0}")]
    Http2(h2::Error),
    #[error("HTTP/2 handshake timed out")]
    Http2Timeout,
}

#[derive(Clone)]
pub struct Tunnel {
    pub sender: SendRequest<Bytes>,
    pub stats: Arc<TunnelStats>,
    alive: Arc<AtomicBool>,
    /// Retired because the peer stopped answering PINGs: the next dial starts with another peer.
    unanswered: Arc<AtomicBool>,
    /// When the first of the two certificates this tunnel was authenticated with expires (Unix
    /// seconds). No new streams go on it after that: the next app connection dials afresh, with
    /// the rotated certificates, while open streams finish on the old connection.
    expires_at: i64,
    /// `true` once the answer to the first PING came, so the peer's SETTINGS (sent before it)
    /// have been read.
    settled: tokio::sync::watch::Receiver<bool>,
}

impl Tunnel {
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && tapproof_identity::when::now() < self.expires_at
    }

    pub fn mark_dead(&self) {
        self.alive.store(false, Ordering::Release);
    }

    /// Waits until the peer's first SETTINGS have been read: what the peer offers (extended
    /// CONNECT, for UDP) is known only then. Returns at once after that, or when the tunnel ends.
    pub async fn settled(&self) {
        let _ = self.settled.clone().wait_for(|s| *s).await;
    }
}

struct Inner {
    next_peer: usize,
    failures: u32,
    retry_at: Option<Instant>,
    /// TLS configs by the identity the peer must prove, with the material generation they used.
    tls: std::collections::HashMap<SpiffeId, (u64, ClientTls)>,
}

pub struct Pool {
    /// Replaced by a reload (`update`); read once per use.
    outbound: std::sync::RwLock<Arc<OutboundConfig>>,
    state: Arc<AgentState>,
    /// The live tunnel, read by every app connection without waiting on `inner` (which is held
    /// across a dial). A std mutex: held only to clone or replace it, never across an await.
    current: std::sync::Mutex<Option<Tunnel>>,
    inner: Mutex<Inner>,
}

impl Pool {
    pub fn new(outbound: OutboundConfig, state: Arc<AgentState>) -> Self {
        Self {
            outbound: std::sync::RwLock::new(Arc::new(outbound)),
            state,
            current: std::sync::Mutex::new(None),
            inner: Mutex::new(Inner {
                next_peer: 0,
                failures: 0,
                retry_at: None,
                tls: Default::default(),
            }),
        }
    }

    /// The outbound's config in force.
    pub fn outbound(&self) -> Arc<OutboundConfig> {
        self.outbound.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A reload changed this outbound: new streams use `new`. When its peers or expected
    /// identity changed, the pooled tunnel takes no new streams (the next one dials the new
    /// peers); streams open on it finish there.
    pub fn update(&self, new: OutboundConfig) {
        let old = self.outbound();
        let retarget = old.peers != new.peers || old.server_id != new.server_id || old.service != new.service;
        *self.outbound.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        if retarget {
            self.current.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }

    /// A live tunnel, dialling one if needed. Callers serialise on the lock, so a burst of app
    /// connections leads to one handshake.
    pub async fn tunnel(&self) -> Result<Tunnel, PoolError> {
        if let Some(t) = self.live() {
            return Ok(t);
        }
        let mut inner = self.inner.lock().await;
        // Another app connection may have dialled while this one waited for the lock.
        if let Some(t) = self.live() {
            return Ok(t);
        }
        if let Some(at) = inner.retry_at {
            tokio::time::sleep_until(at).await;
        }
        let peers = self.targets();
        if peers.is_empty() {
            return Err(PoolError::NoPeer {
                service: self.outbound().service.clone(),
            });
        }
        let peers_count = peers.len();
        let gone_silent = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| t.unanswered.load(Ordering::Acquire));
        if gone_silent {
            // That peer's host or link is likely down: a connect to it would only time out.
            inner.next_peer = (inner.next_peer + 1) % peers_count;
            self.current.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        let generation = self.state.material.generation();
        let mut last = DialError::ConnectTimeout;
        for i in 0..peers.len() {
            let index = (inner.next_peer + i) % peers.len();
            let (endpoint, id) = &peers[index];
            let tls = match inner.tls.get(id) {
                Some((g, tls)) if *g == generation => tls.clone(),
                _ => {
                    let (g, tls) = self
                        .state
                        .client_tls(id)
                        .map_err(|e| PoolError::Tls(e.to_string()))?;
                    inner.tls.insert(id.clone(), (g, tls.clone()));
                    tls
                }
            };
            // A name is resolved at every dial: a reconnect follows a changed record.
            let addrs = match endpoint.resolve().await {
                Ok(addrs) => addrs,
                Err(error) => {
                    let e = DialError::Resolve {
                        name: endpoint.to_string(),
                        error,
                    };
                    warn!(service = %self.outbound().service, peer = %endpoint, expected = %id, error = %e, "outbound: peer unreachable");
                    last = e;
                    continue;
                }
            };
            for addr in addrs {
                match self.dial(addr, &tls).await {
                    Ok(t) => {
                        inner.next_peer = index;
                        inner.failures = 0;
                        inner.retry_at = None;
                        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(t.clone());
                        return Ok(t);
                    }
                    Err(e) => {
                        warn!(service = %self.outbound().service, peer = %endpoint, address = %addr, expected = %id, error = %e, "outbound: peer unreachable");
                        last = e;
                    }
                }
            }
        }
        inner.failures = inner.failures.saturating_add(1);
        let backoff = BACKOFF_START
            .saturating_mul(1 << inner.failures.min(10))
            .min(BACKOFF_MAX);
        let jitter = rand::rng().random_range(0.5..1.0);
        inner.retry_at = Some(Instant::now() + backoff.mul_f64(jitter));
        Err(PoolError::AllPeersFailed {
            service: self.outbound().service.clone(),
            last,
        })
    }

    fn live(&self) -> Option<Tunnel> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().filter(|t| t.is_alive()).cloned()
    }

    /// Where to dial and whom to expect there: the configured peers, or the directory's nodes
    /// fronting the service.
    fn targets(&self) -> Vec<(crate::endpoint::Endpoint, SpiffeId)> {
        let outbound = self.outbound();
        match &outbound.server_id {
            Some(id) => outbound.peers.iter().map(|p| (p.clone(), id.clone())).collect(),
            None => self
                .state
                .directory_for(&outbound.service)
                .into_iter()
                .map(|(addr, id)| (addr.into(), id))
                .collect(),
        }
    }

    async fn dial(&self, peer: SocketAddr, tls: &ClientTls) -> Result<Tunnel, DialError> {
        let cfg = &self.state.config.tunnel;
        let metrics = &self.state.metrics;
        let dial = crate::socket::connect(peer, self.state.capture_mark());
        let tcp = match timeout(cfg.connect_timeout, dial).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(DialError::Connect(e)),
            Err(_) => return Err(DialError::ConnectTimeout),
        };
        crate::socket::tune_tunnel(&tcp, cfg.receive_buffer);
        let vouched = crate::vouch::sockets().register(&tcp, tapproof_audit::VouchedKind::TunnelOut);
        let local = tcp.local_addr().ok();
        let started = std::time::Instant::now();
        let stream = match timeout(
            cfg.handshake_timeout,
            connect(tls, crate::socket::buffered(tcp), peer),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = failure_reason(&e);
                self.state
                    .handshake_refused(Side::Outbound, local, peer, reason, None);
                return Err(DialError::Handshake { reason, source: e });
            }
            Err(_) => {
                self.state
                    .handshake_refused(Side::Outbound, local, peer, "timeout", None);
                return Err(DialError::HandshakeTimeout);
            }
        };
        let session = client_session(&stream);
        if self.state.is_revoked(&session) {
            self.state
                .handshake_refused(Side::Outbound, local, peer, "revoked", Some(&session));
            return Err(DialError::Revoked);
        }
        self.state
            .handshake_succeeded(Side::Outbound, local, peer, &session, started.elapsed());
        if let Some(v) = &vouched {
            v.describe(&session, Some(&self.outbound().service));
        }
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(cfg.stream_window)
            .initial_connection_window_size(cfg.connection_window)
            .max_frame_size(cfg.max_frame_size)
            .max_send_buffer_size(4 * cfg.max_frame_size as usize)
            .max_header_list_size(cfg.max_header_list_size)
            .enable_push(false);
        let stream = Rekeying::new(
            stream,
            cfg.key_schedule(),
            metrics.key_update_counter(Side::Outbound),
        );
        let (sender, mut connection) =
            match timeout(cfg.handshake_timeout, builder.handshake::<_, Bytes>(stream)).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => return Err(DialError::Http2(e)),
                Err(_) => return Err(DialError::Http2Timeout),
            };
        info!(service = %self.outbound().service, %peer, peer_id = %session.peer_id.as_ref().map_or_else(String::new, ToString::to_string),
              version = %session.version, cipher = %session.cipher, group = %session.group,
              resumed = session.resumed, "outbound: tunnel established");
        let guard = self.state.open_tunnel(Side::Outbound, peer, &session);
        let alive = Arc::new(AtomicBool::new(true));
        let ours = self.state.material.current().svid().not_after;
        let expires_at = session.peer_not_after.map_or(ours, |theirs| theirs.min(ours));
        let unanswered = Arc::new(AtomicBool::new(false));
        let (settle, settled) = tokio::sync::watch::channel(false);
        let tunnel = Tunnel {
            sender,
            stats: guard.stats.clone(),
            alive: alive.clone(),
            unanswered: unanswered.clone(),
            expires_at,
            settled,
        };
        let service = self.outbound().service.clone();
        let close = tunnel.stats.close.clone();
        let pings = connection.ping_pong();
        let (interval, wait) = (cfg.ping_interval, cfg.ping_timeout);
        let state = self.state.clone();
        tokio::spawn(async move {
            let liveness = liveness(pings, interval, wait, settle);
            tokio::pin!(connection, liveness);
            let mut pinging = true;
            let result = loop {
                tokio::select! {
                    r = &mut connection => break r,
                    // Revoked peer: drop the connection (and every stream on it) at once.
                    _ = close.cancelled() => break Ok(()),
                    // A peer that stopped answering (host gone, link cut): no FIN or RST will
                    // come for up to TCP_USER_TIMEOUT. New streams go to a peer that answers
                    // (the next dial starts with another); open ones stay here, and go on if the
                    // link comes back.
                    () = &mut liveness, if pinging => {
                        pinging = false;
                        unanswered.store(true, Ordering::Release);
                        alive.store(false, Ordering::Release);
                        state.metrics.tunnel_errors.get_or_create(&crate::metrics::FailureLabels { side: Side::Outbound, reason: "ping_timeout" }).inc();
                        warn!(service = %service, %peer, timeout = ?wait, "outbound: peer did not answer a PING in time; new streams go to another tunnel, open ones stay on this one");
                    }
                }
            };
            alive.store(false, Ordering::Release);
            drop(guard);
            drop(vouched);
            match result {
                Ok(()) => info!(service = %service, %peer, "outbound: tunnel closed"),
                Err(e) => warn!(service = %service, %peer, error = %e, "outbound: tunnel closed with error"),
            }
        });
        Ok(tunnel)
    }
}

/// Returns once the peer leaves a PING unanswered for `wait`; one PING at once (its answer
/// marks `settle`: the peer's SETTINGS came before it), then one every `interval`. Never
/// returns when the connection gave no ping handle (it always does once).
async fn liveness(
    pings: Option<h2::PingPong>,
    interval: Duration,
    wait: Duration,
    settle: tokio::sync::watch::Sender<bool>,
) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(interval).await;
        }
        match timeout(wait, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {
                if std::mem::take(&mut first) {
                    settle.send_replace(true);
                }
            }
            // The connection ended: its own branch reports why.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

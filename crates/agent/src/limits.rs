//! What one peer, one source or one service may cost this agent, so a misbehaving one costs only
//! itself. Before a handshake: connections in progress in total and per source address. After it:
//! tunnels and open streams per peer identity, and connects to a service's `forward` address in
//! progress. Sockets that are not yet trusted (handshakes) and backend connections also draw on
//! one fd budget: the process's open-file limit less a reserve, so established tunnels, the admin
//! port and the control plane always get a descriptor. Each refusal is counted in
//! `tapproof_limit_refusals_total{limit}`; the per-stream h2 limits are set in `inbound.rs`.

use crate::config::TunnelConfig;
use std::net::IpAddr;
use std::sync::Arc;
use tapproof_tls::admission::{Admission, Admitted};

/// Descriptors kept out of the budget for tunnels, listeners, the admin port and the control
/// plane.
pub const FD_RESERVE: usize = 128;

/// The limit that refused something (the `limit` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    HandshakesInProgress,
    HandshakesPerSource,
    TunnelsPerPeer,
    StreamsPerPeer,
    ConnectsPerService,
    FdBudget,
    /// accept() failed (EMFILE, ENFILE, ENOBUFS): the listener backs off.
    AcceptFailed,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HandshakesInProgress => "handshakes_in_progress",
            Self::HandshakesPerSource => "handshakes_per_source",
            Self::TunnelsPerPeer => "tunnels_per_peer",
            Self::StreamsPerPeer => "streams_per_peer",
            Self::ConnectsPerService => "connects_per_service",
            Self::FdBudget => "fd_budget",
            Self::AcceptFailed => "accept_failed",
        }
    }
}

/// The next connection on `listener`, or `None` once `shutdown` is cancelled: what every
/// listener's loop waits on. A failed accept() is answered by `accept_failed` (`what` names the
/// listener in its log line) and waited past.
pub async fn next_connection(
    listener: &tokio::net::TcpListener,
    shutdown: &tokio_util::sync::CancellationToken,
    state: &crate::state::AgentState,
    what: impl Fn() -> String,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => accept_failed(state, &what(), &e).await,
            },
        }
    }
}

/// Every listener's answer to a failed accept(): count, throttled WARN, back off
/// (`tapproof_tls::admission::ACCEPT_BACKOFF`).
pub async fn accept_failed(state: &crate::state::AgentState, listener: &str, error: &std::io::Error) {
    state.metrics.limit_refused(Limit::AcceptFailed);
    tracing::debug!(listener, %error, "accept failed; backing off");
    if let Some(suppressed) = state.refused_log.tick() {
        tracing::warn!(listener, %error, suppressed, "accept failed, backing off {} ms (one line per 10 s)", tapproof_tls::admission::ACCEPT_BACKOFF.as_millis());
    }
    tokio::time::sleep(tapproof_tls::admission::ACCEPT_BACKOFF).await;
}

/// Every counted place, built once from the config and the fd limit.
#[derive(Debug)]
pub struct Limits {
    handshakes: Arc<Admission<IpAddr>>,
    tunnels: Arc<Admission<String>>,
    streams: Arc<Admission<String>>,
    connects: Arc<Admission<String>>,
    fds: Arc<Admission<()>>,
    pub fd_budget: usize,
}

/// A place held for as long as what it counts lives.
#[derive(Debug)]
pub struct Place {
    _held: Vec<Admitted<IpAddr>>,
    _named: Vec<Admitted<String>>,
    _fd: Option<Admitted<()>>,
}

fn per_peer_streams(configured: usize, fd_budget: usize) -> usize {
    match (configured, fd_budget) {
        (0, 0) => 0,
        (0, b) => (b / 2).max(1),
        (c, 0) => c,
        (c, b) => c.min((b / 2).max(1)),
    }
}

impl Limits {
    pub fn new(cfg: &TunnelConfig, fd_limit: Option<u64>) -> Self {
        let fd_budget = fd_limit.map_or(0, |n| (n as usize).saturating_sub(FD_RESERVE).max(16));
        Self {
            handshakes: Admission::new(cfg.max_handshakes_in_progress, cfg.max_handshakes_per_source),
            tunnels: Admission::new(0, cfg.max_tunnels_per_peer),
            // One peer never holds more than half the budget: the others keep the rest.
            streams: Admission::new(0, per_peer_streams(cfg.max_streams_per_peer, fd_budget)),
            connects: Admission::new(0, cfg.max_connects_per_service),
            fds: Admission::new(fd_budget, 0),
            fd_budget,
        }
    }

    fn fd(&self) -> Result<Admitted<()>, Limit> {
        self.fds.admit(()).map_err(|_| Limit::FdBudget)
    }

    /// A connection accepted on the tunnel port, until its handshake ends.
    pub fn handshake(&self, source: IpAddr) -> Result<Place, Limit> {
        let fd = self.fd()?;
        let held = self.handshakes.admit(source).map_err(|full| match full {
            tapproof_tls::admission::Full::Total => Limit::HandshakesInProgress,
            tapproof_tls::admission::Full::PerKey => Limit::HandshakesPerSource,
        })?;
        Ok(Place {
            _held: vec![held],
            _named: Vec::new(),
            _fd: Some(fd),
        })
    }

    /// An authenticated tunnel from `peer` (its SPIFFE ID), for as long as it is open.
    pub fn tunnel(&self, peer: &str) -> Result<Place, Limit> {
        let t = self
            .tunnels
            .admit(peer.to_owned())
            .map_err(|_| Limit::TunnelsPerPeer)?;
        Ok(Place {
            _held: Vec::new(),
            _named: vec![t],
            _fd: None,
        })
    }

    /// A stream of `peer` to `service`, with its backend connection: the connect in progress is
    /// dropped from the returned place by [`Limits::connected`].
    pub fn stream(&self, peer: &str, service: &str) -> Result<(Place, Place), Limit> {
        let s = self
            .streams
            .admit(peer.to_owned())
            .map_err(|_| Limit::StreamsPerPeer)?;
        let fd = self.fd()?;
        let c = self
            .connects
            .admit(service.to_owned())
            .map_err(|_| Limit::ConnectsPerService)?;
        Ok((
            Place {
                _held: Vec::new(),
                _named: vec![s],
                _fd: Some(fd),
            },
            Place {
                _held: Vec::new(),
                _named: vec![c],
                _fd: None,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TunnelConfig {
        TunnelConfig {
            max_handshakes_in_progress: 3,
            max_handshakes_per_source: 2,
            max_tunnels_per_peer: 1,
            max_streams_per_peer: 2,
            max_connects_per_service: 1,
            ..TunnelConfig::default()
        }
    }

    #[test]
    fn each_limit_refuses_by_its_name_and_frees_on_drop() {
        let l = Limits::new(&cfg(), Some(FD_RESERVE as u64 + 16));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let h1 = l.handshake(a).unwrap();
        let _h2 = l.handshake(a).unwrap();
        assert_eq!(l.handshake(a).unwrap_err(), Limit::HandshakesPerSource);
        let _h3 = l.handshake(b).unwrap();
        assert_eq!(l.handshake(b).unwrap_err(), Limit::HandshakesInProgress);
        drop(h1);
        assert!(l.handshake(b).is_ok());

        let t = l.tunnel("spiffe://td/node/x").unwrap();
        assert_eq!(l.tunnel("spiffe://td/node/x").unwrap_err(), Limit::TunnelsPerPeer);
        assert!(l.tunnel("spiffe://td/node/y").is_ok());
        drop(t);

        let (s1, c1) = l.stream("p", "db").unwrap();
        assert_eq!(l.stream("q", "db").unwrap_err(), Limit::ConnectsPerService);
        drop(c1);
        let (_s2, _c2) = l.stream("p", "db").unwrap();
        assert_eq!(l.stream("p", "cache").unwrap_err(), Limit::StreamsPerPeer);
        drop(s1);
    }

    #[test]
    fn the_fd_budget_keeps_a_reserve() {
        let l = Limits::new(&TunnelConfig::default(), Some(FD_RESERVE as u64 + 16));
        assert_eq!(l.fd_budget, 16);
        let held: Vec<_> = (0..16u8)
            .map(|i| l.handshake(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert_eq!(
            l.handshake("10.0.1.1".parse().unwrap()).unwrap_err(),
            Limit::FdBudget
        );
        drop(held);
        assert_eq!(per_peer_streams(4096, 896), 448, "at a 1,024-fd limit");
        assert_eq!(per_peer_streams(4096, 0), 4096, "no fd limit known");
    }
}

//! Transparent capture and inbound enforcement (`[capture]`, `[[outbound]] capture`).
//!
//! - Outbound: nftables redirects this host's TCP connections to each captured `ADDR:PORT` to the
//!   capture listener (127.0.0.1 and ::1 at `capture.port`); the original destination is read with
//!   SO_ORIGINAL_DST and picks the outbound whose pool carries the connection, exactly as if the
//!   app had dialled an outbound listener. The agent's own sockets carry `capture.mark` and are
//!   not redirected. When the agent is down the redirect stays and nothing listens: captured
//!   connections are refused, never sent in plaintext.
//! - Inbound: with `monitor`, new connections from the network to the ports of this host's inbound
//!   services are counted per source by the kernel; with `enforce` they are dropped as well.
//!
//! The rules live in the table `inet tapproof` (`nft.rs`), installed in one transaction at start,
//! checked every `CHECK_INTERVAL` and installed again when missing or changed. The agent never
//! removes them: only `tapproof capture remove` does.

pub mod nft;

use crate::config::{AgentConfig, OutboundConfig};
use crate::pool::Pool;
use crate::state::AgentState;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tapproof_audit::{CaptureState, InboundMode};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How often the table is read back (counters, and whether it is still in place).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// What the rules say, derived from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub captured: Vec<SocketAddr>,
    pub inbound: InboundMode,
    pub inbound_ports: Vec<u16>,
    pub port: u16,
    pub mark: u32,
}

impl Plan {
    pub fn of(config: &AgentConfig) -> Self {
        let mut inbound_ports: Vec<u16> = config
            .inbound
            .iter()
            .filter_map(|i| local_port(&i.forward))
            .collect();
        inbound_ports.sort_unstable();
        inbound_ports.dedup();
        Self {
            captured: config.outbound.iter().filter_map(|o| o.capture).collect(),
            inbound: config.capture.inbound,
            inbound_ports,
            port: config.capture.port,
            mark: config.capture.mark,
        }
    }
}

/// The port an inbound service listens on when its forward is on this host (loopback or
/// `localhost`): the port plaintext from the network would reach. A forward to another host has
/// no port here to protect.
fn local_port(forward: &crate::endpoint::Endpoint) -> Option<u16> {
    forward.is_loopback().then(|| match forward {
        crate::endpoint::Endpoint::Addr(a) => a.port(),
        crate::endpoint::Endpoint::Name { port, .. } => *port,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("capture: {0}")]
    Kernel(String),
    #[error("outbound[{index}].capture: {addr} is an address of this host: capturing it would send this host's connections to itself back through a tunnel; capture the address of the host that runs the service")]
    SelfAddress { index: usize, addr: SocketAddr },
    #[error("outbound[{index}].capture: {addr} is IPv6 but IPv6 is disabled on this host")]
    NoIpv6 { index: usize, addr: SocketAddr },
    #[error("capture.port: cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("capture: installing the nftables table failed: {0}")]
    Install(nft::NftError),
}

fn ipv6_enabled() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Whether `ip` is one of this host's addresses (binding to it works only then).
fn is_local(ip: IpAddr) -> bool {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The capture listeners and the pools of the capture outbounds, keyed by captured address.
pub struct Capture {
    pub plan: Plan,
    listeners: Vec<TcpListener>,
    routes: Arc<RwLock<HashMap<SocketAddr, Arc<Pool>>>>,
}

impl Capture {
    /// Checks the host (kernel features, permissions, addresses), binds the capture listener and
    /// installs the rules. An error here stops the agent: capture asked for never runs silently
    /// off.
    pub async fn start(config: &AgentConfig) -> Result<Self, CaptureError> {
        let plan = Plan::of(config);
        let v6 = ipv6_enabled();
        for (index, o) in config.outbound.iter().enumerate() {
            let Some(addr) = o.capture else { continue };
            if addr.is_ipv6() && !v6 {
                return Err(CaptureError::NoIpv6 { index, addr });
            }
            if is_local(addr.ip()) {
                return Err(CaptureError::SelfAddress { index, addr });
            }
        }
        let check = plan.clone();
        tokio::task::spawn_blocking(move || nft::check_kernel(&check))
            .await
            .map_err(|e| CaptureError::Kernel(e.to_string()))?
            .map_err(CaptureError::Kernel)?;
        let mut listeners = Vec::new();
        let mut addrs = vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), plan.port)];
        if v6 {
            addrs.push(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), plan.port));
        }
        for addr in addrs {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|error| CaptureError::Bind { addr, error })?;
            crate::socket::nodelay_inherited(&listener);
            listeners.push(listener);
        }
        let install = plan.clone();
        tokio::task::spawn_blocking(move || nft::install(&install))
            .await
            .map_err(|e| CaptureError::Kernel(e.to_string()))?
            .map_err(CaptureError::Install)?;
        info!(
            captured = %plan.captured.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            inbound = plan.inbound.as_str(),
            inbound_ports = ?plan.inbound_ports,
            "capture: nftables table inet tapproof installed"
        );
        Ok(Self {
            plan,
            listeners,
            routes: Default::default(),
        })
    }

    /// The captured address `outbound` is carried by `pool` (an outbound with `capture`).
    pub fn route(&self, addr: SocketAddr, pool: Arc<Pool>) {
        self.routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, pool);
    }

    pub fn bound(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves the capture listeners and keeps the rules in place until `shutdown`.
    pub fn serve(
        self,
        state: Arc<AgentState>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for listener in self.listeners {
            tasks.push(tokio::spawn(accept_loop(
                listener,
                self.routes.clone(),
                state.clone(),
                shutdown.clone(),
                tracker.clone(),
            )));
        }
        tokio::spawn(keep_loop(self.plan, state, shutdown));
        tasks
    }
}

async fn accept_loop(
    listener: TcpListener,
    routes: Arc<RwLock<HashMap<SocketAddr, Arc<Pool>>>>,
    state: Arc<AgentState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    while let Some((tcp, app)) =
        crate::limits::next_connection(&listener, &shutdown, &state, || "capture".into()).await
    {
        let result = |r: &'static str| {
            state
                .metrics
                .capture_connections
                .get_or_create(&crate::metrics::ResultLabels { result: r })
                .inc();
        };
        let Some(original) = original_destination(&tcp) else {
            result("no_original_destination");
            warn!(%app, "capture: a connection reached the capture listener without being redirected; reset");
            reset(tcp);
            continue;
        };
        let pool = routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&original)
            .cloned();
        let Some(pool) = pool else {
            result("unknown_destination");
            warn!(%app, destination = %original, "capture: no [[outbound]] captures this destination; reset");
            reset(tcp);
            continue;
        };
        result("accepted");
        let outbound: Arc<OutboundConfig> = pool.outbound();
        let state = state.clone();
        tracker.spawn(async move {
            crate::outbound::connection(tcp, app, pool, outbound, state, Some(original)).await
        });
    }
}

/// Where the app meant to connect, as the redirect recorded it; `None` when the connection was
/// not redirected (someone dialled the capture port itself).
fn original_destination(tcp: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let local = tcp.local_addr().ok()?;
    let original = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    let original = tapproof_audit::canonical(original);
    (original != tapproof_audit::canonical(local)).then_some(original)
}

/// Closes with RST: the app sees its connection refused at once, not a clean end of stream it
/// could take for an empty answer.
pub fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// Every `CHECK_INTERVAL`: reads the table back, installs it again when it is missing or not as
/// planned, and publishes its counters (metrics, `/v1/sockets` for the audit and the coverage
/// report).
async fn keep_loop(plan: Plan, state: Arc<AgentState>, shutdown: CancellationToken) {
    let mut known: HashMap<(IpAddr, u16), u64> = HashMap::new();
    loop {
        let mut reinstalled = false;
        let p = plan.clone();
        let looked = tokio::task::spawn_blocking(move || -> Result<nft::Listed, String> {
            match nft::list() {
                Ok(Some(l)) if l.is(&p) => Ok(l),
                Ok(found) => {
                    let what = if found.is_none() { "missing" } else { "changed" };
                    nft::install(&p).map_err(|e| format!("table {what}, and installing it again failed: {e}"))?;
                    warn!("capture: the nftables table inet tapproof was {what} (a firewall reload or `nft flush ruleset`?); installed again");
                    Err(String::from("reinstalled"))
                }
                Err(e) => Err(format!("cannot read the table: {e}")),
            }
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let m = &state.metrics;
        match looked {
            Ok(listed) => {
                m.capture_rules_installed.set(1);
                m.capture_redirected.set(listed.captured_connections as i64);
                m.capture_dropped_packets.set(listed.dropped_packets as i64);
                m.capture_attempts.clear();
                for a in &listed.attempts {
                    m.capture_attempts
                        .get_or_create(&crate::metrics::AttemptLabels {
                            source: a.source.to_string(),
                            port: a.port.to_string(),
                            mode: plan.inbound.as_str(),
                        })
                        .set(a.packets as i64);
                    let before = known.insert((a.source, a.port), a.packets);
                    if before != Some(a.packets) {
                        warn!(source = %a.source, port = a.port, packets = a.packets,
                              mode = plan.inbound.as_str(),
                              "capture: plaintext from the network to an inbound port ({})",
                              if plan.inbound == InboundMode::Enforce { "dropped" } else { "let through" });
                    }
                }
                crate::vouch::sockets().set_capture(CaptureState {
                    inbound: plan.inbound,
                    rules_installed: true,
                    captured: listed.captured,
                    captured_connections: listed.captured_connections,
                    inbound_ports: listed.inbound_ports,
                    attempts: listed.attempts,
                    dropped_packets: listed.dropped_packets,
                });
            }
            Err(why) => {
                if why == "reinstalled" {
                    m.capture_rules_reinstalled.inc();
                    reinstalled = true;
                    known.clear();
                } else {
                    warn!(error = %why, "capture: rules not verified");
                }
                m.capture_rules_installed.set(0);
                crate::vouch::sockets().set_capture(CaptureState {
                    inbound: plan.inbound,
                    rules_installed: false,
                    captured: plan.captured.clone(),
                    inbound_ports: plan.inbound_ports.clone(),
                    ..Default::default()
                });
            }
        }
        // Right after a reinstall, look again at once so the gauges do not stay at 0 a period.
        let wait = if reinstalled {
            Duration::from_millis(200)
        } else {
            CHECK_INTERVAL
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

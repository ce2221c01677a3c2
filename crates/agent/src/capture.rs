//! Transparent capture and inbound enforcement (`[capture]`, `[[outbound]] capture`, and the
//! control plane's directory and policy).
//!
//! - Outbound: nftables redirects this host's TCP connections to each captured `ADDR:PORT` to the
//!   capture listener (127.0.0.1 and ::1 at `capture.port`); the original destination is read with
//!   SO_ORIGINAL_DST and picks the route (service, peers, expected identity) that carries the
//!   connection, exactly as if the app had dialled an outbound listener. Captured destinations are
//!   the config's `[[outbound]] capture` entries and, with `capture.directory`, every address the
//!   control plane's directory lists for another node's service. The agent's own sockets carry
//!   `capture.mark` and are not redirected. When the agent is down the redirect stays and nothing
//!   listens: captured connections are refused, never sent in plaintext.
//! - Inbound: with `monitor`, new connections from the network to the ports of this host's inbound
//!   services are counted per source by the kernel; with `enforce` they are dropped as well. The
//!   mode is the config's `capture.inbound` unless the control plane's policy sets one for this
//!   node.
//!
//! `desired` is the one place that turns the inputs (config, directory, policy) into the rules
//! and routes. The rules live in the table `inet tapproof` (`nft.rs`), installed in one
//! transaction, looked at every `CHECK_INTERVAL` and whenever the inputs change, and installed
//! again when missing or not as desired. The agent never removes them: only
//! `tapproof capture remove` does.

pub mod nft;
pub mod route;

use crate::config::{AgentConfig, OutboundConfig};
use crate::endpoint::Endpoint;
use crate::pool::Pool;
use crate::state::AgentState;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tapproof_api::CapturePolicy;
use tapproof_audit::{CaptureState, InboundMode, RefusedDestination};
use tapproof_identity::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// How often the table is read back (counters, and whether it is still in place).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// What the rules say: the kernel's side of `Desired`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub captured: Vec<SocketAddr>,
    pub inbound: InboundMode,
    pub inbound_ports: Vec<u16>,
    pub port: u16,
    pub mark: u32,
    /// The gateway role's networks (`[gateway]`), if this agent is a site gateway.
    pub gateway: Option<GatewayPlan>,
}

/// A gateway's networks in the rules' terms: `BASE/LEN`, host bits cleared, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayPlan {
    /// The local networks, whose routed TCP to `remote` is captured.
    pub local: Vec<String>,
    /// Every remote site's networks: routed traffic to them is captured (TCP and UDP from
    /// `local`) or dropped (everything else).
    pub remote: Vec<String>,
    /// The mark UDP to remote sites gets on its way to the agent (`AgentConfig::udp_capture`).
    pub udp_mark: u32,
}

impl GatewayPlan {
    /// A gateway's networks, or for a host with `[[remote]]` only the remote ones (its own
    /// connections to them are captured; `local` stays empty and nothing routed is touched).
    pub fn of(config: &AgentConfig) -> Option<Self> {
        let text = |nets: &mut dyn Iterator<Item = &tapproof_audit::allow::Network>| {
            let mut v: Vec<String> = nets.map(|n| format!("{}/{}", n.base(), n.prefix())).collect();
            v.sort();
            v.dedup();
            v
        };
        let sites = config.remote_sites();
        if sites.is_empty() {
            return None;
        }
        let remote = text(&mut sites.iter().flat_map(|s| s.networks.iter()));
        let (udp_mark, _) = config.udp_capture()?;
        Some(Self {
            local: config
                .gateway
                .as_ref()
                .map(|g| text(&mut g.networks.iter()))
                .unwrap_or_default(),
            remote,
            udp_mark,
        })
    }

    /// A host reaching remote sites as itself, not a gateway.
    pub fn is_host(&self) -> bool {
        self.local.is_empty()
    }
}

impl Plan {
    /// The rules a config asks for by itself (before the control plane says anything): what
    /// `tapproof check-config` checks the kernel against.
    pub fn of(config: &AgentConfig) -> Self {
        desired(config, None, None, &Host::this()).plan
    }

    /// Whether the plan asks the kernel for anything: a captured destination, or an inbound
    /// mode with ports to apply it to.
    pub fn asks_anything(&self) -> bool {
        !self.captured.is_empty()
            || self.gateway.is_some()
            || (self.inbound != InboundMode::Off && !self.inbound_ports.is_empty())
    }
}

/// One address the control plane's directory lists: where clients reach `service` on `node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryAddress {
    pub addr: SocketAddr,
    pub service: String,
    pub node: String,
    /// The node's SPIFFE ID, which its tunnel must prove.
    pub id: SpiffeId,
    /// The node's tunnel listener.
    pub tunnel: SocketAddr,
}

/// What the control plane says about capture, from the state feed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inputs {
    pub addresses: Vec<DirectoryAddress>,
    pub policy: CapturePolicy,
}

/// The rules, the routes of the captured destinations, and what was not captured and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub plan: Plan,
    /// Each captured destination's route: an outbound config with `capture` set, whose service,
    /// peers and expected identity carry it.
    pub routes: Vec<OutboundConfig>,
    pub refused: Vec<RefusedDestination>,
    /// `config` or `policy`: who chose `plan.inbound`.
    pub inbound_from: &'static str,
}

/// The host facts `desired` needs, apart so that tests can state them.
pub struct Host<'a> {
    /// Whether an IP is one of this host's addresses.
    pub is_local: &'a dyn Fn(IpAddr) -> bool,
    pub ipv6: bool,
}

impl Host<'_> {
    pub fn this() -> Host<'static> {
        Host {
            is_local: &is_local,
            ipv6: ipv6_enabled(),
        }
    }

    /// Why `addr` cannot be captured on this host, if it cannot: the one rule for config
    /// outbounds (at start and on reload) and directory addresses alike.
    pub fn unfit(&self, addr: SocketAddr) -> Option<Unfit> {
        let ip = addr.ip();
        if (self.is_local)(ip) {
            Some(Unfit::Local)
        } else if addr.is_ipv6() && !self.ipv6 {
            Some(Unfit::NoIpv6)
        } else if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
            Some(Unfit::NotRemote)
        } else {
            None
        }
    }
}

/// Why an address cannot be captured here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfit {
    /// One of this host's addresses: its connections would come back to itself.
    Local,
    NoIpv6,
    /// Loopback, unspecified or multicast: not another host's address.
    NotRemote,
}

impl Unfit {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Local => "it is an address of this host: capturing it would send this host's own connections back to itself",
            Self::NoIpv6 => "it is IPv6 and IPv6 is disabled on this host",
            Self::NotRemote => "it is not an address of another host",
        }
    }
}

/// The one place that decides what is captured and enforced. `own`: this agent's node identity
/// (its own directory entries are never captured; the policy's per-node mode is looked up by its
/// name). `inputs`: `None` before the control plane's first answer.
pub fn desired(
    config: &AgentConfig,
    inputs: Option<&Inputs>,
    own: Option<&SpiffeId>,
    host: &Host<'_>,
) -> Desired {
    let mut inbound_ports: Vec<u16> = config
        .inbound
        .iter()
        .filter_map(|i| local_port(&i.forward))
        .collect();
    inbound_ports.sort_unstable();
    inbound_ports.dedup();
    let node = own.and_then(tapproof_identity::node_name);
    let (inbound, inbound_from) = match inputs.and_then(|i| node.and_then(|n| i.policy.mode_for(n))) {
        Some(mode) => (mode, "policy"),
        None => (config.capture.inbound, "config"),
    };
    let mut routes: Vec<OutboundConfig> = config
        .outbound
        .iter()
        .filter(|o| o.capture.is_some())
        .cloned()
        .collect();
    let mut refused = Vec::new();
    if let (true, Some(inputs)) = (config.capture.directory, inputs) {
        let mut claims: BTreeMap<SocketAddr, Vec<&DirectoryAddress>> = BTreeMap::new();
        for a in inputs.addresses.iter().filter(|a| Some(&a.id) != own) {
            let list = claims.entry(tapproof_audit::canonical(a.addr)).or_default();
            if !list.iter().any(|c| c.node == a.node && c.service == a.service) {
                list.push(a);
            }
        }
        for (addr, list) in claims {
            // An explicit [[outbound]] capture of the same address wins.
            if routes.iter().any(|o| o.capture == Some(addr)) {
                continue;
            }
            let claimed_by = list.iter().map(|c| format!("{}/{}", c.node, c.service)).collect();
            let why = if list.len() > 1 {
                Some("two services claim this address: nothing is captured for it until one of them stops announcing it".to_owned())
            } else {
                host.unfit(addr).map(|u| match u {
                    Unfit::Local => format!("{}; the announcing node's addresses are wrong", u.reason()),
                    _ => u.reason().to_owned(),
                })
            };
            match why {
                Some(reason) => refused.push(RefusedDestination {
                    destination: addr,
                    claimed_by,
                    reason,
                }),
                None => {
                    let a = list[0];
                    routes.push(OutboundConfig {
                        listen: None,
                        capture: Some(addr),
                        service: a.service.clone(),
                        peers: vec![Endpoint::Addr(a.tunnel)],
                        server_id: Some(a.id.clone()),
                        allow_non_loopback: false,
                        site: None,
                    });
                }
            }
        }
    }
    let mut captured: Vec<SocketAddr> = routes.iter().filter_map(|o| o.capture).collect();
    captured.sort();
    Desired {
        plan: Plan {
            captured,
            inbound,
            inbound_ports,
            port: config.capture.port,
            mark: config.capture.mark,
            gateway: GatewayPlan::of(config),
        },
        routes,
        refused,
        inbound_from,
    }
}

/// Where clients reach this agent's inbound services, as announced to the control plane: each
/// `[[inbound]]`'s `addresses`, or else the advertised tunnel IP with the forward's port when the
/// forward is on this host (never a loopback or unspecified IP: no other host reaches those).
pub fn announced(config: &AgentConfig, advertise: Option<SocketAddr>) -> tapproof_api::Announced {
    let mut out = Vec::new();
    for i in &config.inbound {
        if !i.addresses.is_empty() {
            out.extend(i.addresses.iter().map(|a| (i.service.clone(), *a)));
            continue;
        }
        let (Some(port), Some(ip)) = (local_port(&i.forward), advertise.map(|a| a.ip())) else {
            continue;
        };
        if !ip.is_loopback() && !ip.is_unspecified() {
            out.push((i.service.clone(), SocketAddr::new(ip, port)));
        }
    }
    tapproof_api::Announced(out)
}

/// The port an inbound service listens on when its forward is on this host (loopback or
/// `localhost`): the port plaintext from the network would reach. A forward to another host has
/// no port here to protect.
fn local_port(forward: &Endpoint) -> Option<u16> {
    forward.is_loopback().then(|| match forward {
        Endpoint::Addr(a) => a.port(),
        Endpoint::Name { port, .. } => *port,
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

/// What carries a captured destination: its outbound config (the service asked for) and the
/// pool of its peers.
#[derive(Clone)]
struct Route {
    outbound: Arc<OutboundConfig>,
    pool: Arc<Pool>,
}

/// The routes of captured addresses, and for a gateway one pool per remote site (its routes
/// are made per connection: the destination is the CONNECT authority).
#[derive(Default)]
struct Table {
    exact: HashMap<SocketAddr, Route>,
    sites: HashMap<String, Arc<Pool>>,
}

type Routes = Arc<RwLock<Table>>;

impl Table {
    fn route(&self, destination: SocketAddr, config: &AgentConfig) -> Option<Route> {
        if let Some(r) = self.exact.get(&destination) {
            return Some(r.clone());
        }
        let site = crate::gateway::site_for(config.remote_sites(), destination.ip())?;
        Some(Route {
            outbound: Arc::new(crate::gateway::route(site, destination)),
            pool: self.sites.get(&site.name)?.clone(),
        })
    }
}

/// The capture listeners and the routes of the captured destinations, keyed by address.
pub struct Capture {
    /// The rules this process installed at start (`None`: dormant until the policy asks).
    installed: Option<Plan>,
    listeners: Vec<TcpListener>,
    /// The sockets UDP to remote sites is handed to, a gateway's routed or a host's own
    /// (`udp.rs`).
    udp: Vec<tokio::net::UdpSocket>,
    routes: Routes,
}

impl Capture {
    /// Checks the host (kernel features, permissions, addresses), binds the capture listener and
    /// installs the rules. An error here stops the agent: capture asked for never runs silently
    /// off.
    ///
    /// Before the control plane's first answer the directory and the policy are unknown: while
    /// a `[control]` agent waits for it, the destinations the kernel's table already captures
    /// stay captured (their connections are reset, never sent in plaintext) and a stricter
    /// inbound mode found there is kept.
    pub async fn start(config: &AgentConfig, own: &SpiffeId) -> Result<Self, CaptureError> {
        let host = Host::this();
        let mut plan = desired(config, None, Some(own), &host).plan;
        for (index, o) in config.outbound.iter().enumerate() {
            let Some(addr) = o.capture else { continue };
            match host.unfit(addr) {
                Some(Unfit::NoIpv6) => return Err(CaptureError::NoIpv6 { index, addr }),
                // (config.rs refuses loopback and unspecified addresses before this.)
                Some(Unfit::Local | Unfit::NotRemote) => {
                    return Err(CaptureError::SelfAddress { index, addr })
                }
                None => {}
            }
        }
        let check = plan.clone();
        tokio::task::spawn_blocking(move || nft::check_kernel(&check))
            .await
            .map_err(|e| CaptureError::Kernel(e.to_string()))?
            .map_err(CaptureError::Kernel)?;
        if config.control.is_some() {
            if let Ok(Ok(Some(before))) = tokio::task::spawn_blocking(nft::list).await {
                hold_over(&mut plan, &before);
            }
        }
        let mut listeners = Vec::new();
        // A gateway's routed connections are redirected to the address of the interface they
        // arrived on, so its listener takes every address ([::] takes IPv4 too); a connection
        // not redirected there is reset like any other.
        let addrs = match (config.gateway.is_some(), host.ipv6) {
            (true, true) => vec![SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), plan.port)],
            (true, false) => vec![SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), plan.port)],
            (false, v6) => {
                let mut a = vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), plan.port)];
                if v6 {
                    a.push(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), plan.port));
                }
                a
            }
        };
        for addr in addrs {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|error| CaptureError::Bind { addr, error })?;
            crate::socket::nodelay_inherited(&listener);
            listeners.push(listener);
        }
        let mut udp = Vec::new();
        if let Some((mark, table)) = config.udp_capture() {
            udp = crate::udp::bind_routed(plan.port, host.ipv6).map_err(|error| CaptureError::Bind {
                addr: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), plan.port),
                error,
            })?;
            let ipv6 = host.ipv6;
            tokio::task::spawn_blocking(move || route::ensure(mark, table, ipv6))
                .await
                .map_err(|e| CaptureError::Kernel(e.to_string()))?
                .map_err(|e| {
                    let keys = if config.gateway.is_some() {
                        "gateway.udp_mark, gateway.udp_route_table"
                    } else {
                        "a host with [[remote]] uses their defaults"
                    };
                    CaptureError::Kernel(format!(
                        "the UDP policy route to remote sites (mark {mark:#x}, table {table}; {keys}): {e}"
                    ))
                })?;
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
            installed: Some(plan),
            listeners,
            udp,
            routes: Default::default(),
        })
    }

    /// An agent with `[control]` and no capture in its config: nothing is bound or installed
    /// until the control plane's policy asks this node for an inbound mode (or a table of ours
    /// is found from before, which then follows the policy).
    pub fn dormant() -> Self {
        Self {
            installed: None,
            listeners: Vec::new(),
            udp: Vec::new(),
            routes: Default::default(),
        }
    }

    pub fn bound(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves the capture listeners and keeps the rules as desired until `shutdown`.
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
        if !self.udp.is_empty() {
            let (routes, on) = (self.routes.clone(), state.clone());
            let site_of: crate::udp::SiteOf = Arc::new(move |destination| {
                let config = on.applied();
                let site = crate::gateway::site_for(config.remote_sites(), destination.ip())?;
                let table = routes.read().unwrap_or_else(|p| p.into_inner());
                table.sites.get(&site.name).cloned()
            });
            tasks.push(tokio::spawn(crate::udp::serve_routed(
                self.udp,
                site_of,
                state.clone(),
                shutdown.clone(),
            )));
        }
        tokio::spawn(
            Keeper {
                state,
                routes: self.routes,
                installed: self.installed,
                pools: HashMap::new(),
                refused: Vec::new(),
                error: None,
                just_installed: false,
                known: HashMap::new(),
            }
            .run(shutdown),
        );
        tasks
    }
}

/// Keeps what the kernel's table captured before this start (`before`) while the directory is
/// unknown, and its inbound mode when stricter than the plan's: a restart never opens a gap.
fn hold_over(plan: &mut Plan, before: &nft::Listed) {
    for addr in &before.captured {
        if !plan.captured.contains(addr) {
            plan.captured.push(*addr);
        }
    }
    plan.captured.sort();
    let rank = |m: InboundMode| match m {
        InboundMode::Off => 0,
        InboundMode::Monitor => 1,
        InboundMode::Enforce => 2,
    };
    if rank(before.inbound) > rank(plan.inbound) {
        plan.inbound = before.inbound;
    }
}

async fn accept_loop(
    listener: TcpListener,
    routes: Routes,
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
        let route = routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .route(original, &state.applied());
        let Some(Route { outbound, pool }) = route else {
            result("unknown_destination");
            warn!(%app, destination = %original, "capture: no route for this destination (yet: the directory is not known, or it was just withdrawn); reset");
            reset(tcp);
            continue;
        };
        result("accepted");
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
    let local = tapproof_audit::canonical(tcp.local_addr().ok()?);
    // An IPv4 connection on a dual-stack listener (a gateway's) shows a v4-mapped address: the
    // kernel keeps its original destination at the IPv4 level.
    let original = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    let original = tapproof_audit::canonical(original);
    (original != local).then_some(original)
}

/// Closes with RST: the app sees its connection refused at once, not a clean end of stream it
/// could take for an empty answer.
pub fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// What one look at the kernel found.
enum Look {
    /// The table is as desired; its counters.
    Verified(nft::Listed),
    /// It was not (`outside`: missing or changed from outside; else the desired plan changed)
    /// and was installed again: `whole` when the table was replaced (its counters and attempt
    /// sets start again), else only the captured destinations were updated.
    Installed {
        outside: Option<&'static str>,
        whole: bool,
    },
    Failed(String),
}

/// What a pool dials: peers, expected identity, and the service when the peers come from the
/// directory by name.
type PoolKey = (Vec<Endpoint>, Option<SpiffeId>, String);

/// The capture task's state: what it installed, the pools of the captured destinations, and
/// what it last reported (so a log line is written on a change, not every look).
struct Keeper {
    state: Arc<AgentState>,
    routes: Routes,
    installed: Option<Plan>,
    /// Pools by what they dial: (peers, expected identity, service when the peers come from the
    /// directory by service name). Destinations on one node share one tunnel.
    pools: HashMap<PoolKey, Arc<Pool>>,
    refused: Vec<RefusedDestination>,
    error: Option<String>,
    /// The last look installed the table (the next must read it back as planned).
    just_installed: bool,
    /// Attempts already logged: (source, port) -> packets.
    known: HashMap<(IpAddr, u16), u64>,
}

impl Keeper {
    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let wait = self.step().await;
            let state = self.state.clone();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = state.capture_changed.notified() => {}
            }
        }
    }

    /// One look: works out what is desired, updates the routes, makes the kernel's table match;
    /// returns how long to wait before the next look (a change of inputs wakes it sooner).
    async fn step(&mut self) -> Duration {
        let state = self.state.clone();
        let config = state.applied();
        let inputs = state.capture_inputs();
        let own = state.material.current().id().clone();
        let mut want = desired(&config, inputs.as_deref(), Some(&own), &Host::this());
        if inputs.is_none() && config.control.is_some() {
            match &self.installed {
                // The directory and the policy are not known yet: keep what start() held over.
                Some(installed) => want.plan = installed.clone(),
                // Dormant: nothing to decide before the policy is known.
                None => return Duration::from_secs(3600),
            }
        }
        self.set_routes(&want.routes, config.remote_sites());
        self.report_refused(&want.refused);
        let m = &self.state.metrics;
        m.capture_mode.clear();
        m.capture_mode
            .get_or_create(&crate::metrics::ModeLabels {
                mode: want.plan.inbound.as_str(),
                set_by: want.inbound_from,
            })
            .set(1);
        if self.installed.is_none() {
            if !want.plan.asks_anything() && !table_exists().await {
                // Dormant, and nothing to do: look again when the inputs change.
                self.publish_dormant();
                return Duration::from_secs(3600);
            }
            let check = want.plan.clone();
            let checked = tokio::task::spawn_blocking(move || nft::check_kernel(&check))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            if let Err(e) = checked {
                let e = format!("the control plane's policy asks this node for inbound {} but capture cannot run here: {e}", want.plan.inbound.as_str());
                self.failed(&want, e);
                return CHECK_INTERVAL * 12;
            }
        }
        let plan = want.plan.clone();
        let ours = self.installed.clone();
        let look = tokio::task::spawn_blocking(move || match nft::list() {
            Ok(Some(l)) if l.is(&plan) => Look::Verified(l),
            Ok(found) => {
                let outside = match (&found, &ours) {
                    (None, Some(_)) => Some("missing"),
                    (Some(_), Some(p)) if *p == plan => Some("changed"),
                    _ => None,
                };
                let whole = !found.as_ref().is_some_and(|l| l.same_but_captured(&plan));
                let done = if whole {
                    nft::install(&plan)
                } else {
                    nft::update_captured(&plan)
                };
                match done {
                    Ok(()) => Look::Installed { outside, whole },
                    Err(e) => Look::Failed(format!("installing the table failed: {e}")),
                }
            }
            Err(e) => Look::Failed(format!("cannot read the table: {e}")),
        })
        .await
        .unwrap_or_else(|e| Look::Failed(e.to_string()));
        match look {
            Look::Verified(listed) => {
                self.error = None;
                self.just_installed = false;
                self.publish(&want, listed);
                CHECK_INTERVAL
            }
            Look::Installed { .. } if self.just_installed && self.installed.as_ref() == Some(&want.plan) => {
                // The same plan installed twice running without reading back as planned: the
                // kernel's listing is not what this build expects (another nft version?). Say
                // so; do not spin. (A plan that changed again meanwhile is just installed.)
                self.failed(
                    &want,
                    "the table was installed but does not read back as planned (nft -j list); check the nft version".into(),
                );
                self.just_installed = false;
                CHECK_INTERVAL
            }
            Look::Installed { outside, whole } => {
                self.error = None;
                self.just_installed = true;
                let m = &self.state.metrics;
                match outside {
                    Some(what) => {
                        m.capture_rules_reinstalled.inc();
                        warn!("capture: the nftables table inet tapproof was {what} (a firewall reload or `nft flush ruleset`?); installed again");
                    }
                    None => info!(
                        captured = %want.plan.captured.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                        inbound = want.plan.inbound.as_str(),
                        inbound_from = want.inbound_from,
                        inbound_ports = ?want.plan.inbound_ports,
                        "capture: rules updated"
                    ),
                }
                self.installed = Some(want.plan);
                if whole {
                    self.known.clear();
                }
                // Look again at once so the gauges do not stay at 0 a period.
                Duration::from_millis(200)
            }
            Look::Failed(e) => {
                self.failed(&want, e);
                CHECK_INTERVAL
            }
        }
    }

    /// Points every captured destination at its route, reusing the pools of those that stay.
    fn set_routes(&mut self, routes: &[OutboundConfig], sites: &[crate::config::RemoteSite]) {
        let mut table = HashMap::new();
        let mut pools = HashMap::new();
        for o in routes {
            let Some(addr) = o.capture else { continue };
            let pool = self.pool_for(o, &mut pools);
            table.insert(
                addr,
                Route {
                    outbound: Arc::new(o.clone()),
                    pool,
                },
            );
        }
        let mut by_site = HashMap::new();
        for site in sites {
            let o = OutboundConfig {
                service: format!("gateway {}", site.name),
                ..crate::gateway::route(site, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0))
            };
            by_site.insert(site.name.clone(), self.pool_for(&o, &mut pools));
        }
        self.pools = pools;
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = Table {
            exact: table,
            sites: by_site,
        };
    }

    /// The pool that dials what `o` dials (its peers and expected identity, and its service when
    /// the peers come from the directory by name): one already in use, or a new one; recorded in
    /// `pools`.
    fn pool_for(&self, o: &OutboundConfig, pools: &mut HashMap<PoolKey, Arc<Pool>>) -> Arc<Pool> {
        let key = (
            o.peers.clone(),
            o.server_id.clone(),
            if o.peers.is_empty() {
                o.service.clone()
            } else {
                String::new()
            },
        );
        let pool = match self.pools.get(&key).or_else(|| pools.get(&key)) {
            Some(p) => Arc::clone(p),
            None => Arc::new(Pool::new(o.clone(), self.state.clone())),
        };
        pools.insert(key, pool.clone());
        pool
    }

    fn report_refused(&mut self, refused: &[RefusedDestination]) {
        if self.refused == refused {
            return;
        }
        let m = &self.state.metrics;
        m.capture_refused.clear();
        for r in refused {
            error!(destination = %r.destination, claimed_by = %r.claimed_by.join(", "), reason = %r.reason,
                   "capture: a directory destination is not captured");
            m.capture_refused
                .get_or_create(&crate::metrics::RefusedLabels {
                    destination: r.destination.to_string(),
                })
                .set(1);
        }
        self.refused = refused.to_vec();
    }

    fn state_of(&self, want: &Desired) -> CaptureState {
        CaptureState {
            inbound: want.plan.inbound,
            inbound_from: want.inbound_from.to_owned(),
            refused: want.refused.clone(),
            captured: want.plan.captured.clone(),
            inbound_ports: want.plan.inbound_ports.clone(),
            ..Default::default()
        }
    }

    /// A dormant agent with nothing to install (no inbound port for the policy's mode to apply
    /// to) reports no capture.
    fn publish_dormant(&self) {
        crate::vouch::sockets().clear_capture();
    }

    fn failed(&mut self, want: &Desired, e: String) {
        if self.error.as_ref() != Some(&e) {
            error!(error = %e, "capture: rules not in place");
            self.error = Some(e.clone());
        }
        self.state.metrics.capture_rules_installed.set(0);
        crate::vouch::sockets().set_capture(CaptureState {
            rules_installed: false,
            error: Some(e),
            ..self.state_of(want)
        });
    }

    /// Publishes the table's counters (metrics, `/v1/sockets` for the audit and the coverage
    /// report) and logs new plaintext attempts.
    fn publish(&mut self, want: &Desired, listed: nft::Listed) {
        let m = &self.state.metrics;
        let mode = want.plan.inbound;
        m.capture_rules_installed.set(1);
        m.capture_redirected.set(listed.captured_connections as i64);
        m.capture_dropped_packets.set(listed.dropped_packets as i64);
        m.gateway_routed.set(listed.routed_connections as i64);
        m.gateway_dropped.set(listed.routed_dropped as i64);
        m.gateway_datagrams.set(listed.routed_datagrams as i64);
        m.capture_attempts.clear();
        for a in &listed.attempts {
            m.capture_attempts
                .get_or_create(&crate::metrics::AttemptLabels {
                    source: a.source.to_string(),
                    port: a.port.to_string(),
                    mode: mode.as_str(),
                })
                .set(a.packets as i64);
            let before = self.known.insert((a.source, a.port), a.packets);
            if before != Some(a.packets) {
                warn!(source = %a.source, port = a.port, packets = a.packets, mode = mode.as_str(),
                      "capture: plaintext from the network to an inbound port ({})",
                      if mode == InboundMode::Enforce { "dropped" } else { "let through" });
            }
        }
        // Set after the state the audit reads, so a scrape that sees the new count sees it too.
        let destinations = listed.captured.len() as i64;
        let gateway = want.plan.gateway.as_ref().map(|_| tapproof_audit::GatewayReport {
            site: self
                .state
                .config
                .gateway
                .as_ref()
                .map(|g| g.site.clone())
                .unwrap_or_default(),
            routed_connections: listed.routed_connections,
            routed_datagrams: listed.routed_datagrams,
            dropped_packets: listed.routed_dropped,
            sites: self.state.sites.snapshot(),
        });
        crate::vouch::sockets().set_capture(CaptureState {
            rules_installed: true,
            captured: listed.captured,
            captured_connections: listed.captured_connections,
            inbound_ports: listed.inbound_ports,
            attempts: listed.attempts,
            dropped_packets: listed.dropped_packets,
            gateway,
            ..self.state_of(want)
        });
        m.capture_destinations.set(destinations);
    }
}

async fn table_exists() -> bool {
    matches!(tokio::task::spawn_blocking(nft::list).await, Ok(Ok(Some(_))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> AgentConfig {
        let text = format!(
            "trust_domain = \"example.org\"\n[control]\ndata_dir = \"/tmp/x\"\n[capture]\ndirectory = true\n{extra}"
        );
        AgentConfig::parse(Path::new("t.toml"), &text).unwrap()
    }

    fn id(node: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://example.org/node/{node}")).unwrap()
    }

    fn entry(node: &str, service: &str, addr: &str) -> DirectoryAddress {
        DirectoryAddress {
            addr: addr.parse().unwrap(),
            service: service.into(),
            node: node.into(),
            id: id(node),
            tunnel: format!("{}:15008", addr.rsplit_once(':').unwrap().0)
                .parse()
                .unwrap(),
        }
    }

    fn host() -> Host<'static> {
        Host {
            is_local: &|ip| ip == "10.0.0.1".parse::<IpAddr>().unwrap(),
            ipv6: true,
        }
    }

    #[test]
    fn directory_addresses_are_captured_to_the_node_that_announced_them() {
        let inputs = Inputs {
            addresses: vec![
                entry("b", "web", "10.0.0.2:8080"),
                entry("b", "db", "10.0.0.2:5432"),
                // Our own service: not captured, no error.
                entry("a", "api", "10.0.0.1:9000"),
            ],
            policy: CapturePolicy::default(),
        };
        let d = desired(&config(""), Some(&inputs), Some(&id("a")), &host());
        assert_eq!(
            d.plan.captured,
            ["10.0.0.2:5432".parse().unwrap(), "10.0.0.2:8080".parse().unwrap()]
        );
        assert!(d.refused.is_empty(), "{:?}", d.refused);
        let web = d.routes.iter().find(|o| o.service == "web").unwrap();
        assert_eq!(web.peers, [Endpoint::Addr("10.0.0.2:15008".parse().unwrap())]);
        assert_eq!(web.server_id, Some(id("b")));
        // Before the control plane answers, nothing from the directory; without capture.directory,
        // nothing from it at all.
        assert!(desired(&config(""), None, Some(&id("a")), &host())
            .plan
            .captured
            .is_empty());
        let off = AgentConfig::parse(
            Path::new("t.toml"),
            "trust_domain = \"example.org\"\n[control]\ndata_dir = \"/tmp/x\"\n",
        )
        .unwrap();
        assert!(desired(&off, Some(&inputs), Some(&id("a")), &host())
            .plan
            .captured
            .is_empty());
    }

    #[test]
    fn an_address_of_this_host_or_of_two_services_is_refused_and_not_captured() {
        let inputs = Inputs {
            addresses: vec![
                // b announces an address of ours (a wrong `addresses`).
                entry("b", "web", "10.0.0.1:8080"),
                // Two services on one address.
                entry("b", "db", "10.0.0.3:5432"),
                entry("c", "db2", "10.0.0.3:5432"),
                // The same service on two nodes at one address is two claims as well.
                entry("c", "kv", "10.0.0.4:6379"),
                entry("d", "kv", "10.0.0.4:6379"),
                entry("c", "ok", "10.0.0.5:80"),
            ],
            policy: CapturePolicy::default(),
        };
        let d = desired(&config(""), Some(&inputs), Some(&id("a")), &host());
        assert_eq!(d.plan.captured, ["10.0.0.5:80".parse().unwrap()]);
        let reasons: Vec<(String, &str)> = d
            .refused
            .iter()
            .map(|r| (r.destination.to_string(), r.reason.split(':').next().unwrap()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("10.0.0.1:8080".to_owned(), "it is an address of this host"),
                ("10.0.0.3:5432".to_owned(), "two services claim this address"),
                ("10.0.0.4:6379".to_owned(), "two services claim this address"),
            ]
        );
        assert_eq!(d.refused[1].claimed_by, ["b/db", "c/db2"]);
        // An explicit [[outbound]] capture of an address wins over the directory, with no error.
        let explicit = config(
            "[[outbound]]\ncapture = \"10.0.0.3:5432\"\nservice = \"db\"\npeers = [\"10.0.0.3:15008\"]\nserver_id = \"spiffe://example.org/node/b\"\n",
        );
        let d = desired(&explicit, Some(&inputs), Some(&id("a")), &host());
        assert!(d.plan.captured.contains(&"10.0.0.3:5432".parse().unwrap()));
        assert!(d.refused.iter().all(|r| r.destination.port() != 5432));
    }

    #[test]
    fn the_policy_mode_for_this_node_wins_over_the_config() {
        let cfg =
            config("inbound = \"monitor\"\n[[inbound]]\nservice = \"web\"\nforward = \"127.0.0.1:8080\"\n");
        let d = desired(&cfg, None, Some(&id("b")), &host());
        assert_eq!((d.plan.inbound, d.inbound_from), (InboundMode::Monitor, "config"));
        assert_eq!(d.plan.inbound_ports, [8080]);
        let mut inputs = Inputs::default();
        inputs.policy.inbound = Some(InboundMode::Enforce);
        let d = desired(&cfg, Some(&inputs), Some(&id("b")), &host());
        assert_eq!((d.plan.inbound, d.inbound_from), (InboundMode::Enforce, "policy"));
        inputs.policy.nodes.insert("b".into(), InboundMode::Off);
        assert_eq!(
            desired(&cfg, Some(&inputs), Some(&id("b")), &host()).plan.inbound,
            InboundMode::Off
        );
        assert_eq!(
            desired(&cfg, Some(&inputs), Some(&id("c")), &host()).plan.inbound,
            InboundMode::Enforce
        );
    }

    #[test]
    fn a_restart_keeps_what_the_table_held_until_the_directory_is_known() {
        let mut plan = desired(&config(""), None, Some(&id("a")), &host()).plan;
        let before = nft::Listed {
            captured: vec!["10.0.0.2:8080".parse().unwrap()],
            inbound: InboundMode::Enforce,
            ..Default::default()
        };
        hold_over(&mut plan, &before);
        assert_eq!(plan.captured, before.captured);
        assert_eq!(plan.inbound, InboundMode::Enforce);
    }

    #[test]
    fn announced_addresses_default_to_the_advertised_ip_and_the_forward_port() {
        let cfg = config(
            "[[inbound]]\nservice = \"web\"\nforward = \"127.0.0.1:8080\"\n\
             [[inbound]]\nservice = \"db\"\nforward = \"127.0.0.1:5432\"\naddresses = [\"10.9.9.9:15432\", \"[fd00::9]:5432\"]\n\
             [[inbound]]\nservice = \"far\"\nforward = \"10.1.1.1:80\"\nallow_non_loopback = true\n",
        );
        let a = announced(&cfg, Some("10.0.0.2:15008".parse().unwrap()));
        assert_eq!(
            a.to_query(),
            "db=10.9.9.9:15432,db=[fd00::9]:5432,web=10.0.0.2:8080"
        );
        // A loopback or unknown tunnel address gives no default.
        assert_eq!(
            announced(&cfg, Some("127.0.0.1:15008".parse().unwrap())).0.len(),
            2
        );
        assert_eq!(announced(&cfg, None).0.len(), 2);
    }
}

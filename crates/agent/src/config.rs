//! The agent's TOML configuration: plain typed data, parsed strictly (an unknown key is an error,
//! not a silent default), then checked for the rules a type cannot express. Every error names the
//! key it is about.

use crate::endpoint::Endpoint;
use crate::policy::AllowPattern;
use serde::{Deserialize, Deserializer};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tapproof_identity::{SpiffeId, TrustDomain};

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15000";
pub const DEFAULT_TUNNEL_LISTEN: &str = "0.0.0.0:15008";
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_STREAMS: u32 = 16_384;
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 32;
pub const DEFAULT_MAX_TUNNELS_PER_PEER: usize = 8;
pub const DEFAULT_MAX_STREAMS_PER_PEER: usize = 16_384;
pub const DEFAULT_MAX_CONNECTS_PER_SERVICE: usize = 256;
pub const DEFAULT_MAX_HEADER_LIST: u32 = 16 * 1024;
pub const DEFAULT_MAX_PENDING_RESETS: usize = 20;
/// A tunnel's sending keys are replaced (TLS 1.3 KeyUpdate) after this much payload...
pub const DEFAULT_KEY_UPDATE_BYTES: u64 = 1 << 30;
/// ...or after this long, whichever comes first.
pub const DEFAULT_KEY_UPDATE_INTERVAL: Duration = Duration::from_secs(3600);
/// An opened tunnel PINGs its peer this often...
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(5);
/// ...and takes no new streams once an answer takes longer than this. Long enough for TCP's
/// retransmissions on a lossy link (at 20% loss a 3 s timeout retired healthy tunnels); gateways
/// in pairs on a clean interconnect may go lower (the HA test runs 1 s / 1 s).
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control windows. Data a stream's backend has not taken yet holds its stream's
/// window and the same bytes of the tunnel's, so the tunnel stalls for every stream once
/// connection_window / stream_window streams have backends that stopped reading (issue 11: at
/// 32 MiB / 64 MiB two such streams froze a tunnel; at 8 MiB / 64 MiB it takes eight). h2
/// re-opens a window once half of it is consumed, so one stream carries about 0.75 x window per
/// round trip: 8 MiB is ~6 GB/s at 1 ms (a data centre) and reached 30% of direct TCP at 20 ms
/// (bench `longfat`; raise it for long links). The connection window is also the most one
/// tunnel buffers for backends that read slower than the peer sends.
pub const DEFAULT_STREAM_WINDOW: u32 = 8 * 1024 * 1024;
pub const DEFAULT_CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
/// HTTP/2 frame size: large frames mean fewer frame headers and fewer TLS records per byte.
pub const DEFAULT_MAX_FRAME: u32 = 256 * 1024;
/// Where captured connections arrive (127.0.0.1 and ::1 only; nftables redirects them there).
pub const DEFAULT_CAPTURE_PORT: u16 = 15006;
/// The socket mark on the agent's own connections, which the capture rules let pass (so a tunnel
/// to a captured address is not captured again). "tp" and 1.
pub const DEFAULT_CAPTURE_MARK: u32 = 0x7470_0001;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The SPIFFE trust domain every peer and our own identity must belong to.
    #[serde(deserialize_with = "de_from_str")]
    pub trust_domain: TrustDomain,
    /// Identity from files (bring your own PKI). Exactly one of `identity` and `control`.
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
    /// Identity from the tapproof control plane (join with a token, then automatic renewal).
    #[serde(default)]
    pub control: Option<ControlConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub tunnel: TunnelConfig,
    #[serde(default)]
    pub inbound: Vec<InboundConfig>,
    #[serde(default)]
    pub outbound: Vec<OutboundConfig>,
    /// The coverage audit: accepted exceptions, and how often a control-plane agent reports.
    #[serde(default)]
    pub audit: tapproof_audit::AuditConfig,
    /// The SPIFFE Workload API for local workloads, on a Unix socket.
    #[serde(default)]
    pub workload_api: Option<WorkloadApiConfig>,
    /// Other trust domains whose IDs may be peers (SPIFFE federation): their bundles, from a
    /// file and optionally kept fresh from their SPIFFE bundle endpoint.
    #[serde(default)]
    pub federation: Vec<FederationConfig>,
    /// Transparent capture and enforcement (nftables, table `inet tapproof`).
    #[serde(default)]
    pub capture: CaptureConfig,
    /// The site-gateway role: routed TCP from the local networks to remote sites' networks is
    /// carried to those sites' gateways, and their tunnels reach hosts of the local networks.
    #[serde(default)]
    pub gateway: Option<GatewayConfig>,
    /// `[[remote]]` on a host that is not a gateway: other sites' networks this host reaches
    /// through their gateways, as itself (its own connections to them are captured and carried
    /// to those gateways, which check this node's identity).
    #[serde(default)]
    pub remote: Vec<RemoteSite>,
    /// The file's TOML as parsed: a reload compares its sections to find what changed.
    #[serde(skip)]
    pub source: toml::Table,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Certificate chain, leaf first; the leaf carries exactly one spiffe:// URI SAN.
    pub cert: PathBuf,
    /// The leaf's private key, mode 0600.
    pub key: PathBuf,
    /// Trusted roots of the trust domain.
    pub bundle: PathBuf,
    /// How often the three files are checked for changes.
    #[serde(default = "default_reload_interval", deserialize_with = "de_duration")]
    pub reload_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Where the agent keeps its key (0600), certificate, bundle and control-plane state, so a
    /// restart needs no new token.
    pub data_dir: PathBuf,
    /// A join token from `tapproof server token create`; used once, on the first start.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the token (instead of `token`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The server's address (`host:port`), overriding the one in the token.
    #[serde(default)]
    pub server: Option<String>,
    /// The name this node gives itself when it joins with a reusable token (one with a node
    /// pattern); default: the host name, lowercased. A single-use token names the node itself.
    #[serde(default)]
    pub node: Option<String>,
    /// How often the identity files are checked for changes (they change at renewal).
    #[serde(default = "default_reload_interval", deserialize_with = "de_duration")]
    pub reload_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// /metrics, /healthz, /readyz and /v1/status. Plain HTTP: keep it on loopback.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// Where peers' tunnels arrive (only bound when there is an [[inbound]]).
    #[serde(default = "default_tunnel_listen")]
    pub listen: SocketAddr,
    /// Where peers reach this tunnel listener (announced to the control plane's directory);
    /// default: `listen`, when that is a specific address.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// Refuse handshakes that did not use a post-quantum group (X25519MLKEM768 or ML-KEM-1024).
    #[serde(default)]
    pub require_post_quantum: bool,
    /// `default`, `cnsa2` (AES-256-GCM, ML-KEM-1024 and ML-DSA-87 only) or `fips` (not in this
    /// build: refused).
    #[serde(default, deserialize_with = "de_profile")]
    pub crypto_profile: tapproof_tls::CryptoProfile,
    /// How often the self-test probes run against the tunnel listener (`selftest.rs`); 0: only
    /// on demand (`POST /v1/selftest`).
    #[serde(default = "default_selftest_interval", deserialize_with = "de_duration")]
    pub selftest_interval: Duration,
    #[serde(default = "default_handshake_timeout", deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    /// For TCP connects, to peers and to `forward` addresses.
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// On SIGTERM, how long open streams may run before the agent exits anyway.
    #[serde(default = "default_drain_timeout", deserialize_with = "de_duration")]
    pub drain_timeout: Duration,
    /// Streams one tunnel carries at once; further app connections wait for a slot.
    #[serde(default = "default_max_streams")]
    pub max_concurrent_streams: u32,
    #[serde(default = "default_stream_window")]
    pub stream_window: u32,
    #[serde(default = "default_connection_window")]
    pub connection_window: u32,
    #[serde(default = "default_max_frame")]
    pub max_frame_size: u32,
    /// Connections on the tunnel port whose handshake has not finished, in total; beyond it new
    /// ones are closed at once.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes_in_progress: usize,
    /// The same, from one source address.
    #[serde(default = "default_max_handshakes_per_source")]
    pub max_handshakes_per_source: usize,
    /// Tunnels one peer identity may hold open to this agent.
    #[serde(default = "default_max_tunnels_per_peer")]
    pub max_tunnels_per_peer: usize,
    /// Streams one peer identity may hold open (over all its tunnels), never more than half the
    /// fd budget.
    #[serde(default = "default_max_streams_per_peer")]
    pub max_streams_per_peer: usize,
    /// Connects to one service's `forward` address in progress at once.
    #[serde(default = "default_max_connects_per_service")]
    pub max_connects_per_service: usize,
    /// The largest header block a peer may send (h2 SETTINGS_MAX_HEADER_LIST_SIZE); a CONNECT
    /// request needs a few hundred bytes.
    #[serde(default = "default_max_header_list")]
    pub max_header_list_size: u32,
    /// Streams a peer may open and reset before they are accepted (rapid reset), per tunnel;
    /// beyond it the tunnel gets GOAWAY (a protocol abuse by that peer).
    #[serde(default = "default_max_pending_resets")]
    pub max_pending_accept_resets: usize,
    /// Bytes a tunnel sends under one traffic key before it updates it (TLS 1.3 KeyUpdate,
    /// asking the peer to update its own).
    #[serde(default = "default_key_update_bytes")]
    pub key_update_bytes: u64,
    /// The longest a tunnel sends under one traffic key; the update goes with the next write.
    #[serde(default = "default_key_update_interval", deserialize_with = "de_duration")]
    pub key_update_interval: Duration,
    /// How often a tunnel this agent opened PINGs the peer (HTTP/2 PING).
    #[serde(default = "default_ping_interval", deserialize_with = "de_duration")]
    pub ping_interval: Duration,
    /// A PING unanswered this long retires the tunnel: new streams go to the next peer, open ones
    /// stay on it.
    #[serde(default = "default_ping_timeout", deserialize_with = "de_duration")]
    pub ping_timeout: Duration,
    /// The receive buffer of each tunnel socket, bytes; 0: the kernel's autotuning (up to
    /// net.ipv4.tcp_rmem's maximum). A receiver busier than the link lets this much queue up
    /// ahead of every stream's next frame; see the README's tuning table.
    #[serde(default)]
    pub receive_buffer: u32,
}

impl TunnelConfig {
    pub fn key_schedule(&self) -> tapproof_tls::KeySchedule {
        tapproof_tls::KeySchedule {
            bytes: self.key_update_bytes,
            interval: self.key_update_interval,
        }
    }
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            listen: default_tunnel_listen(),
            advertise: None,
            require_post_quantum: false,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_concurrent_streams: DEFAULT_MAX_STREAMS,
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_frame_size: DEFAULT_MAX_FRAME,
            max_handshakes_in_progress: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            max_tunnels_per_peer: DEFAULT_MAX_TUNNELS_PER_PEER,
            max_streams_per_peer: DEFAULT_MAX_STREAMS_PER_PEER,
            max_connects_per_service: DEFAULT_MAX_CONNECTS_PER_SERVICE,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST,
            max_pending_accept_resets: DEFAULT_MAX_PENDING_RESETS,
            key_update_bytes: DEFAULT_KEY_UPDATE_BYTES,
            key_update_interval: DEFAULT_KEY_UPDATE_INTERVAL,
            ping_interval: DEFAULT_PING_INTERVAL,
            ping_timeout: DEFAULT_PING_TIMEOUT,
            receive_buffer: 0,
            crypto_profile: tapproof_tls::CryptoProfile::Default,
            selftest_interval: DEFAULT_SELFTEST_INTERVAL,
        }
    }
}

/// `capture.inbound`: what happens to plaintext from the network to this host's inbound ports.
pub use tapproof_audit::InboundMode;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    #[serde(default)]
    pub inbound: InboundMode,
    /// The port of the capture listener (on 127.0.0.1 and ::1), where the `capture` outbounds'
    /// connections are redirected.
    #[serde(default = "default_capture_port")]
    pub port: u16,
    /// The socket mark of the agent's own connections, exempt from capture.
    #[serde(default = "default_capture_mark")]
    pub mark: u32,
    /// Capture every destination the control plane's service directory lists (the addresses
    /// where other agents' inbound services are reached), each carried to the node that
    /// announced it. Needs `[control]`.
    #[serde(default)]
    pub directory: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            inbound: InboundMode::Off,
            port: DEFAULT_CAPTURE_PORT,
            mark: DEFAULT_CAPTURE_MARK,
            directory: false,
        }
    }
}

/// `[gateway]`: a site gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The local networks this gateway fronts (CIDR): where remote sites' streams may go, and
    /// whose routed traffic to remote sites it captures.
    #[serde(deserialize_with = "de_networks")]
    pub networks: Vec<tapproof_audit::allow::Network>,
    #[serde(default)]
    pub remote: Vec<RemoteSite>,
    /// This site's name, as the reports and the dashboard show it (default: none).
    #[serde(default)]
    pub site: String,
    /// A UDP flow (one source address and port to one destination) ends after this long
    /// without a datagram either way.
    #[serde(default = "default_udp_idle_timeout", deserialize_with = "de_duration")]
    pub udp_idle_timeout: Duration,
    /// The packet mark the rules give routed UDP they hand to the agent (TPROXY), and the
    /// routing table that delivers packets with that mark locally (`ip rule fwmark .. lookup ..`).
    #[serde(default = "default_udp_mark")]
    pub udp_mark: u32,
    #[serde(default = "default_udp_route_table")]
    pub udp_route_table: u32,
}

pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_UDP_MARK: u32 = 0x7470_0002;
pub const DEFAULT_UDP_ROUTE_TABLE: u32 = 15006;
fn default_udp_idle_timeout() -> Duration {
    DEFAULT_UDP_IDLE_TIMEOUT
}
fn default_udp_mark() -> u32 {
    DEFAULT_UDP_MARK
}
fn default_udp_route_table() -> u32 {
    DEFAULT_UDP_ROUTE_TABLE
}

/// `[[gateway.remote]]`: another site, reached through its gateways.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteSite {
    pub name: String,
    /// Networks behind the remote site's gateways (CIDR).
    #[serde(deserialize_with = "de_networks")]
    pub networks: Vec<tapproof_audit::allow::Network>,
    /// The remote gateways' tunnel addresses, tried in turn.
    pub gateways: Vec<Endpoint>,
    /// The identity the remote gateways prove, and the one allowed to reach the local networks.
    #[serde(deserialize_with = "de_from_str")]
    pub server_id: SpiffeId,
    /// On a gateway: the identities of that site's hosts that may reach the local networks
    /// through their own tunnels (hosts with an agent and `[[remote]]`): exact IDs or `<id>/*`.
    #[serde(default)]
    pub allow: Vec<AllowPattern>,
    /// On a gateway: what flows from that site may reach here. None: any local address and
    /// port. Otherwise a flow must match one entry.
    #[serde(default)]
    pub policy: Vec<SitePolicy>,
}

/// `[[gateway.remote.policy]]`: flows from a remote site admitted by source network,
/// destination network and port (an empty list matches anything).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SitePolicy {
    /// The flow's source: the host behind the remote gateways (the gateway says which, in the
    /// stream's `tapproof-source` header), or the host agent's own address.
    #[serde(default, deserialize_with = "de_networks")]
    pub from: Vec<tapproof_audit::allow::Network>,
    /// The destination, within this gateway's networks.
    #[serde(default, deserialize_with = "de_networks")]
    pub to: Vec<tapproof_audit::allow::Network>,
    /// Destination ports: numbers, or ranges as `"8000-8100"`.
    #[serde(default, deserialize_with = "de_ports")]
    pub ports: Vec<(u16, u16)>,
}

impl SitePolicy {
    pub fn matches(&self, source: Option<std::net::IpAddr>, destination: SocketAddr) -> bool {
        let from = self.from.is_empty() || source.is_some_and(|ip| self.from.iter().any(|n| n.contains(ip)));
        let to = self.to.is_empty() || self.to.iter().any(|n| n.contains(destination.ip()));
        let port = destination.port();
        let ports = self.ports.is_empty() || self.ports.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port));
        from && to && ports
    }
}

fn de_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u16, u16)>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        One(u16),
        Range(String),
    }
    Vec::<Port>::deserialize(d)?
        .into_iter()
        .map(|p| match p {
            Port::One(0) => Err(serde::de::Error::custom("port 0 is not a port")),
            Port::One(n) => Ok((n, n)),
            Port::Range(r) => {
                let bad = || {
                    serde::de::Error::custom(format!("{r:?} is not a port or a range \"LOW-HIGH\" (1-65535)"))
                };
                let (lo, hi) = r.split_once('-').unwrap_or((&r, &r));
                let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
                let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
                if lo == 0 || lo > hi {
                    return Err(bad());
                }
                Ok((lo, hi))
            }
        })
        .collect()
}

fn de_networks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<tapproof_audit::allow::Network>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|n| n.parse().map_err(serde::de::Error::custom))
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// The name peers ask for (the CONNECT authority).
    pub service: String,
    /// The plaintext address streams are joined to: IP:PORT or HOST:PORT (resolved at most every
    /// 30 s).
    pub forward: Endpoint,
    /// SPIFFE IDs that may open this service: exact IDs, or a prefix ending in `/*`.
    #[serde(default)]
    pub allow: Vec<AllowPattern>,
    /// Permit a `forward` address off this host (its traffic then crosses a network in plaintext).
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// Where clients on other hosts reach this service (`ADDR:PORT`), announced in the control
    /// plane's directory so that their agents (`capture.directory`) capture those connections.
    /// Default: the advertised tunnel address's IP with the forward's port, when the forward is
    /// on this host.
    #[serde(default)]
    pub addresses: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// The plaintext side, where local apps connect. Exactly one of `listen` and `capture`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Transparent capture: this host's connections to this address (the service's real address
    /// and port) are redirected to the agent by nftables and carried through the tunnel.
    #[serde(default)]
    pub capture: Option<SocketAddr>,
    /// The service asked for at the peer.
    pub service: String,
    /// Peer agents' tunnel addresses (IP:PORT or HOST:PORT, a name resolved at every dial), tried
    /// in turn. Leave out (with `server_id`) to take them from the control plane's service
    /// directory.
    #[serde(default)]
    pub peers: Vec<Endpoint>,
    /// The identity the peer agent must prove (with `peers`).
    #[serde(default, deserialize_with = "de_opt_from_str")]
    pub server_id: Option<SpiffeId>,
    /// Permit a `listen` address reachable from the network (plaintext accepted from off-host).
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// Set for a route to a remote site's gateways (`gateway::route`): the site's name, the
    /// metric label and the site ledger's key. Never in a config file.
    #[serde(skip)]
    pub site: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// The other trust domain.
    #[serde(deserialize_with = "de_from_str")]
    pub trust_domain: TrustDomain,
    /// Its roots (PEM), as obtained out of band: the whole of a static federation, and the
    /// bundle the endpoint is first checked against when `endpoint` is given.
    pub bundle: PathBuf,
    /// Its SPIFFE bundle endpoint, `https://HOST:PORT/PATH` (https_spiffe profile; a tapproof
    /// server serves `/v1/spiffe-bundle`). Fetched at start and then as its refresh hint says.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The SPIFFE ID the endpoint's server must prove (with `endpoint`), in `trust_domain`.
    #[serde(default, deserialize_with = "de_opt_from_str")]
    pub endpoint_id: Option<SpiffeId>,
    /// Fetch this often instead of as the endpoint's refresh hint says (at least 1 s).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub refresh_interval: Option<Duration>,
}

/// `https://HOST:PORT/PATH` of a bundle endpoint, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEndpoint {
    /// `HOST:PORT`, as the control-plane client dials it.
    pub authority: String,
    pub path: String,
}

impl BundleEndpoint {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("https://").ok_or_else(|| {
            format!("{url:?} is not an https:// URL (a bundle endpoint is served over TLS)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') || path.contains(['?', '#', ' ']) {
            return Err(format!(
                "{url:?}: give https://HOST:PORT/PATH, with no user, query or fragment"
            ));
        }
        match authority.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => return Err(format!("{url:?} does not name HOST:PORT (the port is required)")),
        }
        Ok(Self {
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }
}

impl AgentConfig {
    /// Whether IDs of `td` can be peers: ours, or a federated domain.
    pub fn knows_trust_domain(&self, td: &TrustDomain) -> bool {
        *td == self.trust_domain || self.federation.iter().any(|f| f.trust_domain == *td)
    }

    /// What an ID of an unknown trust domain is told.
    fn unknown_trust_domain(&self, id: &dyn std::fmt::Display) -> String {
        format!(
            "{id} is not in trust domain {} nor in a federated one (add a [[federation]] entry for its trust domain)",
            self.trust_domain
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadApiConfig {
    /// The Unix socket the Workload API is served on (mode 0666: who gets what is decided by the
    /// caller's user, from the kernel). A stale socket file there is replaced.
    pub socket: PathBuf,
    /// Which local users get which identities. Without any, root and the agent's own user get
    /// the node's identity (both can read its key file anyway) and nobody else gets anything.
    #[serde(default)]
    pub caller: Vec<WorkloadCaller>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadCaller {
    /// The caller's user ID (as the kernel reports it for the socket: SO_PEERCRED).
    #[serde(default)]
    pub uid: Option<u32>,
    /// The caller's user name (looked up in the user database at each call); instead of `uid`.
    #[serde(default)]
    pub user: Option<String>,
    /// Give this caller the node's own identity (its key is the node's key).
    #[serde(default)]
    pub node: bool,
    /// Services registered to this node (control plane) whose identities
    /// `spiffe://<td>/svc/<name>` this caller gets.
    #[serde(default)]
    pub services: Vec<String>,
}

pub fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN.parse().expect("constant is a valid address")
}
fn default_tunnel_listen() -> SocketAddr {
    DEFAULT_TUNNEL_LISTEN
        .parse()
        .expect("constant is a valid address")
}
fn default_capture_port() -> u16 {
    DEFAULT_CAPTURE_PORT
}
fn default_capture_mark() -> u32 {
    DEFAULT_CAPTURE_MARK
}
fn default_reload_interval() -> Duration {
    DEFAULT_RELOAD_INTERVAL
}
fn default_handshake_timeout() -> Duration {
    DEFAULT_HANDSHAKE_TIMEOUT
}
fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_drain_timeout() -> Duration {
    DEFAULT_DRAIN_TIMEOUT
}
fn default_max_streams() -> u32 {
    DEFAULT_MAX_STREAMS
}
fn default_stream_window() -> u32 {
    DEFAULT_STREAM_WINDOW
}
fn default_connection_window() -> u32 {
    DEFAULT_CONNECTION_WINDOW
}
fn default_max_frame() -> u32 {
    DEFAULT_MAX_FRAME
}
fn default_max_handshakes() -> usize {
    DEFAULT_MAX_HANDSHAKES
}
fn default_max_handshakes_per_source() -> usize {
    DEFAULT_MAX_HANDSHAKES_PER_SOURCE
}
fn default_max_tunnels_per_peer() -> usize {
    DEFAULT_MAX_TUNNELS_PER_PEER
}
fn default_max_streams_per_peer() -> usize {
    DEFAULT_MAX_STREAMS_PER_PEER
}
fn default_max_connects_per_service() -> usize {
    DEFAULT_MAX_CONNECTS_PER_SERVICE
}
fn default_max_header_list() -> u32 {
    DEFAULT_MAX_HEADER_LIST
}
fn default_max_pending_resets() -> usize {
    DEFAULT_MAX_PENDING_RESETS
}
fn default_key_update_bytes() -> u64 {
    DEFAULT_KEY_UPDATE_BYTES
}
fn default_key_update_interval() -> Duration {
    DEFAULT_KEY_UPDATE_INTERVAL
}
fn default_ping_interval() -> Duration {
    DEFAULT_PING_INTERVAL
}
fn default_ping_timeout() -> Duration {
    DEFAULT_PING_TIMEOUT
}

fn de_from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn de_opt_from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    de_from_str(d).map(Some)
}

impl TunnelConfig {
    /// What the TLS configs allow: `crypto_profile`, and `require_post_quantum` on the default.
    pub fn crypto_policy(&self) -> tapproof_tls::CryptoPolicy {
        self.crypto_profile.policy(self.require_post_quantum)
    }
}

pub const DEFAULT_SELFTEST_INTERVAL: Duration = Duration::from_secs(3600);
fn default_selftest_interval() -> Duration {
    DEFAULT_SELFTEST_INTERVAL
}

fn de_profile<'de, D: Deserializer<'de>>(d: D) -> Result<tapproof_tls::CryptoProfile, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!("{e} (write durations like \"500ms\", \"30s\", \"5m\")"))
    })
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// Service names travel as the CONNECT authority and become `spiffe://<td>/svc/<name>`, so they
/// follow the SPIFFE path-segment alphabet.
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

impl AgentConfig {
    /// How often identity files are checked, from whichever identity section is in use.
    pub fn reload_interval(&self) -> Duration {
        match (&self.identity, &self.control) {
            (Some(i), _) => i.reload_interval,
            (_, Some(c)) => c.reload_interval,
            _ => DEFAULT_RELOAD_INTERVAL,
        }
    }

    /// Whether this agent installs capture rules at start: an outbound with `capture`, directory
    /// capture, an inbound mode, or the gateway role. (The control plane's policy may ask an
    /// agent without any of them for an inbound mode later: `capture.rs`.)
    pub fn uses_capture(&self) -> bool {
        self.capture.inbound != InboundMode::Off
            || self.capture.directory
            || self.gateway.is_some()
            || !self.remote.is_empty()
            || self.outbound.iter().any(|o| o.capture.is_some())
    }

    /// The other sites this agent reaches through their gateways: a gateway's
    /// `[[gateway.remote]]`, or a host's `[[remote]]`.
    pub fn remote_sites(&self) -> &[RemoteSite] {
        match &self.gateway {
            Some(g) => &g.remote,
            None => &self.remote,
        }
    }

    /// The mark and routing table that bring UDP to remote sites' networks to the agent
    /// (`capture/route.rs`): a gateway's `udp_mark` and `udp_route_table`, the defaults of both
    /// for a host with `[[remote]]`; `None` when this agent carries no UDP.
    pub fn udp_capture(&self) -> Option<(u32, u32)> {
        match &self.gateway {
            Some(g) => Some((g.udp_mark, g.udp_route_table)),
            None if !self.remote.is_empty() => Some((DEFAULT_UDP_MARK, DEFAULT_UDP_ROUTE_TABLE)),
            None => None,
        }
    }

    /// Whether the tunnel listener runs: there are inbound services, or remote sites' gateways
    /// connect to this one.
    pub fn serves_tunnels(&self) -> bool {
        !self.inbound.is_empty() || self.gateway.is_some()
    }

    /// What the audit needs to know about this agent: where apps reach its outbound listeners and
    /// which of its forward targets are off this host.
    pub fn audit_known(&self) -> tapproof_audit::Known {
        tapproof_audit::Known {
            outbound_listeners: self
                .outbound
                .iter()
                .filter_map(|o| o.listen)
                .filter(|l| !l.ip().is_loopback())
                .collect(),
            // A forward given as a host name is not known here (it is resolved when used).
            forwards: self
                .inbound
                .iter()
                .filter_map(|i| i.forward.addr())
                .filter(|a| !a.ip().is_loopback())
                .collect(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(path, &text)?;
        // Relative paths are relative to the config file, not to the working directory, so a
        // config means the same thing however the agent is started.
        if let Some(dir) = path.parent() {
            let mut files: Vec<&mut PathBuf> = Vec::new();
            if let Some(id) = config.identity.as_mut() {
                files.extend([&mut id.cert, &mut id.key, &mut id.bundle]);
            }
            if let Some(c) = config.control.as_mut() {
                files.push(&mut c.data_dir);
                if let Some(t) = c.token_file.as_mut() {
                    files.push(t);
                }
            }
            for file in files {
                if file.is_relative() {
                    *file = dir.join(&*file);
                }
            }
        }
        Ok(config)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let mut config: Self = toml::from_str(text).map_err(parse_error)?;
        config.source = toml::from_str(text).map_err(parse_error)?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        if let Err(tapproof_audit::AllowError::Invalid { index, detail }) =
            tapproof_audit::validate(&self.audit.allow)
        {
            return Err(invalid(format!("audit.allow[{index}]"), detail));
        }
        match (&self.identity, &self.control) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "identity".into(),
                    "give either [identity] (your own PKI) or [control] (the tapproof server), not both"
                        .into(),
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "identity".into(),
                    "missing: give [identity] (certificate files) or [control] (join the tapproof server)"
                        .into(),
                ))
            }
            _ => {}
        }
        if self.reload_interval().is_zero() {
            return Err(invalid(
                "identity.reload_interval".into(),
                "must be more than zero".into(),
            ));
        }
        if let Some(c) = &self.control {
            if c.token.is_some() && c.token_file.is_some() {
                return Err(invalid(
                    "control.token".into(),
                    "give token or token_file, not both".into(),
                ));
            }
        }
        let t = &self.tunnel;
        if !(16_384..=16_777_215).contains(&t.max_frame_size) {
            return Err(invalid(
                "tunnel.max_frame_size".into(),
                "must be between 16384 and 16777215 (HTTP/2 limits)".into(),
            ));
        }
        for (key, v) in [
            ("tunnel.stream_window", t.stream_window),
            ("tunnel.connection_window", t.connection_window),
        ] {
            if !(65_535..=2_147_483_647).contains(&v) {
                return Err(invalid(
                    key.into(),
                    "must be between 65535 and 2147483647 (HTTP/2 limits)".into(),
                ));
            }
        }
        if t.key_update_bytes < 16_384 {
            return Err(invalid(
                "tunnel.key_update_bytes".into(),
                "must be at least 16384 (one TLS record)".into(),
            ));
        }
        if t.key_update_interval < Duration::from_secs(1) {
            return Err(invalid(
                "tunnel.key_update_interval".into(),
                "must be at least 1s".into(),
            ));
        }
        for (key, v) in [
            ("tunnel.ping_interval", t.ping_interval),
            ("tunnel.ping_timeout", t.ping_timeout),
        ] {
            if v < Duration::from_millis(100) {
                return Err(invalid(key.into(), "must be at least 100ms".into()));
            }
        }
        if t.receive_buffer != 0 && !(65_536..=1 << 30).contains(&t.receive_buffer) {
            return Err(invalid(
                "tunnel.receive_buffer".into(),
                "must be 0 (the kernel's autotuning) or between 65536 and 1073741824".into(),
            ));
        }
        if !t.selftest_interval.is_zero() && t.selftest_interval < Duration::from_secs(10) {
            return Err(invalid(
                "tunnel.selftest_interval".into(),
                "must be 0 (on demand only) or at least 10s".into(),
            ));
        }
        if let Err(why) = t.crypto_profile.available() {
            return Err(invalid("tunnel.crypto_profile".into(), why.into()));
        }
        if t.max_concurrent_streams == 0 {
            return Err(invalid(
                "tunnel.max_concurrent_streams".into(),
                "must be at least 1".into(),
            ));
        }
        let mut federated = HashSet::new();
        for (i, f) in self.federation.iter().enumerate() {
            let key = |k: &str| format!("federation[{i}].{k}");
            if f.trust_domain == self.trust_domain {
                return Err(invalid(
                    key("trust_domain"),
                    format!(
                        "{} is this agent's own trust domain; federation names another one",
                        f.trust_domain
                    ),
                ));
            }
            if !federated.insert(&f.trust_domain) {
                return Err(invalid(
                    key("trust_domain"),
                    format!("{} is federated twice", f.trust_domain),
                ));
            }
            if f.refresh_interval.is_some_and(|d| d < Duration::from_secs(1)) {
                return Err(invalid(key("refresh_interval"), "must be at least 1s".into()));
            }
            match (&f.endpoint, &f.endpoint_id) {
                (Some(url), Some(id)) => {
                    BundleEndpoint::parse(url).map_err(|e| invalid(key("endpoint"), e))?;
                    if id.trust_domain() != &f.trust_domain {
                        return Err(invalid(key("endpoint_id"), format!("{id} is not in {}: the endpoint proves an identity of the domain it serves the bundle of", f.trust_domain)));
                    }
                }
                (Some(_), None) => return Err(invalid(key("endpoint_id"), "is missing: name the SPIFFE ID the bundle endpoint proves (a tapproof server: spiffe://<its trust domain>/server)".into())),
                (None, Some(_)) => return Err(invalid(key("endpoint"), "is missing (endpoint_id names the identity of an endpoint)".into())),
                (None, None) if f.refresh_interval.is_some() => return Err(invalid(key("refresh_interval"), "is set but there is no endpoint to fetch from".into())),
                (None, None) => {}
            }
        }
        let mut services = HashSet::new();
        for (i, inbound) in self.inbound.iter().enumerate() {
            let key = |k: &str| format!("inbound[{i}].{k}");
            if !valid_service_name(&inbound.service) {
                return Err(invalid(
                    key("service"),
                    format!(
                        "{:?} is not a valid service name (letters, digits, '.', '-', '_')",
                        inbound.service
                    ),
                ));
            }
            if !services.insert(inbound.service.as_str()) {
                return Err(invalid(
                    key("service"),
                    format!("service {:?} is configured twice", inbound.service),
                ));
            }
            if !inbound.forward.is_loopback() && !inbound.allow_non_loopback {
                let what = match inbound.forward {
                    Endpoint::Addr(_) => "is not a loopback address",
                    Endpoint::Name { .. } => {
                        "names a host that may not be this one (only `localhost` surely is)"
                    }
                };
                return Err(invalid(key("forward"), format!("{} {what}: the plaintext leg would cross a network; set allow_non_loopback = true to accept that", inbound.forward)));
            }
            if inbound.allow.is_empty() && self.control.is_none() {
                return Err(invalid(
                    key("allow"),
                    "is empty, so no peer could use this service; list the SPIFFE IDs that may (or take them from the control plane's policy with [control])".into(),
                ));
            }
            for (j, pattern) in inbound.allow.iter().enumerate() {
                if !self.knows_trust_domain(pattern.trust_domain()) {
                    return Err(invalid(
                        format!("inbound[{i}].allow[{j}]"),
                        format!("{}; it could never match", self.unknown_trust_domain(pattern)),
                    ));
                }
            }
        }
        if let Some(w) = &self.workload_api {
            if !w.socket.is_absolute() {
                return Err(invalid(
                    "workload_api.socket".into(),
                    format!("{} is not an absolute path", w.socket.display()),
                ));
            }
            for (i, c) in w.caller.iter().enumerate() {
                let key = |k: &str| format!("workload_api.caller[{i}].{k}");
                match (&c.uid, &c.user) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(key("uid"), "give uid or user, not both".into()))
                    }
                    (None, None) => {
                        return Err(invalid(
                            key("uid"),
                            "missing: name the caller by uid or user".into(),
                        ))
                    }
                    (None, Some(u)) if u.is_empty() => return Err(invalid(key("user"), "is empty".into())),
                    _ => {}
                }
                if !c.node && c.services.is_empty() {
                    return Err(invalid(
                        key("services"),
                        "is empty and node is false: this caller would get nothing".into(),
                    ));
                }
                for (j, service) in c.services.iter().enumerate() {
                    if !valid_service_name(service) {
                        return Err(invalid(
                            format!("workload_api.caller[{i}].services[{j}]"),
                            format!(
                                "{service:?} is not a valid service name (letters, digits, '.', '-', '_')"
                            ),
                        ));
                    }
                    if self.control.is_none() {
                        return Err(invalid(format!("workload_api.caller[{i}].services[{j}]"), "service identities come from the control plane, and this agent has no [control]; give node = true instead".into()));
                    }
                }
            }
        }
        for (i, inbound) in self.inbound.iter().enumerate() {
            for (j, a) in inbound.addresses.iter().enumerate() {
                if a.ip().is_unspecified() || a.ip().is_multicast() || a.port() == 0 {
                    return Err(invalid(format!("inbound[{i}].addresses[{j}]"), format!("{a} is not an address clients can dial: give the IP and port they connect to (not 0.0.0.0, :: or port 0)")));
                }
            }
        }
        if let Some(g) = &self.gateway {
            self.check_gateway(g)
                .map_err(|(key, message)| invalid(key, message))?;
            if !self.remote.is_empty() {
                return Err(invalid(
                    "remote".into(),
                    "a gateway lists its remote sites in [[gateway.remote]]; [[remote]] is for hosts that are not gateways".into(),
                ));
            }
        } else {
            self.check_sites(&self.remote, "remote", &[])
                .map_err(|(key, message)| invalid(key, message))?;
            if let Some(i) = self
                .remote
                .iter()
                .position(|s| !s.allow.is_empty() || !s.policy.is_empty())
            {
                let what = if self.remote[i].allow.is_empty() {
                    "policy"
                } else {
                    "allow"
                };
                return Err(invalid(
                    format!("remote[{i}].{what}"),
                    "only a gateway admits a site's flows; a host's [[remote]] has no allow or policy".into(),
                ));
            }
            if !self.remote.is_empty() && self.capture.mark == DEFAULT_UDP_MARK {
                return Err(invalid(
                    "capture.mark".into(),
                    format!("must differ from {DEFAULT_UDP_MARK:#x}: with [[remote]] that mark sends this host's UDP to remote sites through the agent"),
                ));
            }
        }
        let mut listens = HashSet::new();
        let mut captures = HashSet::new();
        if self.capture.directory && self.control.is_none() {
            return Err(invalid(
                "capture.directory".into(),
                "needs [control]: the destinations come from the control plane's service directory (files-only setups list them as [[outbound]] capture entries)".into(),
            ));
        }
        if self.capture.port == 0 {
            return Err(invalid("capture.port".into(), "must not be 0".into()));
        }
        if self.capture.mark == 0 {
            return Err(invalid(
                "capture.mark".into(),
                "must not be 0 (unmarked sockets are the ones captured)".into(),
            ));
        }
        for (i, outbound) in self.outbound.iter().enumerate() {
            let key = |k: &str| format!("outbound[{i}].{k}");
            if !valid_service_name(&outbound.service) {
                return Err(invalid(
                    key("service"),
                    format!(
                        "{:?} is not a valid service name (letters, digits, '.', '-', '_')",
                        outbound.service
                    ),
                ));
            }
            match (outbound.listen, outbound.capture) {
                (Some(_), Some(_)) => return Err(invalid(key("capture"), "give listen (apps dial the agent) or capture (apps dial the service's real address), not both".into())),
                (None, None) => return Err(invalid(key("listen"), "missing: give listen (a loopback address apps dial) or capture (the service's real ADDR:PORT, redirected transparently)".into())),
                (Some(listen), None) => {
                    if !listen.ip().is_loopback() && !outbound.allow_non_loopback {
                        return Err(invalid(key("listen"), format!("{listen} is not a loopback address: apps off this host could send plaintext to it; set allow_non_loopback = true to accept that")));
                    }
                    if listen.port() != 0 && !listens.insert(listen) {
                        return Err(invalid(key("listen"), format!("{listen} is used by another [[outbound]]")));
                    }
                }
                (None, Some(capture)) => {
                    let ip = capture.ip();
                    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || capture.port() == 0 {
                        return Err(invalid(key("capture"), format!("{capture} is not a remote service address: give the IP and port clients dial (not loopback, 0.0.0.0 or port 0)")));
                    }
                    if !captures.insert(capture) {
                        return Err(invalid(key("capture"), format!("{capture} is captured by another [[outbound]]: one address goes to one service")));
                    }
                    if outbound.allow_non_loopback {
                        return Err(invalid(key("allow_non_loopback"), "applies to listen; a capture outbound has no listener apps off this host could reach".into()));
                    }
                }
            }
            match (outbound.peers.is_empty(), &outbound.server_id) {
                (true, None) if self.control.is_none() => {
                    return Err(invalid(key("peers"), "is empty; list the peer agents' tunnel addresses and server_id, or use [control] to find them in the service directory".into()));
                }
                (true, None) => {}
                (true, Some(_)) => {
                    return Err(invalid(key("peers"), "is empty; list at least one peer agent's tunnel address (or leave out server_id too, to use the directory)".into()));
                }
                (false, None) => {
                    return Err(invalid(
                        key("server_id"),
                        "is missing: name the SPIFFE ID the peers must prove".into(),
                    ));
                }
                (false, Some(id)) if !self.knows_trust_domain(id.trust_domain()) => {
                    return Err(invalid(key("server_id"), self.unknown_trust_domain(id)));
                }
                (false, Some(_)) => {}
            }
        }
        Ok(())
    }
}

impl AgentConfig {
    /// The gateway's rules a type cannot express: something to front and somewhere to go, no
    /// remote network that is local (a route loop) or that two sites claim.
    fn check_gateway(&self, g: &GatewayConfig) -> Result<(), (String, String)> {
        if g.networks.is_empty() {
            return Err((
                "gateway.networks".into(),
                "is empty: list the local networks this gateway fronts (CIDR)".into(),
            ));
        }
        if g.remote.is_empty() {
            return Err((
                "gateway.remote".into(),
                "is empty: add a [[gateway.remote]] site to reach".into(),
            ));
        }
        if g.udp_mark == 0 || g.udp_mark == self.capture.mark {
            return Err((
                "gateway.udp_mark".into(),
                format!("must be non-zero and differ from capture.mark ({:#x}): packets with this mark are routed to this host", self.capture.mark),
            ));
        }
        // 0 is unspecified; 253-255 are the kernel's default, main and local tables.
        if g.udp_route_table == 0 || (253..=255).contains(&g.udp_route_table) {
            return Err((
                "gateway.udp_route_table".into(),
                "must not be 0, 253 (default), 254 (main) or 255 (local): the gateway owns this table".into(),
            ));
        }
        if g.udp_idle_timeout < Duration::from_secs(1) {
            return Err(("gateway.udp_idle_timeout".into(), "must be at least 1s".into()));
        }
        self.check_sites(&g.remote, "gateway.remote", &g.networks)
    }

    /// Remote sites (a gateway's or a host's, listed under `list`): named once each, something
    /// to reach and someone to reach it through, no network that is `local` (a route loop) or
    /// that two sites claim.
    fn check_sites(
        &self,
        sites: &[RemoteSite],
        list: &str,
        local: &[tapproof_audit::allow::Network],
    ) -> Result<(), (String, String)> {
        let mut names = HashSet::new();
        for (i, site) in sites.iter().enumerate() {
            let key = |k: &str| format!("{list}[{i}].{k}");
            if !valid_service_name(&site.name) || !names.insert(site.name.as_str()) {
                return Err((
                    key("name"),
                    format!(
                        "{:?} is not a name (letters, digits, '.', '-', '_') or names two sites",
                        site.name
                    ),
                ));
            }
            if site.networks.is_empty() {
                return Err((
                    key("networks"),
                    "is empty: list the networks behind that site's gateways".into(),
                ));
            }
            if site.gateways.is_empty() {
                return Err((
                    key("gateways"),
                    "is empty: list the remote gateways' tunnel addresses".into(),
                ));
            }
            if !self.knows_trust_domain(site.server_id.trust_domain()) {
                return Err((key("server_id"), self.unknown_trust_domain(&site.server_id)));
            }
            for (k, rule) in site.policy.iter().enumerate() {
                if let Some(n) = rule.to.iter().find(|n| !local.iter().any(|l| l.overlaps(n))) {
                    return Err((
                        key(&format!("policy[{k}].to")),
                        format!(
                            "{n} is not within this gateway's networks: no flow from {} could reach it here",
                            site.name
                        ),
                    ));
                }
                if let Some(n) = rule
                    .from
                    .iter()
                    .find(|n| !site.networks.iter().any(|s| s.overlaps(n)))
                {
                    return Err((
                        key(&format!("policy[{k}].from")),
                        format!("{n} is not within {}'s networks", site.name),
                    ));
                }
            }
            for n in &site.networks {
                if let Some(local) = local.iter().find(|l| l.overlaps(n)) {
                    return Err((key("networks"), format!("{n} overlaps this site's own network {local}: its traffic would loop back through the interconnect")));
                }
                for (j, other) in sites.iter().enumerate().take(i) {
                    if let Some(m) = other.networks.iter().find(|m| m.overlaps(n)) {
                        return Err((
                            key("networks"),
                            format!(
                                "{n} overlaps {m} of {list}[{j}] ({}): one destination, one site",
                                other.name
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

//! Prometheus metrics of the agent, served at the admin `/metrics`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::time::Duration;

use tapproof_metrics::{latency, LatencyFamily};

/// Which side of a tunnel: we accepted it (`inbound`) or opened it (`outbound`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Side {
    Inbound,
    Outbound,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// Bytes flow: from the local app into the tunnel, or out of the tunnel to the local app.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Flow {
    AppToTunnel,
    TunnelToApp,
}

impl Flow {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AppToTunnel => "app_to_tunnel",
            Self::TunnelToApp => "tunnel_to_app",
        }
    }
}

// Label values in snake case, as Prometheus users expect (the derive would print `Inbound`).
impl EncodeLabelValue for Side {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl EncodeLabelValue for Flow {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SideLabel {
    pub side: Side,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub side: Side,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: &'static str,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub side: Side,
    pub flow: Flow,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

/// The `service` label of a denial for a name this agent does not serve: peers choose those
/// names, and each distinct label would be a series kept forever.
pub const UNKNOWN_SERVICE: &str = "(unknown)";
/// The service label of a gateway's streams to addresses of its local networks.
pub const GATEWAY_SERVICE: &str = "(gateway)";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabels {
    pub site: String,
    pub direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteFlowLabels {
    pub site: String,
    pub direction: &'static str,
    pub protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteBytesLabels {
    pub site: String,
    pub direction: &'static str,
    pub flow: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowResultLabels {
    pub side: Side,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatagramLabels {
    pub side: Side,
    pub flow: Flow,
}

/// Holds one place in `tapproof_udp_flows_open` while it lives.
pub struct OpenFlow(Gauge);

impl Drop for OpenFlow {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub service: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The API path called (a fixed set: the server's routes), without the query.
    pub route: String,
    /// `answered` (any answer, refusals too) or `unreachable`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub side: Side,
    pub service: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub tunnels: Family<SideLabel, Counter>,
    pub tunnels_open: Family<SideLabel, Gauge>,
    pub streams: Family<ServiceLabels, Counter>,
    pub streams_open: Family<SideLabel, Gauge>,
    pub stream_failures: Family<FailureLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub handshakes: Family<SideLabel, Counter>,
    pub handshake_failures: Family<FailureLabels, Counter>,
    pub tunnel_errors: Family<FailureLabels, Counter>,
    pub key_updates: Family<FailureLabels, Counter>,
    pub selftest_probes: Family<ProbeLabels, Counter>,
    pub selftest_accepted: Gauge,
    pub selftest_last_round: Gauge,
    pub udp_flows: Family<FlowResultLabels, Counter>,
    pub udp_flows_open: Family<SideLabel, Gauge>,
    pub udp_datagrams: Family<DatagramLabels, Counter>,
    pub udp_dropped: Family<FailureLabels, Counter>,
    pub policy_denials: Family<DenialLabels, Counter>,
    pub limit_refusals: Family<LimitLabels, Counter>,
    pub cert_expiry_seconds: Gauge,
    pub cert_reloads: Counter,
    pub cert_reload_failures: Counter,
    pub control_plane_up: Gauge,
    pub renewals: Counter,
    pub renewal_failures: Counter,
    pub handshake_duration: LatencyFamily<SideLabel>,
    pub stream_open_duration: Histogram,
    pub control_requests: LatencyFamily<RouteLabels>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub workload_api: Family<WorkloadLabels, Counter>,
    pub federation_refreshes: Family<FederationLabels, Counter>,
    pub federation_roots: Family<TrustDomainLabel, Gauge>,
    pub federation_updated: Family<TrustDomainLabel, Gauge>,
    pub capture_connections: Family<ResultLabels, Counter>,
    pub capture_rules_installed: Gauge,
    pub capture_rules_reinstalled: Counter,
    pub capture_redirected: Gauge,
    pub capture_dropped_packets: Gauge,
    pub capture_attempts: Family<AttemptLabels, Gauge>,
    pub capture_refused: Family<RefusedLabels, Gauge>,
    pub capture_mode: Family<ModeLabels, Gauge>,
    pub capture_destinations: Gauge,
    pub gateway_routed: Gauge,
    pub gateway_dropped: Gauge,
    pub gateway_datagrams: Gauge,
    pub gateway_flows: Family<SiteFlowLabels, Counter>,
    pub gateway_bytes: Family<SiteBytesLabels, Counter>,
    pub gateway_refused: Family<SiteLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// A directory destination that is not captured (this host's own address, or two services
    /// claim it); the log says why.
    pub destination: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub mode: &'static str,
    /// `config` (capture.inbound) or `policy` (the control plane's [capture]).
    pub set_by: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// The source address of the plaintext (the kernel keeps at most 4096 per family).
    pub source: String,
    pub port: String,
    /// `monitor` (let through) or `enforce` (dropped).
    pub mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FederationLabels {
    /// A federated trust domain (from the config: a fixed set).
    pub trust_domain: String,
    /// `ok` (fetched and in force), `unchanged` (fetched, same roots), `unreachable`,
    /// `refused` (the endpoint answered with an error status), `bad_bundle`.
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrustDomainLabel {
    pub trust_domain: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabels {
    /// `fetch_x509_svid` or `fetch_x509_bundles`.
    pub method: &'static str,
    /// `ok`, `no_identity` (the caller is given none), `no_security_header`, `no_peer_credentials`.
    pub result: &'static str,
}

impl Default for Metrics {
    /// The metrics of an agent without a control plane (no `control_plane_*` series).
    fn default() -> Self {
        Self::new(false)
    }
}

impl Metrics {
    /// `control_plane`: whether this agent uses one; only then are `tapproof_control_plane_up`
    /// and the control-plane request histogram exported (an agent on its own PKI has no control
    /// plane to be down).
    pub fn new(control_plane: bool) -> Self {
        let mut root = tapproof_metrics::root_registry();
        let registry = root.sub_registry_with_prefix("tapproof");
        let m = Self {
            handshake_duration: Family::new_with_constructor(latency),
            stream_open_duration: latency(),
            control_requests: Family::new_with_constructor(latency),
            config_reloads: Family::default(),
            workload_api: Family::default(),
            federation_refreshes: Family::default(),
            federation_roots: Family::default(),
            federation_updated: Family::default(),
            capture_connections: Family::default(),
            capture_rules_installed: Gauge::default(),
            capture_rules_reinstalled: Counter::default(),
            capture_redirected: Gauge::default(),
            capture_dropped_packets: Gauge::default(),
            capture_attempts: Family::default(),
            capture_refused: Family::default(),
            capture_mode: Family::default(),
            capture_destinations: Gauge::default(),
            gateway_routed: Gauge::default(),
            gateway_dropped: Gauge::default(),
            gateway_datagrams: Gauge::default(),
            gateway_flows: Family::default(),
            gateway_bytes: Family::default(),
            gateway_refused: Family::default(),
            tunnels: Family::default(),
            tunnels_open: Family::default(),
            streams: Family::default(),
            streams_open: Family::default(),
            stream_failures: Family::default(),
            bytes: Family::default(),
            handshakes: Family::default(),
            handshake_failures: Family::default(),
            tunnel_errors: Family::default(),
            key_updates: Family::default(),
            selftest_probes: Family::default(),
            selftest_accepted: Gauge::default(),
            selftest_last_round: Gauge::default(),
            udp_flows: Family::default(),
            udp_flows_open: Family::default(),
            udp_datagrams: Family::default(),
            udp_dropped: Family::default(),
            policy_denials: Family::default(),
            limit_refusals: Family::default(),
            cert_expiry_seconds: Gauge::default(),
            cert_reloads: Counter::default(),
            cert_reload_failures: Counter::default(),
            control_plane_up: Gauge::default(),
            renewals: Counter::default(),
            renewal_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("tunnels", "TLS tunnel connections established", m.tunnels.clone());
        registry.register(
            "tunnels_open",
            "TLS tunnel connections open now",
            m.tunnels_open.clone(),
        );
        registry.register(
            "streams",
            "Streams (one per app connection) carried",
            m.streams.clone(),
        );
        registry.register("streams_open", "Streams open now", m.streams_open.clone());
        registry.register(
            "stream_failures",
            "App connections or streams that failed, by reason",
            m.stream_failures.clone(),
        );
        registry.register("bytes", "Payload bytes carried, by flow", m.bytes.clone());
        registry.register("handshakes", "Completed TLS handshakes", m.handshakes.clone());
        registry.register(
            "handshake_failures",
            "Failed TLS handshakes, by reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "tunnel_errors",
            "Tunnels closed by a protocol error after the handshake",
            m.tunnel_errors.clone(),
        );
        registry.register(
            "selftest_probes",
            "Self-test probes run against this agent's own tunnel listener (plaintext, tls12, no_client_cert, foreign_ca, wrong_identity, classical_key_exchange), by result: refused (as it must be), accepted (an alarm), not_applicable, error",
            m.selftest_probes.clone(),
        );
        registry.register(
            "selftest_accepted",
            "Probes of the latest self-test round that the tunnel listener accepted: anything above 0 is an alarm",
            m.selftest_accepted.clone(),
        );
        registry.register(
            "selftest_last_round_timestamp_seconds",
            "When the latest self-test round ran (Unix seconds; 0: none yet)",
            m.selftest_last_round.clone(),
        );
        registry.register(
            "tunnel_key_updates",
            "TLS 1.3 KeyUpdates this agent sent on its tunnels ([tunnel] key_update_bytes / key_update_interval), by side and by what made it due (bytes, time)",
            m.key_updates.clone(),
        );
        registry.register(
            "udp_flows",
            "UDP flows (CONNECT-UDP streams) by side and result: opened, or why not (no_route, limit, no_tunnel, refused_by_peer, denied, bad_request, unreachable, failed)",
            m.udp_flows.clone(),
        );
        registry.register("udp_flows_open", "UDP flows open now", m.udp_flows_open.clone());
        registry.register(
            "udp_datagrams",
            "UDP datagrams carried, by side and flow",
            m.udp_datagrams.clone(),
        );
        registry.register(
            "udp_dropped_datagrams",
            "UDP datagrams dropped, by side and reason (queue_full: the flow's queue towards the tunnel was full; flow_limit; no_route; send_failed: the local socket could not take it)",
            m.udp_dropped.clone(),
        );
        registry.register(
            "policy_denials",
            "Streams refused by policy or for an unknown service",
            m.policy_denials.clone(),
        );
        registry.register(
            "limit_refusals",
            "Connections, tunnels or streams refused by a limit (config [tunnel] max_*), by limit",
            m.limit_refusals.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until this agent's certificate expires",
            m.cert_expiry_seconds.clone(),
        );
        registry.register(
            "certificate_reloads",
            "Identity files re-read and swapped in",
            m.cert_reloads.clone(),
        );
        registry.register(
            "certificate_reload_failures",
            "Changed identity files that failed checks (old identity kept)",
            m.cert_reload_failures.clone(),
        );
        if control_plane {
            registry.register(
                "control_plane_up",
                "1 when the control plane answered the last exchange (any call: state feed, renewal, coverage report), 0 when it could not be reached",
                m.control_plane_up.clone(),
            );
            registry.register(
                "renewals",
                "Node certificates renewed from the control plane",
                m.renewals.clone(),
            );
            registry.register(
                "renewal_failures",
                "Failed renewal attempts (the current certificate stays in use)",
                m.renewal_failures.clone(),
            );
            registry.register_with_unit(
                "control_plane_request_duration",
                "Control-plane calls by route and outcome (the state feed is a long-poll: its calls last up to the server's hold time)",
                Unit::Seconds,
                m.control_requests.clone(),
            );
        }
        registry.register_with_unit(
            "handshake_duration",
            "Completed tunnel TLS handshakes: time of the TLS handshake (after TCP connect or accept)",
            Unit::Seconds,
            m.handshake_duration.clone(),
        );
        registry.register_with_unit(
            "stream_open_duration",
            "Outbound streams: time from the app's connection to the peer's answer to CONNECT (a tunnel dial included when one was needed)",
            Unit::Seconds,
            m.stream_open_duration.clone(),
        );
        registry.register(
            "config_reloads",
            "Reloads (SIGHUP) by result: applied, partial (some changes need a restart; see the log) or refused (the file did not load; the running config stays)",
            m.config_reloads.clone(),
        );
        registry.register(
            "workload_api_requests",
            "SPIFFE Workload API calls by method and result (a stream counts once, when it starts)",
            m.workload_api.clone(),
        );
        registry.register(
            "federation_bundle_refreshes",
            "Fetches of a federated trust domain's bundle from its SPIFFE bundle endpoint, by result",
            m.federation_refreshes.clone(),
        );
        registry.register(
            "federation_bundle_roots",
            "Roots in force for each federated trust domain",
            m.federation_roots.clone(),
        );
        registry.register_with_unit(
            "federation_bundle_updated_timestamp",
            "When each federated trust domain's bundle in force was last loaded or confirmed by its endpoint (Unix time)",
            prometheus_client::registry::Unit::Seconds,
            m.federation_updated.clone(),
        );
        registry.register(
            "capture_connections",
            "Connections arriving at the capture listener, by result: accepted (carried as a stream; its failures count in stream_failures), unknown_destination (no route for that address, e.g. the directory is not known yet after a restart; reset), no_original_destination (not redirected by the rules; reset)",
            m.capture_connections.clone(),
        );
        registry.register(
            "capture_rules_installed",
            "1 when the nftables table inet tapproof was in place as configured at the last look (every 5 s), 0 otherwise",
            m.capture_rules_installed.clone(),
        );
        registry.register(
            "capture_rules_reinstalled",
            "Times the agent found its nftables table missing or changed (a firewall reload, `nft flush ruleset`) and installed it again",
            m.capture_rules_reinstalled.clone(),
        );
        registry.register(
            "capture_redirected_connections",
            "Connections the kernel redirected to the capture listener since the rules were installed (nftables counter)",
            m.capture_redirected.clone(),
        );
        registry.register(
            "capture_enforce_dropped_packets",
            "Packets from the network to inbound ports dropped by enforce mode since the rules were installed (nftables counter)",
            m.capture_dropped_packets.clone(),
        );
        registry.register(
            "capture_plaintext_attempts",
            "New-connection packets of plaintext from the network to an inbound port, per source and port, since the rules were installed (nftables per-element counters; a source is forgotten a day after its last packet)",
            m.capture_attempts.clone(),
        );
        registry.register(
            "capture_destinations_refused",
            "1 for each destination the control plane's directory lists that this agent does not capture (an address of this host, or one that two services claim); the log says why",
            m.capture_refused.clone(),
        );
        registry.register(
            "capture_inbound_mode",
            "1 for the inbound mode in force and who set it: config (capture.inbound) or policy (the control plane's [capture], which wins)",
            m.capture_mode.clone(),
        );
        registry.register(
            "capture_destinations",
            "Destinations whose connections from this host are captured into the tunnel ([[outbound]] capture entries and, with capture.directory, the directory's addresses)",
            m.capture_destinations.clone(),
        );
        registry.register(
            "gateway_routed_connections",
            "Routed TCP connections from the local networks to a remote site that the gateway rules redirected into the tunnel since they were installed (nftables counter)",
            m.gateway_routed.clone(),
        );
        registry.register(
            "gateway_dropped_packets",
            "Routed packets to a remote site's networks that the gateway dropped (not TCP or UDP from a local network: other protocols, other sources) since the rules were installed (nftables counter)",
            m.gateway_dropped.clone(),
        );
        registry.register(
            "gateway_flows",
            "Flows between this site and another, by remote site, direction (to: carried there; from: brought here) and protocol",
            m.gateway_flows.clone(),
        );
        registry.register(
            "gateway_bytes",
            "Payload bytes of flows between this site and another, by remote site, direction and flow (sent: towards that site; received: from it), counted as each flow ends",
            m.gateway_bytes.clone(),
        );
        registry.register(
            "gateway_refused_flows",
            "Flows refused, by remote site and direction (from: by identity or site policy here; to: no tunnel to that site)",
            m.gateway_refused.clone(),
        );
        registry.register(
            "gateway_routed_datagrams",
            "Routed UDP datagrams from the local networks to a remote site that the gateway rules handed to the agent (TPROXY) since they were installed (nftables counter)",
            m.gateway_datagrams.clone(),
        );
        tapproof_metrics::register_build_info(registry, "agent");
        Self { registry: root, ..m }
    }

    /// A reload ended with `result` (`applied`, `partial`, `refused`).
    pub fn config_reloaded(&self, result: &'static str) {
        self.config_reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// A completed handshake: counted and its time observed.
    /// Counts the key updates one tunnel sends; the callback its [`tapproof_tls::Rekeying`]
    /// calls.
    pub fn key_update_counter(&self, side: Side) -> tapproof_tls::OnKeyUpdate {
        let family = self.key_updates.clone();
        Box::new(move |why| {
            family
                .get_or_create(&FailureLabels {
                    side,
                    reason: why.as_str(),
                })
                .inc();
        })
    }

    pub fn handshake_done(&self, side: Side, took: Duration) {
        self.handshakes.get_or_create(&SideLabel { side }).inc();
        self.handshake_duration
            .get_or_create(&SideLabel { side })
            .observe(took.as_secs_f64());
    }

    /// What a control-plane client reports of each attempt: `control_plane_up` follows every
    /// exchange, not only renewals.
    pub fn control_plane_observer(&self) -> crate::control::client::Observer {
        let up = self.control_plane_up.clone();
        let requests = self.control_requests.clone();
        std::sync::Arc::new(move |route: &str, took: Duration, answered: bool| {
            up.set(i64::from(answered));
            requests
                .get_or_create(&RouteLabels {
                    route: route.to_owned(),
                    outcome: if answered { "answered" } else { "unreachable" },
                })
                .observe(took.as_secs_f64());
        })
    }

    /// The exposition for a scrape with this `Accept` header: content type and body.
    pub fn render(&self, accept: Option<&str>) -> (&'static str, String) {
        tapproof_metrics::render(&self.registry, accept)
    }

    pub fn handshake_failed(&self, side: Side, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&FailureLabels { side, reason })
            .inc();
    }

    pub fn limit_refused(&self, limit: crate::limits::Limit) {
        self.limit_refusals
            .get_or_create(&LimitLabels {
                limit: limit.as_str(),
            })
            .inc();
    }

    pub fn stream_failed(&self, side: Side, reason: &'static str) {
        self.stream_failures
            .get_or_create(&FailureLabels { side, reason })
            .inc();
    }

    pub fn gateway_flow(&self, site: &str, direction: &'static str, protocol: &'static str) {
        self.gateway_flows
            .get_or_create(&SiteFlowLabels {
                site: site.to_owned(),
                direction,
                protocol,
            })
            .inc();
    }

    pub fn gateway_bytes(&self, site: &str, direction: &'static str, sent: u64, received: u64) {
        for (flow, n) in [("sent", sent), ("received", received)] {
            self.gateway_bytes
                .get_or_create(&SiteBytesLabels {
                    site: site.to_owned(),
                    direction,
                    flow,
                })
                .inc_by(n);
        }
    }

    pub fn gateway_refused(&self, site: &str, direction: &'static str) {
        self.gateway_refused
            .get_or_create(&SiteLabels {
                site: site.to_owned(),
                direction,
            })
            .inc();
    }

    pub fn udp_flow(&self, side: Side, result: &'static str) {
        self.udp_flows
            .get_or_create(&FlowResultLabels { side, result })
            .inc();
    }

    pub fn udp_flow_open(&self, side: Side) -> OpenFlow {
        let gauge = self.udp_flows_open.get_or_create(&SideLabel { side }).clone();
        gauge.inc();
        OpenFlow(gauge)
    }

    pub fn udp_datagram(&self, side: Side, flow: Flow) {
        self.udp_datagrams
            .get_or_create(&DatagramLabels { side, flow })
            .inc();
    }

    pub fn udp_dropped(&self, side: Side, reason: &'static str) {
        self.udp_dropped
            .get_or_create(&FailureLabels { side, reason })
            .inc();
    }
}

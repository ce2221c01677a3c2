//! The coverage audit: which of a host's TCP links to other hosts are encrypted (through tapproof,
//! or another program's TLS seen by a probe) and which are plaintext; which listening sockets are
//! reachable from the network without tapproof; and what the scan could not see.

pub mod allow;
pub mod report;
pub mod scan;

pub use allow::{validate, AllowError, AllowRule};
pub use report::{classify, render, AgentView, Class, Known, Link, Listener, Options, Report, Role, Summary};

use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `[audit]` section of the agent's config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Accepted plaintext exceptions.
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    /// How often an agent with a control plane scans and reports (seconds); 0 turns it off.
    #[serde(default = "default_report_interval")]
    pub report_interval_secs: u64,
}

fn default_report_interval() -> u64 {
    60
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            report_interval_secs: default_report_interval(),
        }
    }
}

/// This host's name, for reports.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2026-11-29T12:00:00Z` from Unix seconds (civil-from-days, proleptic Gregorian).
pub fn unix_to_utc(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Scans `proc_root` and classes what it finds.
pub fn audit(proc_root: &Path, options: &Options) -> Report {
    let scan = scan::scan(proc_root);
    classify(&scan, options, hostname(), now())
}

/// How a running agent's sockets are vouched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VouchedKind {
    /// A tunnel a peer agent opened to us (mTLS 1.3).
    TunnelIn,
    /// A tunnel we opened to a peer agent (mTLS 1.3).
    TunnelOut,
    /// A connection to the control plane (TLS 1.3).
    Control,
}

/// One TCP connection a running agent vouches for: only TLS flows on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VouchedConnection {
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    pub kind: VouchedKind,
    /// What the handshake settled, once it has (a tunnel only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<VouchedSession>,
}

/// A tunnel's negotiated TLS and the peer it authenticated, as the agent saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VouchedSession {
    /// The peer agent's SPIFFE ID (verified).
    pub peer_id: String,
    /// `TLSv1.3`.
    pub tls_version: String,
    pub cipher: String,
    /// The key-exchange group (`X25519MLKEM768` when post-quantum).
    pub group: String,
    /// The service an outbound tunnel carries (an inbound one may carry several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// What a running agent vouches for (its admin API's `GET /v1/sockets`): the audit classes a
/// socket as *through tapproof* only when it is listed here and owned by the process `pid`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSockets {
    pub pid: u32,
    pub connections: Vec<VouchedConnection>,
    /// Listeners that speak only TLS (the tunnel listener).
    pub listeners: Vec<std::net::SocketAddr>,
    /// Transparent capture and inbound enforcement, when the agent runs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureState>,
}

/// What happens to plaintext that reaches the ports of a host's inbound services from the
/// network: the one definition is the control plane's wire type (the policy sets it too).
pub use tapproof_api::InboundMode;

/// The agent's capture rules as it last read them back from the kernel (nftables table
/// `inet tapproof`), with their counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureState {
    pub inbound: InboundMode,
    /// Whether the table was in place, as configured, at the agent's last look.
    pub rules_installed: bool,
    /// Destinations whose connections from this host are redirected into the tunnel.
    pub captured: Vec<std::net::SocketAddr>,
    /// Connections the kernel redirected to the agent since the rules were installed.
    pub captured_connections: u64,
    /// Ports of this host's inbound services that the mode applies to.
    pub inbound_ports: Vec<u16>,
    /// Plaintext from the network to those ports, per source (monitor: let through; enforce:
    /// dropped).
    pub attempts: Vec<PlaintextAttempt>,
    /// Packets dropped by enforce mode since the rules were installed.
    pub dropped_packets: u64,
    /// Who chose `inbound`: `config` (this host's `capture.inbound`) or `policy` (the control
    /// plane's `[capture]`, which wins).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub inbound_from: String,
    /// Destinations the service directory lists that this agent does not capture, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<RefusedDestination>,
    /// Why the rules are not in place, when they are not and the agent knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A site gateway's (or a host's `[[remote]]`) traffic with other sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayReport>,
}

/// What a site gateway carried between its site and others since the agent started, and what
/// its rules caught since they were installed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayReport {
    /// This gateway's own site (`gateway.site`; empty for a host with `[[remote]]`).
    pub site: String,
    /// Routed TCP connections and UDP datagrams from the local networks the rules handed to
    /// the agent, and routed packets to remote sites they dropped (never forwarded).
    pub routed_connections: u64,
    pub routed_datagrams: u64,
    pub dropped_packets: u64,
    /// Per remote site and direction.
    pub sites: Vec<SiteTraffic>,
}

/// Flows between this gateway's site and `site`, in one direction: `to` (this gateway carried
/// them to that site) or `from` (that site's gateways or hosts brought them here).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteTraffic {
    pub site: String,
    pub direction: String,
    pub tcp_flows: u64,
    pub udp_flows: u64,
    /// Payload bytes towards `site` and from it, counted as each flow ends.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Flows from `site` refused here (site policy, identity), or to it that found no tunnel.
    pub refused: u64,
}

/// A directory destination that is not captured: it points at this host itself, or two services
/// claim it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefusedDestination {
    pub destination: std::net::SocketAddr,
    /// `node/service` of each claim.
    pub claimed_by: Vec<String>,
    pub reason: String,
}

impl CaptureState {
    /// Whether plaintext from the network cannot reach `port`: enforce mode, rules in place.
    pub fn enforces(&self, port: u16) -> bool {
        self.inbound == InboundMode::Enforce && self.rules_installed && self.inbound_ports.contains(&port)
    }
}

/// Plaintext connections from one source to one inbound port, counted by the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaintextAttempt {
    pub source: std::net::IpAddr,
    pub port: u16,
    /// New-connection packets seen (SYNs, retransmissions included).
    pub packets: u64,
}

/// An address as /proc/net/tcp6 shows it folded: IPv4-mapped IPv6 becomes IPv4.
pub fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc() {
        assert_eq!(unix_to_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(unix_to_utc(1_795_953_600), "2026-11-29T12:00:00Z");
        assert_eq!(unix_to_utc(951_782_400), "2000-02-29T00:00:00Z");
    }
}

/// A stream an agent refused (policy or unknown service), kept for the fleet dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    pub at: i64,
    pub peer: String,
    pub service: String,
    pub reason: String,
}

/// One tunnel handshake as an agent saw it (either end), accepted or refused: the evidence that
/// a link was encrypted, with what, between whom. A refused handshake carries what was known
/// before the refusal (no TLS parameters when TLS itself failed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakeRecord {
    /// When it ended (Unix milliseconds).
    pub at_ms: i64,
    /// Per agent process, increasing; with `at_ms` it names the record (uploads are idempotent).
    pub seq: u64,
    /// `inbound` (this agent accepted) or `outbound` (this agent dialled).
    pub side: String,
    /// This end's address and the peer's (`ADDR:PORT`).
    pub local: String,
    pub remote: String,
    /// This end's SPIFFE ID and certificate serial (hex).
    pub local_id: String,
    pub local_serial: String,
    /// The peer's, when its certificate was seen.
    pub peer_id: Option<String>,
    pub peer_serial: Option<String>,
    /// `TLSv1.3`; the IANA suite, key-exchange group and the peer's signature scheme.
    pub tls_version: Option<String>,
    pub cipher: Option<String>,
    pub group: Option<String>,
    pub signature_scheme: Option<String>,
    pub resumed: bool,
    /// `ok` or `refused`.
    pub outcome: String,
    /// Why it was refused (the `tapproof_handshake_failures_total` reason).
    pub reason: Option<String>,
}

/// One self-test round of an agent: connections that must fail, tried against its own tunnel
/// listener (`tapproof_tls::selftest`), each with its result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelftestRound {
    /// When the round started (Unix seconds).
    pub at: i64,
    /// The listener probed (`ADDR:PORT`).
    pub target: String,
    pub probes: Vec<SelftestProbe>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelftestProbe {
    /// `plaintext`, `tls12`, `no_client_cert`, `foreign_ca`, `wrong_identity`, ...
    pub probe: String,
    /// `refused` (as it must be), `accepted` (an alarm), `not_applicable` or `error`.
    pub result: String,
    pub detail: String,
}

/// What an agent sends to `POST /v1/coverage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoverageUpload {
    pub report: Report,
    /// The agent's most recent denials, newest last.
    #[serde(default)]
    pub denials: Vec<Denial>,
    /// Handshake records not yet shipped, oldest first. Omitted when empty, so an agent with no
    /// records still reports to a server older than this field (whose upload type refuses it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handshakes: Vec<HandshakeRecord>,
    /// The agent's latest self-test round, if it ran one (omitted otherwise, as `handshakes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selftest: Option<SelftestRound>,
}

/// Links, denials and handshake records an agent sends at most: a busy host's report stays a
/// bounded request (the records left over go with the next report).
pub const MAX_UPLOAD_LINKS: usize = 2000;
pub const MAX_UPLOAD_DENIALS: usize = 50;
pub const MAX_UPLOAD_HANDSHAKES: usize = 2000;

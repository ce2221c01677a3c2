//! Classes each network link of a scan and renders the report: a table for people, JSON (the
//! same structures, serialised) for machines and for the agent's reports to the server.

use crate::allow::{accepted, AllowRule};
use crate::scan::{Scan, Socket, TcpState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tapproof_tls::probe::{probe, ProbeOutcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Carried by a tapproof agent (mTLS 1.3).
    Tapproof,
    /// Another program's TLS (seen by `--probe`).
    OtherTls,
    /// Not encrypted, or not shown to be.
    Plaintext,
    /// Plaintext, accepted by an allow-list rule.
    Allowed,
}

impl Class {
    pub fn encrypted(self) -> bool {
        matches!(self, Class::Tapproof | Class::OtherTls)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// This host accepted the connection.
    Server,
    /// This host opened it.
    Client,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub class: Class,
    pub role: Role,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub process: Option<String>,
    pub pid: Option<u32>,
    /// Why it got its class (probe answer, allow-list reason, ...).
    pub detail: String,
    /// For a link through tapproof: what it is (a tunnel either way, or the agent's connection
    /// to the control plane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<crate::VouchedKind>,
    /// For a tunnel: the peer's identity and the TLS it negotiated, as the agent reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<crate::VouchedSession>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Listener {
    pub local: SocketAddr,
    pub process: Option<String>,
    pub pid: Option<u32>,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub links: usize,
    pub tapproof: usize,
    pub other_tls: usize,
    pub plaintext: usize,
    pub allowed: usize,
    /// Encrypted links as a share of all network links (100 when there are none).
    pub coverage_percent: f64,
    pub exposed_listeners: usize,
    /// Sources whose plaintext reached an inbound port in monitor mode (let through).
    #[serde(default)]
    pub plaintext_attempts: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub host: String,
    pub generated_at: i64,
    pub summary: Summary,
    pub links: Vec<Link>,
    /// Listening sockets reachable from the network that tapproof does not own.
    pub exposed_listeners: Vec<Listener>,
    /// What the scan could not see.
    pub not_seen: Vec<String>,
    /// The allow-list rules that matched, with their reasons.
    pub exceptions: Vec<AllowRule>,
    /// Transparent capture and inbound enforcement, as the agent reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<crate::CaptureState>,
}

/// What tapproof itself runs on this host, from the agent's config (when given).
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Local ports where apps reach outbound listeners: connections to them from the network are
    /// plaintext legs.
    pub outbound_listeners: Vec<SocketAddr>,
    /// Forward targets of inbound services: tapproof's connections to non-loopback ones are
    /// plaintext legs.
    pub forwards: Vec<SocketAddr>,
}

/// What the running agent said it vouches for, or why it could not be asked.
#[derive(Debug, Clone)]
// Built once per audit run and moved, never stored in bulk: boxing the sockets would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum AgentView {
    /// The agent answered with these sockets.
    Vouched(crate::AgentSockets),
    /// No agent answered (`reason` says where it was asked and what happened): nothing is
    /// counted as through tapproof.
    Unavailable(String),
}

impl Default for AgentView {
    fn default() -> Self {
        Self::Unavailable("no agent was asked".into())
    }
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub probe: Option<Duration>,
    pub include_loopback: bool,
    pub allow: Vec<AllowRule>,
    pub known: Known,
    /// The running agent's sockets: the only evidence that a link goes through tapproof.
    pub agent: AgentView,
}

fn local_only(ip: IpAddr) -> bool {
    ip.is_loopback()
        || match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
            IpAddr::V4(_) => false,
        }
}

/// Classes the scan's sockets. Probes (with `options.probe`) go to the listening side of each
/// link: this host's own port when it is the server, the remote port when it is the client.
pub fn classify(scan: &Scan, options: &Options, host: String, now: i64) -> Report {
    let listening: HashSet<u16> = scan
        .sockets
        .iter()
        .filter(|s| s.state == TcpState::Listen)
        .map(|s| s.local.port())
        .collect();
    let owner = |s: &Socket| scan.owners.get(&s.inode);
    // A socket is tapproof's when the running agent lists exactly it and the scan shows that same
    // process owning it: a program merely named `tapproof` proves nothing.
    let vouched = match &options.agent {
        AgentView::Vouched(a) => Some(a),
        AgentView::Unavailable(_) => None,
    };
    let agent_pid = vouched.map(|a| a.pid);
    let owned_by_agent = |s: &Socket| agent_pid.is_some() && owner(s).map(|p| p.pid) == agent_pid;
    let tunnels: std::collections::HashMap<(SocketAddr, SocketAddr), &crate::VouchedConnection> = vouched
        .map(|a| a.connections.iter().map(|c| ((c.local, c.remote), c)).collect())
        .unwrap_or_default();
    let tls_listeners: HashSet<SocketAddr> = vouched
        .map(|a| a.listeners.iter().copied().collect())
        .unwrap_or_default();
    let is_tapproof = |s: &Socket| {
        owned_by_agent(s)
            && match s.state {
                TcpState::Listen => tls_listeners.contains(&s.local),
                _ => tunnels.contains_key(&(s.local, s.remote)),
            }
    };
    let mut probes: BTreeMap<SocketAddr, ProbeOutcome> = BTreeMap::new();
    let mut links = Vec::new();
    let mut unowned = 0;
    for s in scan.sockets.iter().filter(|s| s.state == TcpState::Established) {
        if !options.include_loopback && (local_only(s.remote.ip()) || local_only(s.local.ip())) {
            continue;
        }
        let role = if listening.contains(&s.local.port()) {
            Role::Server
        } else {
            Role::Client
        };
        let process = owner(s);
        if process.is_none() {
            unowned += 1;
        }
        let vouched_as = is_tapproof(s)
            .then(|| tunnels.get(&(s.local, s.remote)).copied())
            .flatten();
        let via = vouched_as.map(|c| c.kind);
        let (mut class, mut detail) = if let Some(kind) = via {
            let what = match kind {
                crate::VouchedKind::TunnelIn => "mTLS 1.3 tunnel from a peer agent",
                crate::VouchedKind::TunnelOut => "mTLS 1.3 tunnel to a peer agent",
                crate::VouchedKind::Control => "TLS 1.3 connection to the control plane",
            };
            (Class::Tapproof, format!("{what} (vouched for by the agent)"))
        } else if owned_by_agent(s)
            && role == Role::Server
            && options
                .known
                .outbound_listeners
                .iter()
                .any(|l| l.port() == s.local.port())
        {
            (
                Class::Plaintext,
                "an app reaches tapproof's outbound listener over the network".to_owned(),
            )
        } else if owned_by_agent(s) && role == Role::Client && options.known.forwards.contains(&s.remote) {
            (
                Class::Plaintext,
                "tapproof's forward leg to a non-loopback address".to_owned(),
            )
        } else if let Some(timeout) = options.probe {
            let target = match role {
                Role::Server => {
                    let ip = if s.local.ip().is_unspecified() {
                        s.remote.ip()
                    } else {
                        s.local.ip()
                    };
                    SocketAddr::new(ip, s.local.port())
                }
                Role::Client => s.remote,
            };
            let outcome = probes.entry(target).or_insert_with(|| probe(target, timeout));
            describe(target, outcome)
        } else {
            (
                Class::Plaintext,
                "not tapproof; not probed (--probe recognises other TLS)".to_owned(),
            )
        };
        if class == Class::Plaintext {
            if let Some(rule) = accepted(
                &options.allow,
                s.local,
                s.remote,
                process.map(|p| p.name.as_str()),
            ) {
                class = Class::Allowed;
                detail = format!("accepted: {}", rule.reason);
            }
        }
        links.push(Link {
            class,
            role,
            local: s.local,
            remote: s.remote,
            process: process.map(|p| p.name.clone()),
            pid: process.map(|p| p.pid),
            detail,
            via,
            session: vouched_as.and_then(|c| c.session.clone()),
        });
    }
    links.sort_by_key(|l| (l.class, l.remote, l.local));

    let capture = vouched.and_then(|a| a.capture.as_ref());
    let mut exposed = Vec::new();
    let mut seen = HashSet::new();
    for s in scan.sockets.iter().filter(|s| s.state == TcpState::Listen) {
        if local_only(s.local.ip()) || is_tapproof(s) || !seen.insert(s.local) {
            continue;
        }
        // Enforce mode: the kernel drops what the network sends to this port; only the tunnel
        // (through the agent's loopback forward) reaches it.
        if capture.is_some_and(|c| c.enforces(s.local.port())) {
            continue;
        }
        let process = owner(s);
        let fronted = options.known.forwards.iter().any(|f| f.port() == s.local.port());
        let detail = if fronted {
            "tapproof fronts this port, but it also listens on the network: bind it to 127.0.0.1"
        } else {
            "reachable from the network without tapproof"
        };
        if accepted(&options.allow, s.local, s.local, process.map(|p| p.name.as_str())).is_some() {
            continue;
        }
        exposed.push(Listener {
            local: s.local,
            process: process.map(|p| p.name.clone()),
            pid: process.map(|p| p.pid),
            detail: detail.into(),
        });
    }

    let count = |c: Class| links.iter().filter(|l| l.class == c).count();
    let encrypted = links.iter().filter(|l| l.class.encrypted()).count();
    let summary = Summary {
        links: links.len(),
        tapproof: count(Class::Tapproof),
        other_tls: count(Class::OtherTls),
        plaintext: count(Class::Plaintext),
        allowed: count(Class::Allowed),
        coverage_percent: if links.is_empty() {
            100.0
        } else {
            100.0 * encrypted as f64 / links.len() as f64
        },
        exposed_listeners: exposed.len(),
        plaintext_attempts: capture
            .filter(|c| c.inbound == crate::InboundMode::Monitor)
            .map_or(0, |c| c.attempts.len()),
    };
    let mut not_seen = scan.blind_spots.clone();
    if unowned > 0 {
        not_seen.push(format!(
            "{unowned} links have no known owning process (another user's, or it exited mid-scan); they are classed without it"
        ));
    }
    if let Some(c) = capture.filter(|c| !c.rules_installed) {
        not_seen.push(format!(
            "the agent's capture rules (nftables table inet tapproof) were not in place at its last look: inbound {} is not in force{}",
            c.inbound.as_str(),
            c.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
        ));
    }
    if let AgentView::Unavailable(reason) = &options.agent {
        not_seen.push(format!(
            "no tapproof agent vouched for its sockets ({reason}): nothing is counted as through tapproof"
        ));
    }
    let mut exceptions: Vec<AllowRule> = Vec::new();
    for rule in &options.allow {
        let used = links
            .iter()
            .any(|l| l.detail == format!("accepted: {}", rule.reason));
        if used && !exceptions.contains(rule) {
            exceptions.push(rule.clone());
        }
    }
    Report {
        host,
        generated_at: now,
        summary,
        links,
        exposed_listeners: exposed,
        not_seen,
        exceptions,
        capture: capture.cloned(),
    }
}

fn describe(target: SocketAddr, outcome: &ProbeOutcome) -> (Class, String) {
    match outcome {
        ProbeOutcome::Tls(t) => {
            let mut d = format!("{target}: {} {} {}", t.version, t.cipher, t.group);
            if let Some(subject) = &t.subject {
                let _ = write!(d, ", certificate {subject:?}");
            }
            if let Some(exp) = t.not_after {
                let _ = write!(d, " expires {}", crate::unix_to_utc(exp));
            }
            if t.client_cert_required {
                d.push_str(", client certificate required");
            }
            (Class::OtherTls, d)
        }
        ProbeOutcome::NotTls { answer } => (
            Class::Plaintext,
            format!("{target} answered without TLS: {answer}"),
        ),
        ProbeOutcome::NoAnswer { waited } => (
            Class::Plaintext,
            format!("{target} gave no TLS answer in {:.1} s", waited.as_secs_f64()),
        ),
        ProbeOutcome::Unreachable { detail } => (
            Class::Plaintext,
            format!("probe could not reach {target}: {detail}"),
        ),
    }
}

/// The report for people.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let s = &report.summary;
    if s.links == 0 {
        // 100% of nothing is not coverage.
        let _ = writeln!(out, "Coverage on {}: no network links seen", report.host);
    } else {
        let _ = writeln!(
            out,
            "Coverage on {}: {:.1}% of {} network links encrypted ({} through tapproof, {} other TLS, {} plaintext, {} accepted exceptions)",
            report.host, s.coverage_percent, s.links, s.tapproof, s.other_tls, s.plaintext, s.allowed
        );
    }
    if !report.links.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<10} {:<6} {:<24} {:<24} {:<16} DETAIL",
            "CLASS", "ROLE", "LOCAL", "REMOTE", "PROCESS"
        );
        for l in &report.links {
            let class = match l.class {
                Class::Tapproof => "tapproof",
                Class::OtherTls => "tls",
                Class::Plaintext => "PLAINTEXT",
                Class::Allowed => "allowed",
            };
            let role = match l.role {
                Role::Server => "in",
                Role::Client => "out",
            };
            let process = match (&l.process, l.pid) {
                (Some(p), Some(pid)) => format!("{p}[{pid}]"),
                _ => "?".into(),
            };
            let _ = writeln!(
                out,
                "{class:<10} {role:<6} {:<24} {:<24} {process:<16} {}",
                l.local.to_string(),
                l.remote.to_string(),
                l.detail
            );
        }
    }
    if !report.exposed_listeners.is_empty() {
        let _ = writeln!(out, "\nListening on the network without tapproof:");
        for l in &report.exposed_listeners {
            let process = match (&l.process, l.pid) {
                (Some(p), Some(pid)) => format!("{p}[{pid}]"),
                _ => "?".into(),
            };
            let _ = writeln!(out, "  {:<24} {process:<16} {}", l.local.to_string(), l.detail);
        }
    }
    if let Some(c) = &report.capture {
        let _ = writeln!(
            out,
            "\nCapture: inbound {}{}; {} destinations captured ({} connections redirected)",
            c.inbound.as_str(),
            if c.rules_installed {
                ""
            } else {
                " (RULES NOT IN PLACE)"
            },
            c.captured.len(),
            c.captured_connections
        );
        for d in &c.captured {
            let _ = writeln!(out, "  captured   {d}");
        }
        for r in &c.refused {
            let _ = writeln!(
                out,
                "  NOT captured {} ({}): {}",
                r.destination,
                r.claimed_by.join(", "),
                r.reason
            );
        }
        if c.inbound != crate::InboundMode::Off {
            let ports: Vec<String> = c.inbound_ports.iter().map(u16::to_string).collect();
            let _ = writeln!(
                out,
                "  inbound ports {} ({}{})",
                ports.join(", "),
                c.inbound.as_str(),
                if c.inbound_from.is_empty() {
                    String::new()
                } else {
                    format!(", set by {}", c.inbound_from)
                }
            );
        }
        for a in &c.attempts {
            let what = match c.inbound {
                crate::InboundMode::Enforce => "dropped",
                _ => "PLAINTEXT let through",
            };
            let _ = writeln!(
                out,
                "  attempt    {} -> port {}: {} packets, {what}",
                a.source, a.port, a.packets
            );
        }
    }
    if !report.exceptions.is_empty() {
        let _ = writeln!(out, "\nAccepted exceptions (audit.allow):");
        for r in &report.exceptions {
            let mut what = Vec::new();
            if let Some(p) = &r.peer {
                what.push(format!("peer {p}"));
            }
            if let Some(p) = r.port {
                what.push(format!("port {p}"));
            }
            if let Some(p) = &r.process {
                what.push(format!("process {p}"));
            }
            let _ = writeln!(out, "  {}: {}", what.join(", "), r.reason);
        }
    }
    if !report.not_seen.is_empty() {
        let _ = writeln!(out, "\nNot seen:");
        for n in &report.not_seen {
            let _ = writeln!(out, "  {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::{Process, Scan, Socket, TcpState};

    fn sock(local: &str, remote: &str, state: TcpState, inode: u64) -> Socket {
        Socket {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state,
            inode,
            uid: 0,
        }
    }

    fn scan() -> Scan {
        let sockets = vec![
            sock("0.0.0.0:5432", "0.0.0.0:0", TcpState::Listen, 1),
            // A database client across the network, inbound: plaintext.
            sock("10.0.0.1:5432", "10.0.0.2:40000", TcpState::Established, 2),
            // A tapproof tunnel.
            sock("10.0.0.1:50000", "10.0.0.3:15008", TcpState::Established, 3),
            // tapproof's forward leg to a non-loopback address.
            sock("10.0.0.1:50001", "10.0.0.4:6379", TcpState::Established, 4),
            // Loopback: never a network link.
            sock("127.0.0.1:50002", "127.0.0.1:15008", TcpState::Established, 5),
            // Its process exited mid-scan: no owner.
            sock("10.0.0.1:50003", "10.0.0.5:80", TcpState::Established, 6),
            // A plaintext program that calls itself tapproof, serving a network client.
            sock("10.0.0.1:7000", "10.0.0.6:41000", TcpState::Established, 7),
            sock("0.0.0.0:7000", "0.0.0.0:0", TcpState::Listen, 8),
            // The agent's tunnel listener.
            sock("0.0.0.0:15008", "0.0.0.0:0", TcpState::Listen, 9),
        ];
        let mut s = Scan {
            sockets,
            ..Scan::default()
        };
        let owner = |pid, name: &str| Process {
            pid,
            name: name.into(),
        };
        s.owners.insert(1, owner(10, "postgres"));
        s.owners.insert(2, owner(10, "postgres"));
        s.owners.insert(3, owner(20, "tapproof"));
        s.owners.insert(4, owner(20, "tapproof"));
        s.owners.insert(5, owner(30, "psql"));
        s.owners.insert(7, owner(40, "tapproof"));
        s.owners.insert(8, owner(40, "tapproof"));
        s.owners.insert(9, owner(20, "tapproof"));
        s.blind_spots
            .push("2 processes of other users could not be inspected".into());
        s
    }

    /// The agent (PID 20) vouches for its tunnel and its tunnel listener.
    fn agent() -> AgentView {
        AgentView::Vouched(crate::AgentSockets {
            pid: 20,
            connections: vec![crate::VouchedConnection {
                local: "10.0.0.1:50000".parse().unwrap(),
                remote: "10.0.0.3:15008".parse().unwrap(),
                kind: crate::VouchedKind::TunnelOut,
                session: Some(crate::VouchedSession {
                    peer_id: "spiffe://example.org/node/c".into(),
                    group: "X25519MLKEM768".into(),
                    ..Default::default()
                }),
            }],
            listeners: vec!["0.0.0.0:15008".parse().unwrap()],
            capture: None,
        })
    }

    fn with_capture(inbound: crate::InboundMode, installed: bool) -> AgentView {
        let AgentView::Vouched(mut a) = agent() else {
            unreachable!()
        };
        a.capture = Some(crate::CaptureState {
            inbound,
            rules_installed: installed,
            inbound_ports: vec![5432],
            attempts: vec![crate::PlaintextAttempt {
                source: "10.0.0.9".parse().unwrap(),
                port: 5432,
                packets: 1,
            }],
            ..Default::default()
        });
        AgentView::Vouched(a)
    }

    #[test]
    fn an_enforced_port_is_not_exposed_and_monitor_attempts_are_counted() {
        let exposed = |view| {
            let options = Options {
                agent: view,
                ..Options::default()
            };
            let r = classify(&scan(), &options, "h".into(), 0);
            let port = r.exposed_listeners.iter().any(|l| l.local.port() == 5432);
            (port, r.summary.plaintext_attempts, r)
        };
        let (port, attempts, r) = exposed(with_capture(crate::InboundMode::Enforce, true));
        assert!(!port, "the kernel drops the network's packets to 5432");
        assert_eq!(attempts, 0, "dropped attempts are not plaintext that got through");
        assert!(render(&r).contains("10.0.0.9 -> port 5432: 1 packets, dropped"));
        // Rules not in place: the port is exposed again, and the report says why.
        let (port, _, r) = exposed(with_capture(crate::InboundMode::Enforce, false));
        assert!(port);
        assert!(r.not_seen.iter().any(|n| n.contains("not in place")));
        let (port, attempts, r) = exposed(with_capture(crate::InboundMode::Monitor, true));
        assert!(port, "monitor lets the network in");
        assert_eq!(attempts, 1);
        assert!(render(&r).contains("PLAINTEXT let through"));
    }

    #[test]
    fn links_are_classed_and_counted() {
        let options = Options {
            known: Known {
                forwards: vec!["10.0.0.4:6379".parse().unwrap()],
                ..Known::default()
            },
            agent: agent(),
            ..Options::default()
        };
        let r = classify(&scan(), &options, "h".into(), 0);
        let class_of = |remote: &str| {
            r.links
                .iter()
                .find(|l| l.remote.to_string() == remote)
                .map(|l| (l.class, l.role))
        };
        assert_eq!(class_of("10.0.0.2:40000"), Some((Class::Plaintext, Role::Server)));
        assert_eq!(class_of("10.0.0.3:15008"), Some((Class::Tapproof, Role::Client)));
        let tunnel = r
            .links
            .iter()
            .find(|l| l.remote.to_string() == "10.0.0.3:15008")
            .unwrap();
        assert_eq!(tunnel.via, Some(crate::VouchedKind::TunnelOut));
        assert_eq!(
            tunnel.session.as_ref().map(|t| t.peer_id.as_str()),
            Some("spiffe://example.org/node/c"),
            "the agent's account of the tunnel goes into the report"
        );
        assert!(
            tunnel.detail.starts_with("mTLS 1.3 tunnel to a peer agent"),
            "{}",
            tunnel.detail
        );
        assert!(r
            .links
            .iter()
            .filter(|l| l.class != Class::Tapproof)
            .all(|l| l.via.is_none()));
        assert_eq!(class_of("10.0.0.4:6379"), Some((Class::Plaintext, Role::Client)));
        assert_eq!(
            class_of("127.0.0.1:15008"),
            None,
            "loopback is not a network link"
        );
        let unowned = r
            .links
            .iter()
            .find(|l| l.remote.to_string() == "10.0.0.5:80")
            .unwrap();
        assert_eq!(
            (unowned.class, unowned.process.as_deref()),
            (Class::Plaintext, None)
        );
        assert_eq!(
            class_of("10.0.0.6:41000"),
            Some((Class::Plaintext, Role::Server)),
            "a process named tapproof that the agent does not vouch for is plaintext"
        );
        assert_eq!(r.summary.links, 5);
        assert_eq!(r.summary.plaintext, 4);
        assert_eq!(r.summary.coverage_percent, 20.0);
        let exposed: Vec<_> = r.exposed_listeners.iter().map(|l| l.local.port()).collect();
        assert_eq!(
            exposed,
            vec![5432, 7000],
            "the vouched tunnel listener is not exposed"
        );
        assert!(r.not_seen.iter().any(|n| n.contains("other users")));
        assert!(r.not_seen.iter().any(|n| n.contains("no known owning process")));
        assert!(!r.not_seen.iter().any(|n| n.contains("vouched")));
        let table = render(&r);
        assert!(table.contains("20.0% of 5 network links"), "{table}");
        assert!(table.contains("PLAINTEXT"));
    }

    #[test]
    fn an_allow_rule_turns_plaintext_into_an_accepted_exception() {
        let options = Options {
            allow: vec![AllowRule {
                peer: Some("10.0.0.0/24".into()),
                port: Some(5432),
                process: Some("postgres".into()),
                reason: "replication inside the cage".into(),
            }],
            ..Options::default()
        };
        let r = classify(&scan(), &options, "h".into(), 0);
        let l = r
            .links
            .iter()
            .find(|l| l.remote.to_string() == "10.0.0.2:40000")
            .unwrap();
        assert_eq!(l.class, Class::Allowed);
        assert!(l.detail.contains("replication inside the cage"));
        assert_eq!(r.exceptions.len(), 1);
        // A rule scoped to some peers does not accept a listener anyone can reach.
        assert!(r.exposed_listeners.iter().any(|l| l.local.port() == 5432));
        assert!(render(&r).contains("Accepted exceptions"));
    }

    #[test]
    fn without_an_agent_nothing_is_tapproof() {
        let r = classify(&scan(), &Options::default(), "h".into(), 0);
        assert_eq!(r.summary.tapproof, 0);
        assert!(r.links.iter().all(|l| l.class == Class::Plaintext));
        assert!(
            r.not_seen.iter().any(|n| n.contains("no tapproof agent vouched")),
            "{:?}",
            r.not_seen
        );
        // The agent's answer is bound to its PID: another process's socket with a vouched
        // 4-tuple (a stale or forged list) is not tapproof.
        let mut forged = scan();
        forged.owners.insert(
            3,
            Process {
                pid: 40,
                name: "tapproof".into(),
            },
        );
        let options = Options {
            agent: agent(),
            ..Options::default()
        };
        let r = classify(&forged, &options, "h".into(), 0);
        assert_eq!(r.summary.tapproof, 0);
    }

    #[test]
    fn no_links_is_full_coverage() {
        let r = classify(&Scan::default(), &Options::default(), "h".into(), 0);
        assert_eq!(r.summary.coverage_percent, 100.0);
    }
}

//! The fleet dashboard (`/dashboard`, its script and stylesheet, and `/v1/dashboard`, admin
//! identities only): nodes with certificate expiry, every reported link with the remote node
//! resolved, the fleet's coverage over time, recent denials and the audit-log tail. The page,
//! script and stylesheet are compiled into the binary: nothing is fetched from elsewhere. These
//! documents are read by the page's script only, so their types live here, not in `tapproof_api`.

use crate::app::{ApiError, AppState, Peer};
use crate::auth::{authorize, Need};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use tapproof_audit::{Class, CoverageUpload, Denial};

/// The dashboard's chart covers this much history.
const HISTORY: i64 = 7 * 24 * 3600;

#[derive(Debug, Serialize)]
pub struct Dashboard {
    pub generated_at: i64,
    pub fleet: Fleet,
    pub nodes: Vec<NodeRow>,
    pub links: Vec<LinkRow>,
    pub history: Vec<HistoryPoint>,
    pub denials: Vec<DenialRow>,
    pub audit: Vec<tapproof_api::AuditEntry>,
    /// The most recent revocations, newest first.
    pub revocations: Vec<tapproof_api::Revocation>,
    /// The CA: roots and intermediates not retired, with their rollover state.
    pub ca: Vec<CaRow>,
    /// Site gateways (and hosts with `[[remote]]`): what each carried between its site and the
    /// others, per remote site and direction, from its latest report.
    pub sites: Vec<SiteRow>,
}

/// One gateway's traffic with one remote site in one direction, and its rules' counts.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SiteRow {
    pub node: String,
    /// The gateway's own site (`gateway.site`; empty when not named or for a host).
    pub site: String,
    pub remote_site: String,
    /// `to` (carried there from here) or `from` (brought here from there).
    pub direction: String,
    pub tcp_flows: u64,
    pub udp_flows: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub refused: u64,
    /// The gateway's rules: routed connections and datagrams taken into its tunnels, and routed
    /// packets to remote sites dropped (never forwarded in plaintext).
    pub routed_connections: u64,
    pub routed_datagrams: u64,
    pub dropped_packets: u64,
}

/// The site rows of each node's latest report, by node and remote site.
fn site_rows(uploads: &[(String, CoverageUpload)]) -> Vec<SiteRow> {
    let mut rows = Vec::new();
    for (node, upload) in uploads {
        let Some(g) = upload.report.capture.as_ref().and_then(|c| c.gateway.as_ref()) else {
            continue;
        };
        rows.extend(g.sites.iter().map(|t| SiteRow {
            node: node.clone(),
            site: g.site.clone(),
            remote_site: t.site.clone(),
            direction: t.direction.clone(),
            tcp_flows: t.tcp_flows,
            udp_flows: t.udp_flows,
            bytes_sent: t.bytes_sent,
            bytes_received: t.bytes_received,
            refused: t.refused,
            routed_connections: g.routed_connections,
            routed_datagrams: g.routed_datagrams,
            dropped_packets: g.dropped_packets,
        }));
    }
    rows.sort_by(|a, b| {
        (&a.node, &a.remote_site, &a.direction).cmp(&(&b.node, &b.remote_site, &b.direction))
    });
    rows
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct CaRow {
    pub id: i64,
    /// `root` or `intermediate`.
    pub kind: String,
    /// `prepared` (in every bundle, signs nothing yet), `active` (signs) or `retired`.
    pub state: String,
    pub not_after: i64,
    pub created_at: i64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Fleet {
    /// Encrypted links as a share of all links in each node's latest report (100 with none).
    pub coverage_percent: f64,
    pub links: i64,
    pub encrypted: i64,
    pub plaintext: i64,
    pub nodes: usize,
    pub nodes_reporting: usize,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeRow {
    pub name: String,
    pub spiffe_id: String,
    pub cert_not_after: Option<i64>,
    pub last_seen: Option<i64>,
    pub revoked: bool,
    pub last_report: Option<i64>,
    pub coverage_percent: Option<f64>,
    pub plaintext: Option<i64>,
    /// `capture.inbound` in the latest report (`off`, `monitor`, `enforce`); none from an agent
    /// that does not run capture.
    pub capture_mode: Option<String>,
    /// Sources a monitor-mode agent let through with plaintext, in the latest report.
    pub plaintext_attempts: Option<i64>,
    /// The node's capture mode and plaintext attempts over the chart's period: a point where
    /// either changed (the first report, then each change), at most `NODE_CAPTURE_POINTS`.
    pub capture_history: Vec<CapturePoint>,
    /// The node's latest self-test round, as its latest report carried it; none before one ran.
    pub selftest: Option<SelftestSummary>,
}

/// A self-test round in brief: any probe the listener accepted is an alarm.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SelftestSummary {
    pub at: i64,
    pub refused: usize,
    /// The probes the listener ACCEPTED (must be empty).
    pub accepted: Vec<String>,
}

/// A node's capture mode and plaintext attempts from one report on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CapturePoint {
    pub at: i64,
    pub mode: Option<String>,
    pub plaintext_attempts: i64,
}

/// The most changes a node row carries (the latest ones).
const NODE_CAPTURE_POINTS: usize = 100;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct LinkRow {
    pub from: String,
    /// The node at the other end, when its address is known.
    pub to: Option<String>,
    pub remote: String,
    pub local: String,
    pub class: Class,
    /// A tapproof link's kind: `tunnel_in`, `tunnel_out` or `control` (a node's connection to the
    /// control plane, which is not a link to another node).
    pub via: Option<tapproof_audit::VouchedKind>,
    pub process: Option<String>,
    pub detail: String,
    /// The reporting node's own identity (`from`'s).
    pub from_id: Option<String>,
    /// For a tunnel: the peer agent's identity, the service (outbound tunnels), and the TLS
    /// version, cipher and key-exchange group it negotiated.
    pub peer_id: Option<String>,
    pub service: Option<String>,
    pub tls_version: Option<String>,
    pub cipher: Option<String>,
    pub group: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct HistoryPoint {
    pub at: i64,
    /// None while the reports so far saw no link at all (100% of nothing is not coverage).
    pub coverage_percent: Option<f64>,
    pub links: i64,
    /// Monitor-mode plaintext attempts (sources let through), summed over every node's latest
    /// report up to then.
    pub plaintext_attempts: i64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DenialRow {
    pub node: String,
    #[serde(flatten)]
    pub denial: Denial,
}

fn percent(encrypted: i64, links: i64) -> f64 {
    if links == 0 {
        100.0
    } else {
        100.0 * encrypted as f64 / links as f64
    }
}

pub async fn dashboard_data(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Dashboard>, ApiError> {
    authorize(&s, &peer, Need::Admin, "dashboard").await?;
    let now = crate::now();
    let nodes = s.store.node_list().await?;
    let latest = s.store.coverage_latest().await?;
    let uploads: Vec<(String, CoverageUpload)> = latest
        .iter()
        .filter_map(|r| Some((r.point.node.clone(), serde_json::from_str(&r.report).ok()?)))
        .collect();

    // Which node owns which address: announced tunnel addresses, and the local addresses each
    // node's own report shows.
    let mut owner: HashMap<IpAddr, String> = HashMap::new();
    for n in &nodes {
        if let Some(ip) = n
            .tunnel_addr
            .as_deref()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        {
            owner.insert(ip.ip(), n.name.clone());
        }
    }
    for (node, upload) in &uploads {
        for l in &upload.report.links {
            if !l.local.ip().is_unspecified() {
                owner.entry(l.local.ip()).or_insert_with(|| node.clone());
            }
        }
    }

    let points = s.store.coverage_history(now - HISTORY).await?;
    let mut capture_history = node_capture_history(&points);
    let mut rows = Vec::new();
    for n in &nodes {
        let certs = s.store.cert_list(&n.name).await?;
        let cert_not_after = certs
            .iter()
            .filter(|c| c.spiffe_id == n.spiffe_id)
            .map(|c| c.not_after)
            .max();
        let report = latest.iter().map(|r| &r.point).find(|r| r.node == n.name);
        rows.push(NodeRow {
            name: n.name.clone(),
            spiffe_id: n.spiffe_id.clone(),
            cert_not_after,
            last_seen: n.last_seen,
            revoked: n.revoked_at.is_some(),
            last_report: report.map(|r| r.at),
            // A report that saw no link has no coverage figure (not 100%).
            coverage_percent: report
                .filter(|r| r.links > 0)
                .map(|r| percent(r.encrypted, r.links)),
            plaintext: report.map(|r| r.plaintext),
            capture_mode: report.and_then(|r| r.capture_mode.clone()),
            plaintext_attempts: report
                .filter(|r| r.capture_mode.is_some())
                .map(|r| r.plaintext_attempts),
            capture_history: capture_history.remove(n.name.as_str()).unwrap_or_default(),
            selftest: uploads
                .iter()
                .find(|(node, _)| *node == n.name)
                .and_then(|(_, u)| u.selftest.as_ref())
                .map(|round| SelftestSummary {
                    at: round.at,
                    refused: round.probes.iter().filter(|p| p.result == "refused").count(),
                    accepted: round
                        .probes
                        .iter()
                        .filter(|p| p.result == "accepted")
                        .map(|p| p.probe.clone())
                        .collect(),
                }),
        });
    }

    let mut links = Vec::new();
    let mut denials = Vec::new();
    for (node, upload) in &uploads {
        links.extend(upload.report.links.iter().map(|l| {
            LinkRow {
                from: node.clone(),
                to: if l.via == Some(tapproof_audit::VouchedKind::Control) {
                    Some("control plane".to_owned())
                } else {
                    owner.get(&l.remote.ip()).filter(|o| *o != node).cloned()
                },
                via: l.via,
                remote: l.remote.to_string(),
                local: l.local.to_string(),
                class: l.class,
                process: l.process.clone(),
                detail: l.detail.clone(),
                from_id: nodes
                    .iter()
                    .find(|n| &n.name == node)
                    .map(|n| n.spiffe_id.clone()),
                peer_id: l.session.as_ref().map(|t| t.peer_id.clone()),
                service: l.session.as_ref().and_then(|t| t.service.clone()),
                tls_version: l.session.as_ref().map(|t| t.tls_version.clone()),
                cipher: l.session.as_ref().map(|t| t.cipher.clone()),
                group: l.session.as_ref().map(|t| t.group.clone()),
            }
        }));
        denials.extend(upload.denials.iter().map(|d| DenialRow {
            node: node.clone(),
            denial: d.clone(),
        }));
    }
    links.sort_by(|a, b| (b.class, &a.from, &a.remote).cmp(&(a.class, &b.from, &b.remote)));
    denials.sort_by_key(|d| std::cmp::Reverse(d.denial.at));
    denials.truncate(50);

    let reporting: Vec<_> = latest
        .iter()
        .map(|r| &r.point)
        .filter(|r| !nodes.iter().any(|n| n.name == r.node && n.revoked_at.is_some()))
        .collect();
    let (total, encrypted, plaintext) = reporting.iter().fold((0, 0, 0), |(t, e, p), r| {
        (t + r.links, e + r.encrypted, p + r.plaintext)
    });
    let history = history(&points);
    let mut revocations: Vec<_> = s
        .store
        .revocations()
        .await?
        .into_iter()
        .map(crate::admin::revocation)
        .collect();
    revocations.sort_by_key(|r| std::cmp::Reverse((r.revoked_at, r.id)));
    revocations.truncate(20);
    let ca = s
        .store
        .ca_list()
        .await?
        .into_iter()
        .filter(|c| c.state != tapproof_store::CaState::Retired)
        .map(|c| CaRow {
            id: c.id,
            kind: c.kind.as_str().to_owned(),
            state: c.state.as_str().to_owned(),
            not_after: c.not_after,
            created_at: c.created_at,
        })
        .collect();
    Ok(Json(Dashboard {
        generated_at: now,
        fleet: Fleet {
            coverage_percent: percent(encrypted, total),
            links: total,
            encrypted,
            plaintext,
            nodes: nodes.iter().filter(|n| n.revoked_at.is_none()).count(),
            nodes_reporting: reporting.len(),
        },
        nodes: rows,
        links,
        history,
        denials,
        audit: s
            .store
            .audit_tail(20)
            .await?
            .into_iter()
            .map(crate::admin::audit_entry)
            .collect(),
        revocations,
        ca,
        sites: site_rows(&uploads),
    }))
}

/// Per node, its capture mode and attempts where they changed (reports in time order).
fn node_capture_history(points: &[tapproof_store::CoveragePoint]) -> BTreeMap<&str, Vec<CapturePoint>> {
    let mut out: BTreeMap<&str, Vec<CapturePoint>> = BTreeMap::new();
    for p in points.iter().filter(|p| p.capture_mode.is_some()) {
        let list = out.entry(p.node.as_str()).or_default();
        let same = list
            .last()
            .is_some_and(|l| l.mode == p.capture_mode && l.plaintext_attempts == p.plaintext_attempts);
        if !same {
            list.push(CapturePoint {
                at: p.at,
                mode: p.capture_mode.clone(),
                plaintext_attempts: p.plaintext_attempts,
            });
        }
    }
    for list in out.values_mut() {
        let extra = list.len().saturating_sub(NODE_CAPTURE_POINTS);
        list.drain(..extra);
    }
    out
}

/// The fleet's coverage after each report (every node's latest report up to then), at most 500
/// points (later ones win within a bucket).
fn history(points: &[tapproof_store::CoveragePoint]) -> Vec<HistoryPoint> {
    let mut latest: BTreeMap<&str, (i64, i64, i64)> = BTreeMap::new();
    let mut out: Vec<HistoryPoint> = Vec::new();
    let (first, last) = match (points.first(), points.last()) {
        (Some(f), Some(l)) => (f.at, l.at),
        _ => return out,
    };
    let bucket = ((last - first) / 500).max(1);
    for p in points {
        latest.insert(&p.node, (p.links, p.encrypted, p.plaintext_attempts));
        let (links, enc, attempts) = latest
            .values()
            .fold((0, 0, 0), |(l, e, a), (pl, pe, pa)| (l + pl, e + pe, a + pa));
        let point = HistoryPoint {
            at: p.at,
            coverage_percent: (links > 0).then(|| percent(enc, links)),
            links,
            plaintext_attempts: attempts,
        };
        match out.last_mut() {
            Some(prev) if (prev.at - first) / bucket == (p.at - first) / bucket => *prev = point,
            _ => out.push(point),
        }
    }
    out
}

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

async fn asset(
    s: &AppState,
    peer: &Peer,
    content_type: &'static str,
    body: &'static str,
) -> Result<impl IntoResponse, ApiError> {
    authorize(s, peer, Need::Admin, "dashboard").await?;
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
            // Everything comes from this server; nothing inline, nothing from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'",
            ),
        ],
        body,
    ))
}

pub async fn index(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<impl IntoResponse, ApiError> {
    asset(&s, &peer, "text/html; charset=utf-8", INDEX).await
}

pub async fn script(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<impl IntoResponse, ApiError> {
    asset(&s, &peer, "text/javascript; charset=utf-8", SCRIPT).await
}

pub async fn style(
    State(s): State<Arc<AppState>>,
    Extension(peer): Extension<Peer>,
) -> Result<impl IntoResponse, ApiError> {
    asset(&s, &peer, "text/css; charset=utf-8", STYLE).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapproof_audit::Report;
    use tapproof_store::CoveragePoint;

    fn p(node: &str, at: i64, links: i64, encrypted: i64) -> CoveragePoint {
        CoveragePoint {
            node: node.into(),
            at,
            links,
            encrypted,
            plaintext: links - encrypted,
            capture_mode: None,
            plaintext_attempts: 0,
        }
    }

    #[test]
    fn history_combines_each_nodes_latest_report() {
        let h = history(&[p("a", 10, 2, 1), p("b", 20, 2, 2), p("a", 30, 2, 2)]);
        let got: Vec<_> = h.iter().map(|x| (x.at, x.coverage_percent)).collect();
        assert_eq!(got, vec![(10, Some(50.0)), (20, Some(75.0)), (30, Some(100.0))]);
        // Reports that saw no link yet have no figure: not a 100% line over nothing.
        let h = history(&[p("a", 10, 0, 0), p("b", 20, 2, 1)]);
        let got: Vec<_> = h.iter().map(|x| (x.at, x.coverage_percent)).collect();
        assert_eq!(got, vec![(10, None), (20, Some(50.0))]);
        assert!(history(&[]).is_empty());
        // Attempts: each node's latest count, summed.
        let mut b = p("b", 20, 2, 2);
        b.plaintext_attempts = 2;
        let h = history(&[p("a", 10, 2, 2), b, p("b", 30, 2, 2)]);
        let got: Vec<_> = h.iter().map(|x| (x.at, x.plaintext_attempts)).collect();
        assert_eq!(got, vec![(10, 0), (20, 2), (30, 0)]);
    }

    #[test]
    fn each_nodes_capture_history_keeps_its_changes() {
        let c = |node: &str, at: i64, mode: Option<&str>, attempts: i64| CoveragePoint {
            capture_mode: mode.map(str::to_owned),
            plaintext_attempts: attempts,
            ..p(node, at, 1, 1)
        };
        let points = [
            c("a", 10, Some("monitor"), 0),
            c("b", 15, None, 0),
            c("a", 20, Some("monitor"), 0),
            c("a", 30, Some("monitor"), 2),
            c("a", 40, Some("enforce"), 2),
        ];
        let h = node_capture_history(&points);
        let got: Vec<_> = h["a"]
            .iter()
            .map(|x| (x.at, x.mode.as_deref(), x.plaintext_attempts))
            .collect();
        assert_eq!(
            got,
            [
                (10, Some("monitor"), 0),
                (30, Some("monitor"), 2),
                (40, Some("enforce"), 2)
            ]
        );
        assert!(
            !h.contains_key("b"),
            "a node without capture has no capture history"
        );
    }

    #[test]
    fn no_links_is_full_coverage() {
        assert_eq!(percent(0, 0), 100.0);
        assert_eq!(percent(1, 4), 25.0);
    }

    #[test]
    fn report_type_is_what_agents_send() {
        let r: Report = serde_json::from_value(serde_json::json!({
            "host": "h", "generated_at": 1,
            "summary": {"links": 0, "tapproof": 0, "other_tls": 0, "plaintext": 0, "allowed": 0,
                        "coverage_percent": 100.0, "exposed_listeners": 0},
            "links": [], "exposed_listeners": [], "not_seen": [], "exceptions": []
        }))
        .unwrap();
        assert_eq!(r.summary.links, 0);
    }
}

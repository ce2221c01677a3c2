//! The site-gateway role (`[gateway]`). Hosts of the local networks route remote sites' networks
//! via this host; `capture.rs` redirects that routed TCP (nftables PREROUTING, `nft.rs`) to the
//! capture listener, and `route` carries each connection to the remote site's gateways as a
//! CONNECT stream whose authority is the real destination (`ADDR:PORT`). On the far side
//! `admission` decides whether a peer's stream may reach such an address: it must be in a network
//! this gateway fronts, and the peer must prove a remote site's `server_id` or be one of that
//! site's hosts its `allow` names (a host with its own agent and `[[remote]]`, whose connections
//! to remote networks its own capture carries here with its own identity). Routed traffic to a
//! remote site that is not carried (other protocols) is dropped by the rules, never forwarded in
//! plaintext across the interconnect.

use crate::config::{AgentConfig, OutboundConfig, RemoteSite};
use crate::metrics::{DenialLabels, GATEWAY_SERVICE};
use crate::sites::{Direction, Protocol};
use crate::state::AgentState;
use std::net::{IpAddr, SocketAddr};
use tapproof_identity::SpiffeId;
use tracing::{debug, warn};

/// The remote site whose networks hold `ip`, among `sites` (`AgentConfig::remote_sites`).
pub fn site_for(sites: &[RemoteSite], ip: IpAddr) -> Option<&RemoteSite> {
    sites.iter().find(|s| s.networks.iter().any(|n| n.contains(ip)))
}

/// How a connection to `destination` in `site` is carried: to the site's gateways, expecting its
/// `server_id`, the destination as the CONNECT authority.
pub fn route(site: &RemoteSite, destination: SocketAddr) -> OutboundConfig {
    OutboundConfig {
        listen: None,
        capture: Some(destination),
        service: destination.to_string(),
        peers: site.gateways.clone(),
        server_id: Some(site.server_id.clone()),
        allow_non_loopback: false,
        site: Some(site.name.clone()),
    }
}

/// Who a peer admitted by `admission` is to this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted<'a> {
    /// The gateways of `site` (its `server_id`).
    Gateway { site: &'a str },
    /// A host of `site` with its own agent (its `allow`).
    Host { site: &'a str },
}

/// Whether a peer's stream to `destination` (an `ADDR:PORT` authority) is carried here: only
/// into this gateway's networks, only for a remote site's `server_id` or an identity its
/// `allow` names. The refusal's stable reason is a metric label.
pub fn admission<'a>(
    config: &'a AgentConfig,
    peer: &SpiffeId,
    flow: Flow,
) -> Result<Admitted<'a>, &'static str> {
    let Some(g) = &config.gateway else {
        return Err("not_a_gateway");
    };
    let destination = flow.destination;
    if !g.networks.iter().any(|n| n.contains(destination.ip())) {
        return Err("not_a_local_network");
    }
    let (site, admitted, source) = match peer_site(&g.remote, peer) {
        // A gateway speaks for the hosts behind it: the source it names, if any.
        Some((site, true)) => (site, Admitted::Gateway { site: &site.name }, flow.named_source),
        // A host speaks for itself: its tunnel's own address.
        Some((site, false)) => (site, Admitted::Host { site: &site.name }, Some(flow.tunnel_peer)),
        None => return Err("not_a_remote_gateway_or_host"),
    };
    if !site.policy.is_empty() && !site.policy.iter().any(|p| p.matches(source, destination)) {
        return Err("not_in_site_policy");
    }
    Ok(admitted)
}

/// Decides a peer's stream by `admission`, and accounts for the decision alike for TCP and
/// UDP: an admitted stream is logged (debug, with what the peer was admitted as); a refused one
/// is counted against the peer's site and in `tapproof_policy_denials_total`, kept in the denial
/// log and warned. The admitted peer's site, or the refusal's reason.
pub(crate) fn decide<'a>(
    state: &AgentState,
    config: &'a AgentConfig,
    peer: &SpiffeId,
    flow: Flow,
    protocol: Protocol,
) -> Result<&'a str, &'static str> {
    let destination = flow.destination;
    let protocol_name = protocol.as_str();
    match admission(config, peer, flow) {
        Ok(who) => {
            let (admitted_as, site) = match who {
                Admitted::Gateway { site } => ("gateway", site),
                Admitted::Host { site } => ("host", site),
            };
            debug!(peer_id = %peer, %destination, protocol = protocol_name, source = ?flow.named_source, admitted_as, site, "gateway stream admitted");
            Ok(site)
        }
        Err(reason) => {
            let metrics = &state.metrics;
            if let Some(site) = site_of_peer(config, peer) {
                state.sites.refused(metrics, site, Direction::From);
            }
            metrics
                .policy_denials
                .get_or_create(&DenialLabels {
                    service: GATEWAY_SERVICE.to_owned(),
                    reason,
                })
                .inc();
            let what = match protocol {
                Protocol::Tcp => destination.to_string(),
                Protocol::Udp => format!("udp {destination}"),
            };
            state.record_denial(peer, &what, reason);
            warn!(peer_id = %peer, %destination, protocol = protocol_name, reason, "gateway stream refused");
            Err(reason)
        }
    }
}

/// The remote site a peer belongs to, as `admission` recognises it (its gateways' `server_id`,
/// or a host its `allow` names): the site a refusal is counted against.
pub fn site_of_peer<'a>(config: &'a AgentConfig, peer: &SpiffeId) -> Option<&'a str> {
    peer_site(&config.gateway.as_ref()?.remote, peer).map(|(s, _)| s.name.as_str())
}

/// The site whose gateways prove `peer` (`true`), else the first site whose `allow` names it.
fn peer_site<'a>(sites: &'a [RemoteSite], peer: &SpiffeId) -> Option<(&'a RemoteSite, bool)> {
    if let Some(site) = sites.iter().find(|s| s.server_id == *peer) {
        return Some((site, true));
    }
    sites
        .iter()
        .find(|s| tapproof_identity::pattern::allowed(&s.allow, peer))
        .map(|s| (s, false))
}

/// What `admission` looks at besides the peer's identity.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    /// The `ADDR:PORT` the stream asks for.
    pub destination: SocketAddr,
    /// The host behind the peer gateway, as the peer names it (header `tapproof-source`).
    pub named_source: Option<IpAddr>,
    /// The address the peer's tunnel comes from.
    pub tunnel_peer: IpAddr,
}

/// The request header in which a gateway names the host a stream is for.
pub const SOURCE_HEADER: &str = "tapproof-source";

/// The host a stream's `tapproof-source` header names, if it names one.
pub fn named_source<B>(request: &http::Request<B>) -> Option<IpAddr> {
    let text = request.headers().get(SOURCE_HEADER)?.to_str().ok()?;
    text.parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| text.parse::<IpAddr>())
        .ok()
        .map(|ip| tapproof_audit::canonical(SocketAddr::new(ip, 0)).ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CONTRACT: &str = r#"
trust_domain = "example.org"
[identity]
cert = "/c"
key = "/k"
bundle = "/b"
[gateway]
networks = ["10.1.0.0/16"]
[[gateway.remote]]
name = "dc-b"
networks = ["10.2.0.0/16"]
gateways = ["192.0.2.2:15008"]
server_id = "spiffe://example.org/node/gw-b"
"#;

    /// A flow to `destination` whose peer tunnel comes from 10.2.0.7, naming `source`.
    fn flow(destination: &str, source: Option<&str>) -> Flow {
        Flow {
            destination: destination.parse().unwrap(),
            named_source: source.map(|s| {
                s.parse::<SocketAddr>()
                    .map(|a| a.ip())
                    .unwrap_or_else(|_| s.parse().unwrap())
            }),
            tunnel_peer: "10.2.0.7".parse().unwrap(),
        }
    }

    fn parse(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(Path::new("g.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_contract_parses_and_routes_by_network() {
        let c = parse(CONTRACT).unwrap();
        assert!(c.uses_capture() && c.serves_tunnels());
        let site = site_for(c.remote_sites(), "10.2.3.4".parse().unwrap()).unwrap();
        assert_eq!(site.name, "dc-b");
        assert!(site_for(c.remote_sites(), "10.3.0.1".parse().unwrap()).is_none());
        let r = route(site, "10.2.3.4:80".parse().unwrap());
        assert_eq!(r.service, "10.2.3.4:80");
        assert_eq!(
            r.server_id.as_ref().unwrap().to_string(),
            "spiffe://example.org/node/gw-b"
        );
        let gw_b: SpiffeId = "spiffe://example.org/node/gw-b".parse().unwrap();
        let other: SpiffeId = "spiffe://example.org/node/web-1".parse().unwrap();
        // The far side of the same contract: gw-b may reach 10.1/16 here, nobody else may.
        let to = |d: &str| flow(d, None);
        assert!(admission(&c, &gw_b, to("10.1.0.9:22")).is_ok());
        assert_eq!(
            admission(&c, &other, to("10.1.0.9:22")),
            Err("not_a_remote_gateway_or_host")
        );
        assert_eq!(
            admission(&c, &gw_b, to("10.9.0.9:22")),
            Err("not_a_local_network")
        );
    }

    #[test]
    fn a_sites_hosts_are_admitted_by_its_allow_and_hosts_use_remote() {
        let c = parse(&format!(
            "{CONTRACT}allow = [\"spiffe://example.org/node/web-1\", \"spiffe://example.org/node/db/*\"]\n"
        ))
        .unwrap();
        let host: SpiffeId = "spiffe://example.org/node/db/7".parse().unwrap();
        let gw_b: SpiffeId = "spiffe://example.org/node/gw-b".parse().unwrap();
        let stranger: SpiffeId = "spiffe://example.org/node/other".parse().unwrap();
        let to = flow("10.1.0.9:22", None);
        assert_eq!(admission(&c, &host, to), Ok(Admitted::Host { site: "dc-b" }));
        assert_eq!(admission(&c, &gw_b, to), Ok(Admitted::Gateway { site: "dc-b" }));
        assert_eq!(admission(&c, &stranger, to), Err("not_a_remote_gateway_or_host"));
        // A host's own [[remote]]: the same site fields; no allow, and not beside [gateway].
        let site = "[[remote]]\nname = \"dc-b\"\nnetworks = [\"10.2.0.0/16\"]\ngateways = [\"192.0.2.2:15008\"]\nserver_id = \"spiffe://example.org/node/gw-b\"\n";
        let head = CONTRACT.split("[gateway]").next().unwrap();
        let h = parse(&format!("{head}{site}")).unwrap();
        assert!(h.uses_capture() && !h.serves_tunnels());
        assert_eq!(
            site_for(h.remote_sites(), "10.2.9.9".parse().unwrap())
                .unwrap()
                .name,
            "dc-b"
        );
        assert_eq!(admission(&h, &gw_b, to), Err("not_a_gateway"));
        // Its own UDP to them comes to the agent by the gateway defaults' mark and table.
        assert_eq!(
            h.udp_capture(),
            Some((
                crate::config::DEFAULT_UDP_MARK,
                crate::config::DEFAULT_UDP_ROUTE_TABLE
            ))
        );
        assert_eq!(parse(head).unwrap().udp_capture(), None);
        let e = parse(&format!("{head}{site}[capture]\nmark = 0x74700002\n")).unwrap_err();
        assert!(e.contains("capture.mark: must differ from 0x74700002"), "{e}");
        let e = parse(&format!("{CONTRACT}{site}")).unwrap_err();
        assert!(
            e.contains("remote: a gateway lists its remote sites in [[gateway.remote]]"),
            "{e}"
        );
        let e = parse(&format!(
            "{head}{site}allow = [\"spiffe://example.org/node/x\"]\n"
        ))
        .unwrap_err();
        assert!(e.contains("remote[0].allow"), "{e}");
        let e = parse(&format!(
            "{head}{}",
            site.replace("gateways = [\"192.0.2.2:15008\"]", "gateways = []")
        ))
        .unwrap_err();
        assert!(e.contains("remote[0].gateways"), "{e}");
    }

    #[test]
    fn a_sites_policy_admits_flows_by_source_destination_and_port() {
        let policy = "[[gateway.remote.policy]]\nfrom = [\"10.2.5.0/24\"]\nto = [\"10.1.0.0/24\"]\nports = [5432, \"8000-8100\"]\n";
        let c = parse(&format!(
            "{CONTRACT}allow = [\"spiffe://example.org/node/db/*\"]\n{policy}"
        ))
        .unwrap();
        let gw_b: SpiffeId = "spiffe://example.org/node/gw-b".parse().unwrap();
        let host: SpiffeId = "spiffe://example.org/node/db/7".parse().unwrap();
        for (peer, f, want) in [
            (&gw_b, flow("10.1.0.9:5432", Some("10.2.5.1:40000")), Ok(())),
            (&gw_b, flow("10.1.0.9:8050", Some("10.2.5.1")), Ok(())),
            (
                &gw_b,
                flow("10.1.0.9:8101", Some("10.2.5.1:1")),
                Err("not_in_site_policy"),
            ),
            (
                &gw_b,
                flow("10.1.1.9:5432", Some("10.2.5.1:1")),
                Err("not_in_site_policy"),
            ),
            (
                &gw_b,
                flow("10.1.0.9:5432", Some("10.2.6.1:1")),
                Err("not_in_site_policy"),
            ),
            // No source named: a policy with `from` cannot match.
            (&gw_b, flow("10.1.0.9:5432", None), Err("not_in_site_policy")),
            // A host's source is its tunnel's address (10.2.0.7 here), whatever it names.
            (
                &host,
                flow("10.1.0.9:5432", Some("10.2.5.1:1")),
                Err("not_in_site_policy"),
            ),
        ] {
            assert_eq!(admission(&c, peer, f).map(drop), want, "{f:?}");
        }
        for (bad, says) in [
            (
                policy.replace("10.1.0.0/24", "10.9.0.0/24"),
                "gateway.remote[0].policy[0].to: 10.9.0.0/24 is not within this gateway's networks",
            ),
            (
                policy.replace("10.2.5.0/24", "10.3.0.0/24"),
                "gateway.remote[0].policy[0].from: 10.3.0.0/24 is not within dc-b's networks",
            ),
            (policy.replace("5432", "0"), "port 0 is not a port"),
            (
                policy.replace("8000-8100", "8100-8000"),
                "\"8100-8000\" is not a port or a range",
            ),
        ] {
            let e = parse(&format!("{CONTRACT}{bad}")).unwrap_err();
            assert!(e.contains(says), "{says}: {e}");
        }
    }

    #[test]
    fn loops_overlaps_and_gaps_are_refused_naming_the_key() {
        for (bad, says) in [
            (CONTRACT.replace("\"10.2.0.0/16\"", "\"10.1.2.0/24\""), "gateway.remote[0].networks: 10.1.2.0/24 overlaps this site's own network"),
            (CONTRACT.replace("networks = [\"10.1.0.0/16\"]", "networks = []"), "gateway.networks: is empty"),
            (CONTRACT.replace("gateways = [\"192.0.2.2:15008\"]", "gateways = []"), "gateway.remote[0].gateways"),
            (CONTRACT.replace("\"10.2.0.0/16\"", "\"10.2.0.0/33\""), "prefix must be 0 to 32"),
            (
                format!("{CONTRACT}[[gateway.remote]]\nname = \"dc-c\"\nnetworks = [\"10.2.128.0/17\"]\ngateways = [\"192.0.2.3:15008\"]\nserver_id = \"spiffe://example.org/node/gw-c\"\n"),
                "gateway.remote[1].networks: 10.2.128.0/17 overlaps 10.2.0.0/16 of gateway.remote[0] (dc-b)",
            ),
            (CONTRACT.replace("spiffe://example.org/node/gw-b", "spiffe://other.org/node/gw-b"), "gateway.remote[0].server_id"),
        ] {
            let e = parse(&bad).unwrap_err();
            assert!(e.contains(says), "{says}: {e}");
        }
    }
}

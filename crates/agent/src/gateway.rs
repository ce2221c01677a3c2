//! The site-gateway role (`[gateway]`). Hosts of the local networks route remote sites' networks
//! via this host; `capture.rs` redirects that routed TCP (nftables PREROUTING, `nft.rs`) to the
//! capture listener, and `route` carries each connection to the remote site's gateways as a
//! CONNECT stream whose authority is the real destination (`ADDR:PORT`). On the far side
//! `admit` decides whether a peer's stream may reach such an address: it must be in a network
//! this gateway fronts, and the peer must prove a remote site's `server_id`. Routed traffic to a
//! remote site that is not carried (other protocols) is dropped by the rules, never forwarded in
//! plaintext across the interconnect.

use crate::config::{AgentConfig, GatewayConfig, OutboundConfig, RemoteSite};
use std::net::{IpAddr, SocketAddr};
use tapproof_identity::SpiffeId;

/// The remote site whose networks hold `ip`.
pub fn site_for(gateway: &GatewayConfig, ip: IpAddr) -> Option<&RemoteSite> {
    gateway
        .remote
        .iter()
        .find(|s| s.networks.iter().any(|n| n.contains(ip)))
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
    }
}

/// Why a peer's stream to `destination` (an `ADDR:PORT` authority) is refused here, or `None`
/// when this gateway carries it: the stable reason is a metric label.
pub fn refusal(config: &AgentConfig, peer: &SpiffeId, destination: SocketAddr) -> Option<&'static str> {
    let Some(g) = &config.gateway else {
        return Some("not_a_gateway");
    };
    if !g.networks.iter().any(|n| n.contains(destination.ip())) {
        return Some("not_a_local_network");
    }
    if !g.remote.iter().any(|s| s.server_id == *peer) {
        return Some("not_a_remote_gateway");
    }
    None
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

    fn parse(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(Path::new("g.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_contract_parses_and_routes_by_network() {
        let c = parse(CONTRACT).unwrap();
        assert!(c.uses_capture() && c.serves_tunnels());
        let g = c.gateway.as_ref().unwrap();
        let site = site_for(g, "10.2.3.4".parse().unwrap()).unwrap();
        assert_eq!(site.name, "dc-b");
        assert!(site_for(g, "10.3.0.1".parse().unwrap()).is_none());
        let r = route(site, "10.2.3.4:80".parse().unwrap());
        assert_eq!(r.service, "10.2.3.4:80");
        assert_eq!(
            r.server_id.as_ref().unwrap().to_string(),
            "spiffe://example.org/node/gw-b"
        );
        let gw_b: SpiffeId = "spiffe://example.org/node/gw-b".parse().unwrap();
        let other: SpiffeId = "spiffe://example.org/node/web-1".parse().unwrap();
        // The far side of the same contract: gw-b may reach 10.1/16 here, nobody else may.
        assert_eq!(refusal(&c, &gw_b, "10.1.0.9:22".parse().unwrap()), None);
        assert_eq!(
            refusal(&c, &other, "10.1.0.9:22".parse().unwrap()),
            Some("not_a_remote_gateway")
        );
        assert_eq!(
            refusal(&c, &gw_b, "10.9.0.9:22".parse().unwrap()),
            Some("not_a_local_network")
        );
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

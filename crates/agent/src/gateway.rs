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
use std::net::{IpAddr, SocketAddr};
use tapproof_identity::SpiffeId;

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
    destination: SocketAddr,
) -> Result<Admitted<'a>, &'static str> {
    let Some(g) = &config.gateway else {
        return Err("not_a_gateway");
    };
    if !g.networks.iter().any(|n| n.contains(destination.ip())) {
        return Err("not_a_local_network");
    }
    if let Some(site) = g.remote.iter().find(|s| s.server_id == *peer) {
        return Ok(Admitted::Gateway { site: &site.name });
    }
    if let Some(site) = g
        .remote
        .iter()
        .find(|s| tapproof_identity::pattern::allowed(&s.allow, peer))
    {
        return Ok(Admitted::Host { site: &site.name });
    }
    Err("not_a_remote_gateway_or_host")
}

/// `admission`'s refusal reason, or `None` when the stream is carried.
pub fn refusal(config: &AgentConfig, peer: &SpiffeId, destination: SocketAddr) -> Option<&'static str> {
    admission(config, peer, destination).err()
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
        assert_eq!(refusal(&c, &gw_b, "10.1.0.9:22".parse().unwrap()), None);
        assert_eq!(
            refusal(&c, &other, "10.1.0.9:22".parse().unwrap()),
            Some("not_a_remote_gateway_or_host")
        );
        assert_eq!(
            refusal(&c, &gw_b, "10.9.0.9:22".parse().unwrap()),
            Some("not_a_local_network")
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
        let to: SocketAddr = "10.1.0.9:22".parse().unwrap();
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

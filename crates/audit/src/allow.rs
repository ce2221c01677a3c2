//! Accepted exceptions: plaintext links an operator has decided to live with, each with the reason
//! the report prints beside it. A rule matches when every field it gives matches.

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllowError {
    #[error("audit.allow[{index}]: {detail}")]
    Invalid { index: usize, detail: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// The other end: an address (`10.0.0.5`) or a network (`10.0.0.0/24`).
    #[serde(default)]
    pub peer: Option<String>,
    /// A port of the link, on either end (the service's port).
    #[serde(default)]
    pub port: Option<u16>,
    /// The local process name (as in /proc/PID/comm).
    #[serde(default)]
    pub process: Option<String>,
    /// Why this plaintext link is accepted; printed in every report.
    pub reason: String,
}

/// An address or CIDR network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or network (e.g. 10.0.0.0/24)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: prefix must be 0 to {max}"))?,
        };
        Ok(Self { addr, prefix })
    }

    /// The network's first address, as given (not masked).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The network's address with the host bits cleared (`10.1.2.3/16` -> `10.1.0.0`).
    pub fn base(&self) -> IpAddr {
        let keep = |width: u32| -> u128 {
            if self.prefix == 0 {
                0
            } else {
                (u128::MAX >> (128 - width)) & !((1u128 << (width - u32::from(self.prefix))) - 1)
            }
        };
        match self.addr {
            IpAddr::V4(v4) => IpAddr::V4(std::net::Ipv4Addr::from(
                (u128::from(u32::from(v4)) & keep(32)) as u32,
            )),
            IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & keep(128))),
        }
    }

    /// Whether the two share an address (one contains the other's base address).
    pub fn overlaps(&self, other: &Network) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> u128 {
            match ip {
                IpAddr::V4(v4) => u128::from(u32::from(v4)),
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let width = if ip.is_ipv4() { 32 } else { 128 };
        if self.prefix == 0 {
            return true;
        }
        let shift = width - u32::from(self.prefix);
        bits(self.addr) >> shift == bits(ip) >> shift
    }
}

/// Checks every rule once, at config load, so a typo is an error and not a silent non-match.
pub fn validate(rules: &[AllowRule]) -> Result<(), AllowError> {
    for (index, rule) in rules.iter().enumerate() {
        let invalid = |detail: String| AllowError::Invalid { index, detail };
        if rule.reason.trim().is_empty() {
            return Err(invalid(
                "reason is empty: say why this plaintext link is accepted".into(),
            ));
        }
        if rule.peer.is_none() && rule.port.is_none() && rule.process.is_none() {
            return Err(invalid(
                "matches everything: give at least one of peer, port, process".into(),
            ));
        }
        if let Some(peer) = &rule.peer {
            Network::parse(peer).map_err(invalid)?;
        }
    }
    Ok(())
}

/// The first rule that accepts this link, if any.
pub fn accepted<'a>(
    rules: &'a [AllowRule],
    local: SocketAddr,
    remote: SocketAddr,
    process: Option<&str>,
) -> Option<&'a AllowRule> {
    rules.iter().find(|r| {
        r.peer
            .as_deref()
            .is_none_or(|p| Network::parse(p).is_ok_and(|n| n.contains(remote.ip())))
            && r.port.is_none_or(|p| p == local.port() || p == remote.port())
            && r.process.as_deref().is_none_or(|p| Some(p) == process)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(peer: Option<&str>, port: Option<u16>, process: Option<&str>) -> AllowRule {
        AllowRule {
            peer: peer.map(Into::into),
            port,
            process: process.map(Into::into),
            reason: "metrics scrape".into(),
        }
    }

    #[test]
    fn networks() {
        let n = Network::parse("10.0.0.0/24").unwrap();
        assert!(n.contains("10.0.0.77".parse().unwrap()));
        assert!(!n.contains("10.0.1.1".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        assert!(Network::parse("10.0.0.1")
            .unwrap()
            .contains("10.0.0.1".parse().unwrap()));
        assert!(Network::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(Network::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Network::parse("10.0.0.0/33").is_err());
        assert!(Network::parse("ten").is_err());
    }

    #[test]
    fn all_given_fields_must_match() {
        let rules = [rule(Some("10.0.0.0/24"), Some(9100), None)];
        let (l, r) = (
            "10.0.0.2:40000".parse().unwrap(),
            "10.0.0.9:9100".parse().unwrap(),
        );
        assert!(accepted(&rules, l, r, None).is_some());
        assert!(accepted(&rules, l, "10.0.0.9:9200".parse().unwrap(), None).is_none());
        assert!(accepted(&rules, l, "10.9.0.9:9100".parse().unwrap(), None).is_none());
        let by_process = [rule(None, None, Some("node_exporter"))];
        assert!(accepted(&by_process, l, r, Some("node_exporter")).is_some());
        assert!(accepted(&by_process, l, r, None).is_none());
    }

    #[test]
    fn bad_rules_are_named() {
        assert!(validate(&[rule(None, None, None)])
            .unwrap_err()
            .to_string()
            .contains("audit.allow[0]"));
        let mut r = rule(Some("10.0.0.0/24"), None, None);
        r.reason = " ".into();
        assert!(validate(&[r])
            .unwrap_err()
            .to_string()
            .contains("reason is empty"));
        let e = validate(&[
            rule(Some("10.0.0.0/24"), None, None),
            rule(Some("nope"), None, None),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("audit.allow[1]") && e.to_string().contains("nope"));
    }
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod base_tests {
    use super::Network;

    #[test]
    fn base_clears_the_host_bits() {
        for (net, base) in [
            ("10.1.2.3/16", "10.1.0.0"),
            ("10.1.2.3/32", "10.1.2.3"),
            ("10.1.2.3/0", "0.0.0.0"),
            ("fd00::1:2/64", "fd00::"),
            ("fd00::1/128", "fd00::1"),
        ] {
            let n: Network = net.parse().unwrap();
            assert_eq!(n.base().to_string(), base, "{net}");
        }
    }
}

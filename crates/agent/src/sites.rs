//! What a site gateway carried between its site and each other site: flows (TCP, UDP), bytes
//! and refusals per remote site and direction, for the metrics and the coverage report (the
//! dashboard's sites and interconnect links). Counted when a flow opens, is refused, or ends.

use crate::metrics::Metrics;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tapproof_audit::SiteTraffic;

/// Which way a flow goes relative to this gateway's site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// This gateway (or host) carried it to the remote site.
    To,
    /// The remote site's gateways or hosts brought it here.
    From,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::To => "to",
            Self::From => "from",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

#[derive(Default)]
pub struct Ledger {
    by_site: Mutex<BTreeMap<(String, Direction), SiteTraffic>>,
}

impl Ledger {
    fn with(&self, site: &str, direction: Direction, f: impl FnOnce(&mut SiteTraffic)) {
        let mut map = self.by_site.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry((site.to_owned(), direction))
            .or_insert_with(|| SiteTraffic {
                site: site.to_owned(),
                direction: direction.as_str().to_owned(),
                ..Default::default()
            });
        f(entry);
    }

    /// A flow opened.
    pub fn opened(&self, metrics: &Metrics, site: &str, direction: Direction, protocol: Protocol) {
        self.with(site, direction, |t| match protocol {
            Protocol::Tcp => t.tcp_flows += 1,
            Protocol::Udp => t.udp_flows += 1,
        });
        metrics.gateway_flow(site, direction.as_str(), protocol.as_str());
    }

    /// A flow ended having carried `sent` bytes towards `site` and `received` from it.
    pub fn ended(&self, metrics: &Metrics, site: &str, direction: Direction, sent: u64, received: u64) {
        self.with(site, direction, |t| {
            t.bytes_sent += sent;
            t.bytes_received += received;
        });
        metrics.gateway_bytes(site, direction.as_str(), sent, received);
    }

    /// A flow refused (from `site`: by identity or site policy; to it: no tunnel).
    pub fn refused(&self, metrics: &Metrics, site: &str, direction: Direction) {
        self.with(site, direction, |t| t.refused += 1);
        metrics.gateway_refused(site, direction.as_str());
    }

    pub fn snapshot(&self) -> Vec<SiteTraffic> {
        let map = self.by_site.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_bytes_and_refusals_add_up_per_site_and_direction() {
        let (ledger, metrics) = (Ledger::default(), Metrics::new(false));
        ledger.opened(&metrics, "dc-b", Direction::To, Protocol::Tcp);
        ledger.opened(&metrics, "dc-b", Direction::To, Protocol::Udp);
        ledger.ended(&metrics, "dc-b", Direction::To, 100, 2000);
        ledger.ended(&metrics, "dc-b", Direction::To, 1, 2);
        ledger.refused(&metrics, "dc-b", Direction::From);
        let s = ledger.snapshot();
        assert_eq!(s.len(), 2);
        let to = s.iter().find(|t| t.direction == "to").unwrap();
        assert_eq!(
            (
                to.tcp_flows,
                to.udp_flows,
                to.bytes_sent,
                to.bytes_received,
                to.refused
            ),
            (1, 1, 101, 2002, 0)
        );
        assert_eq!(s.iter().find(|t| t.direction == "from").unwrap().refused, 1);
    }
}

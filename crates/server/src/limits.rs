//! What one client may cost the control plane. The TLS listener admits a connection only under
//! the total and per-source caps ([`Admission`]); handlers ask [`RateLimits`] before work that an
//! unauthenticated or misbehaving client could repeat (join attempts per source, requests per
//! client, long-polls held per node). Every refusal is counted and logged once per window, not
//! once per attempt: a flood costs the attacker, not the server's disk or logs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The limits, each with a safe default (`tapproof server run --help` lists the flags).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once, in total (also bounded by the fd limit, less a reserve).
    pub max_connections: usize,
    /// Connections open at once from one source address (0: no cap).
    pub max_connections_per_source: usize,
    /// Time for the TLS handshake of a new connection.
    pub handshake_timeout: Duration,
    /// Time for a request's headers (HTTP/1.1), and for the first request of a connection.
    pub header_read_timeout: Duration,
    /// Join attempts per source per minute (a burst of this many, then one every 60/n seconds).
    pub joins_per_minute: u32,
    /// Requests per second per client (identity, or source address without one); 0: no cap.
    pub requests_per_second: u32,
    /// State-feed long-polls one node may hold at once (0: no cap).
    pub long_polls_per_node: usize,
    /// How long after its expiry a node certificate can still renew (0: never). See README
    /// "Outage budget".
    pub expired_renewal_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_source: 64,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            joins_per_minute: 30,
            requests_per_second: 50,
            long_polls_per_node: 4,
            expired_renewal_window: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Counts of refusals, by limit: logged once per window, exported as
/// `tapproof_server_limit_refusals_total{limit}` (each field is that family's member).
#[derive(Debug)]
pub struct Refusals {
    pub connections_total: Counter,
    pub connections_per_source: Counter,
    pub handshake_timeouts: Counter,
    pub joins: Counter,
    pub requests: Counter,
    pub long_polls: Counter,
    family: Family<LimitLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    limit: &'static str,
}

impl Default for Refusals {
    fn default() -> Self {
        let family = Family::<LimitLabels, Counter>::default();
        let member = |limit| family.get_or_create(&LimitLabels { limit }).clone();
        Self {
            connections_total: member("connections_total"),
            connections_per_source: member("connections_per_source"),
            handshake_timeouts: member("handshake_timeout"),
            joins: member("joins_per_source"),
            requests: member("requests_per_client"),
            long_polls: member("long_polls_per_node"),
            family,
        }
    }
}

impl Refusals {
    /// The family to register (its members are this struct's counters).
    pub(crate) fn family(&self) -> Family<LimitLabels, Counter> {
        self.family.clone()
    }
}

pub use tapproof_tls::admission::{Admission, Admitted, Full, LogThrottle};

/// Token buckets by key: `burst` at once, refilled at `per_second`. The table is bounded: when
/// it holds `MAX_KEYS`, full buckets (clients that went quiet) are dropped first, then all.
#[derive(Debug)]
pub struct Buckets<K> {
    burst: f64,
    per_second: f64,
    table: Mutex<HashMap<K, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// When a refusal was last logged for this key (once per window, not per attempt).
    logged: Option<Instant>,
}

const MAX_KEYS: usize = 100_000;
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The answer of [`Buckets::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Ok,
    /// Refused; `log` is true for the first refusal of this key in a minute.
    Refused {
        log: bool,
    },
}

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    pub fn new(burst: u32, per_second: f64) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            per_second,
            table: Mutex::new(HashMap::new()),
        }
    }

    pub fn take(&self, key: &K) -> Take {
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if table.len() >= MAX_KEYS && !table.contains_key(key) {
            let (burst, rate) = (self.burst, self.per_second);
            table.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
            if table.len() >= MAX_KEYS {
                table.clear();
            }
        }
        let b = table.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
            logged: None,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_second).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Take::Ok;
        }
        let log = b.logged.is_none_or(|t| now.duration_since(t) >= LOG_EVERY);
        if log {
            b.logged = Some(now);
        }
        Take::Refused { log }
    }
}

/// The rate limits handlers ask, built from [`Limits`].
#[derive(Debug)]
pub struct RateLimits {
    pub joins: Buckets<IpAddr>,
    pub requests: Option<Buckets<String>>,
    /// Long-polls held per node.
    pub long_polls: Arc<Admission<String>>,
    pub refusals: Refusals,
}

impl RateLimits {
    pub fn new(limits: &Limits) -> Self {
        let joins = limits.joins_per_minute.max(1);
        Self {
            joins: Buckets::new(joins, f64::from(joins) / 60.0),
            requests: (limits.requests_per_second > 0).then(|| {
                Buckets::new(
                    limits.requests_per_second.saturating_mul(4),
                    f64::from(limits.requests_per_second),
                )
            }),
            long_polls: Admission::new(0, limits.long_polls_per_node),
            refusals: Refusals::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_a_burst_then_refuse_and_log_once() {
        let b = Buckets::new(3, 0.0001);
        for _ in 0..3 {
            assert_eq!(b.take(&1), Take::Ok);
        }
        assert_eq!(b.take(&1), Take::Refused { log: true });
        assert_eq!(b.take(&1), Take::Refused { log: false });
        assert_eq!(b.take(&2), Take::Ok, "another key has its own bucket");
    }
}

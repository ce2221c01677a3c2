//! The control plane's metrics, served on the admin listener (`ops.rs`). Every API request
//! passes [`track`]: its route (the router's pattern, never the raw path) and result (`ok`, the
//! `ErrorCode` of a refusal, or the HTTP status of any other answer) are counted and timed, and
//! joins, signings and coverage reports get their own counters by result. The state feed counts
//! its waiting long-polls and times how long a change takes to reach them; a probe loop times
//! the store and reads the CAs' expiry. Limit refusals that never become an HTTP answer
//! (connection caps, handshake timeouts) are counted in `limits::Refusals`, exported here.

use crate::app::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tapproof_api::{paths, ErrorCode};
use tapproof_store::{CaState, Store};

use tapproof_metrics::{latency, LatencyFamily};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CaLabels {
    kind: &'static str,
    state: &'static str,
    id: String,
}

/// How often the probe loop times the store and re-reads the CAs.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// A store probe slower than this counts as a failure (`/readyz` answers 503).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct ServerMetrics {
    pub registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: LatencyFamily<RouteLabels>,
    refusals: Family<CodeLabels, Counter>,
    joins: Family<ResultLabels, Counter>,
    signings: Family<ResultLabels, Counter>,
    coverage_reports: Family<ResultLabels, Counter>,
    feed_watchers: Gauge,
    feed_fanout: Histogram,
    store_probe: Histogram,
    revocation_propagation: Histogram,
    store_up: Gauge,
    ca_not_after: Family<CaLabels, Gauge>,
    /// The newest feed version the change watcher published, and when it noticed it.
    changed: Mutex<Option<(i64, Instant)>>,
}

impl ServerMetrics {
    /// `limit_refusals`: the counters of `limits::Refusals`, exported as they are.
    pub fn new(limit_refusals: &crate::limits::Refusals) -> Self {
        let m = Self {
            registry: Registry::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency),
            refusals: Family::default(),
            joins: Family::default(),
            signings: Family::default(),
            coverage_reports: Family::default(),
            feed_watchers: Gauge::default(),
            feed_fanout: latency(),
            store_probe: latency(),
            // From a second to ten minutes: agents apply a revocation in about a second when
            // connected; the tail is agents that were offline or partitioned.
            revocation_propagation: Histogram::new([
                0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
            ]),
            store_up: Gauge::default(),
            ca_not_after: Family::default(),
            changed: Mutex::new(None),
        };
        let mut root = tapproof_metrics::root_registry();
        let tapproof = root.sub_registry_with_prefix("tapproof");
        tapproof_metrics::register_build_info(tapproof, "server");
        let r = tapproof.sub_registry_with_prefix("server");
        r.register(
            "requests",
            "API requests by route (the router's pattern) and result: ok, the error code of a refusal, or the HTTP status",
            m.requests.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "API request time by route, from routing to the answer (a state-feed long-poll includes its wait)",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        r.register(
            "refusals",
            "API requests refused, by error code",
            m.refusals.clone(),
        );
        r.register(
            "limit_refusals",
            "Refusals by a limit that protects the server (connections, handshake timeouts, joins, request rate, long-polls); connection refusals get no HTTP answer",
            limit_refusals.family(),
        );
        r.register(
            "joins",
            "Join requests by result (ok or the error code)",
            m.joins.clone(),
        );
        r.register(
            "signings",
            "Certificate signing (renewal) requests by result (ok or the error code)",
            m.signings.clone(),
        );
        r.register(
            "coverage_reports",
            "Coverage reports received by result (ok or the error code)",
            m.coverage_reports.clone(),
        );
        r.register(
            "feed_watchers",
            "State-feed long-polls waiting now (about one per connected agent)",
            m.feed_watchers.clone(),
        );
        r.register_with_unit(
            "feed_fanout_duration",
            "Time from the server noticing a change (revocation, directory, policy, CA) to a waiting long-poll's answer, per answer",
            Unit::Seconds,
            m.feed_fanout.clone(),
        );
        r.register_with_unit(
            "store_probe_duration",
            "Time of the store probe (one read, every 10 s and per /readyz)",
            Unit::Seconds,
            m.store_probe.clone(),
        );
        r.register_with_unit(
            "revocation_propagation",
            "Time from a revocation to each node's acknowledgement that it applied it (the node asked the state feed past the revocation's version); nodes that joined after the revocation are not counted",
            Unit::Seconds,
            m.revocation_propagation.clone(),
        );
        r.register(
            "store_up",
            "1 when the last store probe answered within 3 s, else 0",
            m.store_up.clone(),
        );
        r.register_with_unit(
            "ca_not_after_timestamp",
            "When each CA certificate in the bundle or signing expires (Unix time), by kind, rollover state and store id",
            Unit::Seconds,
            m.ca_not_after.clone(),
        );
        Self { registry: root, ..m }
    }

    /// The exposition for a scrape with this `Accept` header: content type and body.
    pub fn render(&self, accept: Option<&str>) -> (&'static str, String) {
        tapproof_metrics::render(&self.registry, accept)
    }

    fn observe(&self, route: &str, status: u16, code: Option<ErrorCode>, took: Duration) {
        let result = match code {
            Some(code) => code.as_str().to_owned(),
            None if (200..300).contains(&status) => "ok".to_owned(),
            None => status.to_string(),
        };
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                result: result.clone(),
            })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(took.as_secs_f64());
        if let Some(code) = code {
            self.refusals
                .get_or_create(&CodeLabels { code: code.as_str() })
                .inc();
        }
        let by_result = match route {
            paths::JOIN => Some(&self.joins),
            paths::SIGN => Some(&self.signings),
            paths::COVERAGE => Some(&self.coverage_reports),
            _ => None,
        };
        if let Some(family) = by_result {
            family.get_or_create(&ResultLabels { result }).inc();
        }
    }

    /// A long-poll starts waiting; it stops counting when the guard drops.
    pub(crate) fn watching(&self) -> Watching {
        self.feed_watchers.inc();
        Watching(self.feed_watchers.clone())
    }

    /// The change watcher is about to publish feed version `v`.
    pub(crate) fn change_noticed(&self, v: i64) {
        *self.changed.lock().unwrap_or_else(|p| p.into_inner()) = Some((v, Instant::now()));
    }

    /// A long-poll woken by the change to `v` answers now.
    pub(crate) fn change_delivered(&self, v: i64) {
        let noticed = *self.changed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, at)) = noticed.filter(|(seen, _)| *seen == v) {
            self.feed_fanout.observe(at.elapsed().as_secs_f64());
        }
    }

    /// A node applied a revocation `seconds` after it was made.
    pub(crate) fn revocation_applied(&self, seconds: i64) {
        self.revocation_propagation.observe(seconds.max(0) as f64);
    }

    /// Times one store read (bounded by `PROBE_TIMEOUT`) and re-reads the CAs' expiry; the
    /// error names what failed.
    pub(crate) async fn probe(&self, store: &dyn Store) -> Result<(), String> {
        let started = Instant::now();
        let read = tokio::time::timeout(PROBE_TIMEOUT, store.ca_list()).await;
        self.store_probe.observe(started.elapsed().as_secs_f64());
        let cas = match read {
            Ok(Ok(cas)) => cas,
            Ok(Err(e)) => {
                self.store_up.set(0);
                return Err(format!("store unreachable: {e}"));
            }
            Err(_) => {
                self.store_up.set(0);
                return Err(format!(
                    "store unreachable: no answer within {} s",
                    PROBE_TIMEOUT.as_secs()
                ));
            }
        };
        self.store_up.set(1);
        self.ca_not_after.clear();
        for ca in cas.iter().filter(|c| c.state != CaState::Retired) {
            self.ca_not_after
                .get_or_create(&CaLabels {
                    kind: ca.kind.as_str(),
                    state: ca.state.as_str(),
                    id: ca.id.to_string(),
                })
                .set(ca.not_after);
        }
        Ok(())
    }
}

/// Counts a waiting long-poll while it lives.
pub(crate) struct Watching(Gauge);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Middleware on every API route: counts and times the request by route and result.
pub(crate) async fn track(
    State(s): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let code = response.extensions().get::<ErrorCode>().copied();
    s.metrics
        .observe(&route, response.status().as_u16(), code, started.elapsed());
    response
}

/// The probe loop: the store's latency and the CAs' expiry, every `PROBE_EVERY`.
pub(crate) async fn probe_loop(state: Arc<AppState>) {
    loop {
        if let Err(e) = state.metrics.probe(&*state.store).await {
            tracing::warn!(error = %e, "control plane: store probe failed");
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

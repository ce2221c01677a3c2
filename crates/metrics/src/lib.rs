//! What both roles' `/metrics` share, so the agent and the control plane cannot drift apart:
//!
//! - [`render`]: content negotiation. A plain scrape (no `Accept`, or `text/plain`) gets the
//!   Prometheus text format 0.0.4; a scraper that asks for `application/openmetrics-text` gets
//!   OpenMetrics 1.0. prometheus-client writes only OpenMetrics, so the Prometheus form is derived
//!   from it ([`openmetrics_to_prometheus`]): counter families are named with their `_total`
//!   samples, `info` families become gauges, `# UNIT` and `# EOF` go. Every family keeps its HELP.
//! - [`ProcessCollector`]: `process_*` metrics read from `/proc/self` and `getrusage` at scrape
//!   time.
//! - [`root_registry`]: the unprefixed registry holding the process metrics.
//! - [`register_build_info`]: `tapproof_build_info{version, role} 1`.
//! - [`LATENCY_BUCKETS`]: the buckets of every latency histogram.

use prometheus_client::registry::Registry;

mod process;

pub use process::ProcessCollector;

/// Histogram buckets (seconds) of every latency histogram of both roles: 1 ms to 30 s. A
/// handshake on loopback takes ~1 ms, one across a WAN 50-300 ms, a control-plane call under
/// load up to seconds; the top buckets catch timeouts.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram with [`LATENCY_BUCKETS`].
pub fn latency() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(LATENCY_BUCKETS)
}

/// A family of latency histograms by label set `L`.
pub type LatencyFamily<L> = prometheus_client::metrics::family::Family<
    L,
    prometheus_client::metrics::histogram::Histogram,
    fn() -> prometheus_client::metrics::histogram::Histogram,
>;

/// `Content-Type` of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of OpenMetrics.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition of `registry` for a scrape whose `Accept` header is `accept`: its content type
/// and body.
pub fn render(registry: &Registry, accept: Option<&str>) -> (&'static str, String) {
    let mut openmetrics = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut openmetrics, registry);
    if wants_openmetrics(accept) {
        (OPENMETRICS_TEXT, openmetrics)
    } else {
        (PROMETHEUS_TEXT, openmetrics_to_prometheus(&openmetrics))
    }
}

/// Whether an `Accept` header asks for OpenMetrics (Prometheus sends
/// `application/openmetrics-text;version=1.0.0,...;q=0.5,text/plain;version=0.0.4;q=0.4,...`
/// when it can parse it). A media range with `q=0` is a refusal.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition written by prometheus-client.
pub fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    // Metadata lines name the family; in the Prometheus format they must name the samples.
    // prometheus-client writes `# HELP`, then `# TYPE`, then (optionally) `# UNIT`, then the
    // samples, so the TYPE line decides the suffix for the HELP line just before it.
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name, help));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (sample_name, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "stateset" => (name.to_string(), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            if let Some((help_name, help)) = pending_help.take() {
                if help_name == name {
                    out.push_str(&format!("# HELP {sample_name} {help}\n"));
                } else {
                    out.push_str(&format!("# HELP {help_name} {help}\n"));
                }
            }
            out.push_str(&format!("# TYPE {sample_name} {kind}\n"));
            continue;
        }
        if let Some((name, help)) = pending_help.take() {
            out.push_str(&format!("# HELP {name} {help}\n"));
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The registry a role's `/metrics` renders: unprefixed, holding the [`ProcessCollector`] (whose
/// `process_*` names every dashboard expects). Register the role's own metrics in
/// `root.sub_registry_with_prefix("tapproof")`, with [`register_build_info`] among them.
pub fn root_registry() -> Registry {
    let mut root = Registry::default();
    root.register_collector(Box::new(ProcessCollector::default()));
    root
}

/// Registers `tapproof_build_info{version, role} 1` (the registry should carry the `tapproof`
/// prefix).
pub fn register_build_info(registry: &mut Registry, role: &'static str) {
    let info = prometheus_client::metrics::info::Info::new(vec![
        ("version", env!("CARGO_PKG_VERSION")),
        ("role", role),
    ]);
    registry.register("build", "The running tapproof build: its version and role", info);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    fn registry() -> Registry {
        let mut r = Registry::with_prefix("tapproof");
        let c = Counter::<u64>::default();
        c.inc();
        r.register("tunnels", "Tunnels established", c);
        r.register("open", "Open now", Gauge::<i64>::default());
        r.register_with_unit(
            "handshake_duration",
            "Handshake time",
            prometheus_client::registry::Unit::Seconds,
            Histogram::new(LATENCY_BUCKETS),
        );
        register_build_info(&mut r, "agent");
        r
    }

    #[test]
    fn a_plain_scrape_gets_prometheus_text_with_help_on_every_sample_family() {
        let (ctype, body) = render(&registry(), None);
        assert_eq!(ctype, PROMETHEUS_TEXT);
        assert!(
            body.contains("# HELP tapproof_tunnels_total Tunnels established"),
            "{body}"
        );
        assert!(body.contains("# TYPE tapproof_tunnels_total counter\ntapproof_tunnels_total 1\n"));
        assert!(body.contains("# TYPE tapproof_build_info gauge\n"));
        assert!(body.contains("tapproof_build_info{version=\""));
        assert!(body.contains("# TYPE tapproof_handshake_duration_seconds histogram\n"));
        assert!(!body.contains("# EOF") && !body.contains("# UNIT"));
        // Every TYPE has the HELP of the same name just before it.
        let lines: Vec<&str> = body.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(lines[i - 1].starts_with(&format!("# HELP {name} ")), "{body}");
            }
        }
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let (ctype, body) = render(&registry(), Some(prometheus_accept));
        assert_eq!(ctype, OPENMETRICS_TEXT);
        assert!(body.ends_with("# EOF\n"));
        assert!(body.contains("# TYPE tapproof_tunnels counter\n"));
        for accept in ["text/plain", "*/*", "application/openmetrics-text;q=0", ""] {
            assert_eq!(render(&registry(), Some(accept)).0, PROMETHEUS_TEXT, "{accept}");
        }
    }
}

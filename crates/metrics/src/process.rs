//! `process_*` metrics of the running process, in the names every Prometheus client library
//! uses (so existing dashboards and alerts work): CPU seconds, resident and virtual memory, open
//! and maximum file descriptors, start time. Read at scrape time from `getrusage`,
//! `/proc/self/status`, `/proc/self/fd` and `getrlimit`; a value that cannot be read is left out
//! of that scrape rather than reported as 0.

use nix::sys::resource::{getrlimit, getrusage, Resource, UsageWho};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug)]
pub struct ProcessCollector {
    /// When the collector was made (at process start): the start time reported.
    started_unix: f64,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self {
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }
    }
}

/// A `kB` field of `/proc/self/status` (`VmRSS`, `VmSize`), in bytes.
fn status_kib(status: &str, field: &str) -> Option<i64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: i64 = line[field.len()..]
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            let cpu = ConstCounter::new(secs(usage.user_time()) + secs(usage.system_time()));
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                cpu.metric_type(),
            )?;
            cpu.encode(m)?;
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            if let Some(rss) = status_kib(&status, "VmRSS") {
                gauge(
                    &mut encoder,
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes",
                    rss as f64,
                )?;
            }
            if let Some(vsz) = status_kib(&status, "VmSize") {
                gauge(
                    &mut encoder,
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes",
                    vsz as f64,
                )?;
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                fds.count() as f64,
            )?;
        }
        if let Ok((soft, _hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit)",
                soft as f64,
            )?;
        }
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            self.started_unix,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn process_metrics_are_read_from_this_process() {
        let mut r = Registry::default();
        r.register_collector(Box::new(ProcessCollector::default()));
        let (_, body) = crate::render(&r, None);
        let value = |name: &str| -> f64 {
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing in\n{body}"))
                .parse()
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_cpu_seconds_total") > 0.0);
        assert!(body.contains("# TYPE process_cpu_seconds_total counter"));
    }
}

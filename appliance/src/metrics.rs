//! Prometheus text metrics: requests by route and status, request latency, sandbox
//! boots and boot time, running sandboxes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BOOT_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0];

struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {total}");
    }
}

pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Histogram,
    boots: AtomicU64,
    boot_failures: AtomicU64,
    boot_time: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            latency: Histogram::new(LATENCY_BUCKETS),
            boots: AtomicU64::new(0),
            boot_failures: AtomicU64::new(0),
            boot_time: Histogram::new(BOOT_BUCKETS),
        }
    }

    /// `route` is the route pattern (e.g. `/api/projects/{id}`), never the raw path,
    /// so label cardinality stays bounded.
    pub fn record_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry((route, status)).or_insert(0) += 1;
        }
        self.latency.observe(elapsed);
    }

    pub fn record_boot(&self, elapsed: Duration) {
        self.boots.fetch_add(1, Ordering::Relaxed);
        self.boot_time.observe(elapsed);
    }

    pub fn record_boot_failure(&self) {
        self.boot_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, running_sandboxes: usize) -> String {
        let mut out = String::new();
        out.push_str("# HELP appliance_sandboxes_running Sandboxes currently running.\n");
        out.push_str("# TYPE appliance_sandboxes_running gauge\n");
        let _ = writeln!(out, "appliance_sandboxes_running {running_sandboxes}");
        out.push_str("# HELP appliance_sandbox_boots_total Sandboxes booted successfully.\n");
        out.push_str("# TYPE appliance_sandbox_boots_total counter\n");
        let _ = writeln!(out, "appliance_sandbox_boots_total {}", self.boots.load(Ordering::Relaxed));
        out.push_str("# HELP appliance_sandbox_boot_failures_total Sandbox boots that failed.\n");
        out.push_str("# TYPE appliance_sandbox_boot_failures_total counter\n");
        let _ = writeln!(out, "appliance_sandbox_boot_failures_total {}", self.boot_failures.load(Ordering::Relaxed));
        out.push_str(
            "# HELP appliance_sandbox_boot_seconds Time from boot request to a sandbox ready for its environment.\n",
        );
        out.push_str("# TYPE appliance_sandbox_boot_seconds histogram\n");
        self.boot_time.render(&mut out, "appliance_sandbox_boot_seconds");
        out.push_str("# HELP appliance_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE appliance_http_requests_total counter\n");
        if let Ok(map) = self.requests.lock() {
            for ((route, status), count) in map.iter() {
                let _ = writeln!(out, "appliance_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}");
            }
        }
        out.push_str("# HELP appliance_http_request_seconds HTTP request latency.\n");
        out.push_str("# TYPE appliance_http_request_seconds histogram\n");
        self.latency.render(&mut out, "appliance_http_request_seconds");
        out
    }

    /// Gauges read at scrape time: this process's descriptors, threads and memory, and the
    /// runtime's.
    pub fn render_gauges(out: &mut String, runtime: &[(&'static str, &'static str, u64)]) {
        let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).ok();
        let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count() as u64).ok();
        let status = std::fs::read_to_string("/proc/self/status").ok();
        let memory = |field: &str| status.as_deref().and_then(|s| status_bytes(s, field));
        let process = [
            ("process_open_fds", "Open file descriptors of the appliance process.", open_fds),
            ("process_threads", "Threads of the appliance process.", threads),
            ("process_resident_memory_bytes", "Resident memory of the appliance process.", memory("VmRSS:")),
            (
                "process_resident_memory_peak_bytes",
                "The largest resident memory of the appliance process since it started.",
                memory("VmHWM:"),
            ),
        ];
        let all = process.into_iter().chain(runtime.iter().map(|&(n, h, v)| (n, h, Some(v))));
        for (name, help, value) in all {
            if let Some(value) = value {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
            }
        }
    }
}

/// The sealing proxy's egress counters: decisions (forwarded, refused, misdirected,
/// rejected, upstream_failed), bytes each way, secret values scrubbed from responses.
pub fn render_egress(out: &mut String, egress: &proxy::egress_log::EgressSnapshot) {
    out.push_str("# HELP appliance_egress_decisions_total Sandbox requests and tunnels by the proxy's decision.\n");
    out.push_str("# TYPE appliance_egress_decisions_total counter\n");
    for (decision, count) in &egress.decisions {
        let _ = writeln!(out, "appliance_egress_decisions_total{{decision=\"{decision}\"}} {count}");
    }
    let counters = [
        (
            "appliance_egress_bytes_from_sandboxes_total",
            "Bytes sandboxes sent through the proxy.",
            egress.bytes_from_sandboxes,
        ),
        (
            "appliance_egress_bytes_to_sandboxes_total",
            "Bytes the proxy sent back to sandboxes.",
            egress.bytes_to_sandboxes,
        ),
        (
            "appliance_egress_values_scrubbed_total",
            "Secret values replaced by tokens in responses to sandboxes.",
            egress.values_scrubbed,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
    }
}

/// A memory field of /proc/self/status (`VmRSS:`, `VmHWM:`, in kB) in bytes.
fn status_bytes(status: &str, field: &str) -> Option<u64> {
    let kib: u64 =
        status.lines().find_map(|l| l.strip_prefix(field))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::new();
        m.record_request("/api/projects", 201, Duration::from_micros(300));
        m.record_request("/api/projects", 201, Duration::from_millis(3));
        m.record_request("/api/projects/{id}", 404, Duration::from_millis(30));
        m.record_boot(Duration::from_millis(800));
        let text = m.render(2);
        assert!(text.contains("appliance_sandboxes_running 2\n"));
        assert!(text.contains("appliance_http_requests_total{route=\"/api/projects\",status=\"201\"} 2\n"));
        assert!(text.contains("appliance_http_requests_total{route=\"/api/projects/{id}\",status=\"404\"} 1\n"));
        assert!(text.contains("appliance_http_request_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("appliance_http_request_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("appliance_http_request_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("appliance_sandbox_boots_total 1\n"));
        assert!(text.contains("appliance_sandbox_boot_seconds_bucket{le=\"1\"} 1\n"));
    }
}

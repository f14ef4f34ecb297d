//! Egress accounting: every tunnel and plain request the proxy refuses or forwards is
//! logged (sandbox, destination, decision, bytes) and counted per decision, so the
//! operator can see where sandboxes send data. Log lines never carry a secret value
//! or a token: destinations are shown through [`crate::destination::Shown`], which
//! hides a host name carrying a token, and messages are scrubbed before logging.

use std::sync::atomic::{AtomicU64, Ordering};

/// What the proxy did with one request (or a tunnel it refused before any request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Sent upstream.
    Forwarded,
    /// Destination not allowed (allowlist, private address, unregistered sandbox): 403.
    Refused,
    /// Named another host than the connection's destination: 421 (or an SNI refused).
    Misdirected,
    /// Malformed, too large, too slow (400, 408, 413, 431, 429).
    Rejected,
    /// The upstream could not be reached or answered unusably: 502, 504.
    UpstreamFailed,
}

impl Decision {
    pub const ALL: [Decision; 5] =
        [Decision::Forwarded, Decision::Refused, Decision::Misdirected, Decision::Rejected, Decision::UpstreamFailed];

    pub fn name(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Refused => "refused",
            Self::Misdirected => "misdirected",
            Self::Rejected => "rejected",
            Self::UpstreamFailed => "upstream_failed",
        }
    }

    /// The decision an answer of the proxy's own with `status` stands for.
    pub fn of_status(status: u16) -> Self {
        match status {
            403 => Self::Refused,
            421 => Self::Misdirected,
            502 | 504 => Self::UpstreamFailed,
            _ => Self::Rejected,
        }
    }
}

/// Counters for `/metrics`, shared by every connection.
#[derive(Debug, Default)]
pub struct EgressCounters {
    decisions: [AtomicU64; 5],
    bytes_from_sandboxes: AtomicU64,
    bytes_to_sandboxes: AtomicU64,
    values_scrubbed: AtomicU64,
}

/// One read of the counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressSnapshot {
    /// (decision name, count), in [`Decision::ALL`] order.
    pub decisions: Vec<(&'static str, u64)>,
    pub bytes_from_sandboxes: u64,
    pub bytes_to_sandboxes: u64,
    /// Secret-value occurrences replaced by tokens in responses.
    pub values_scrubbed: u64,
}

impl EgressCounters {
    pub fn record(&self, decision: Decision) {
        let i = Decision::ALL.iter().position(|d| *d == decision).unwrap_or(0);
        self.decisions[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_traffic(&self, from_sandbox: u64, to_sandbox: u64, scrubbed: u64) {
        self.bytes_from_sandboxes.fetch_add(from_sandbox, Ordering::Relaxed);
        self.bytes_to_sandboxes.fetch_add(to_sandbox, Ordering::Relaxed);
        self.values_scrubbed.fetch_add(scrubbed, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> EgressSnapshot {
        EgressSnapshot {
            decisions: Decision::ALL
                .iter()
                .zip(&self.decisions)
                .map(|(d, c)| (d.name(), c.load(Ordering::Relaxed)))
                .collect(),
            bytes_from_sandboxes: self.bytes_from_sandboxes.load(Ordering::Relaxed),
            bytes_to_sandboxes: self.bytes_to_sandboxes.load(Ordering::Relaxed),
            values_scrubbed: self.values_scrubbed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_decision() {
        let c = EgressCounters::default();
        c.record(Decision::Forwarded);
        c.record(Decision::Forwarded);
        c.record(Decision::of_status(421));
        c.record(Decision::of_status(403));
        c.record(Decision::of_status(504));
        c.record(Decision::of_status(413));
        c.add_traffic(10, 20, 1);
        let s = c.snapshot();
        assert_eq!(
            s.decisions,
            vec![("forwarded", 2), ("refused", 1), ("misdirected", 1), ("rejected", 1), ("upstream_failed", 1)]
        );
        assert_eq!((s.bytes_from_sandboxes, s.bytes_to_sandboxes, s.values_scrubbed), (10, 20, 1));
    }
}

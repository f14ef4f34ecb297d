//! Progress lines: every pipeline step prints what it did, how long it took and whether the
//! result came from the cache, so a 10-minute cold build never looks hung.

use std::time::{Duration, Instant};

pub struct Step {
    name: String,
    started: Instant,
}

/// How a step's output was obtained.
pub enum Outcome {
    Cached,
    Built,
    Done,
}

impl Step {
    pub fn start(name: impl Into<String>) -> Step {
        let name = name.into();
        eprintln!("[image] {name} ...");
        Step { name, started: Instant::now() }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// A progress line inside a long step.
    pub fn note(&self, message: &str) {
        eprintln!("[image]   {} ({}): {message}", self.name, fmt_duration(self.elapsed()));
    }

    pub fn finish(self, outcome: Outcome, detail: &str) -> Duration {
        let how = match outcome {
            Outcome::Cached => "cached",
            Outcome::Built => "built",
            Outcome::Done => "done",
        };
        let elapsed = self.elapsed();
        let sep = if detail.is_empty() { "" } else { ", " };
        eprintln!("[image] {} {how} in {}{sep}{detail}", self.name, fmt_duration(elapsed));
        elapsed
    }
}

pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

pub fn fmt_size(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    format!("{:.1} MiB", bytes as f64 / MIB)
}

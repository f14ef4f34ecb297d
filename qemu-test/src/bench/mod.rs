//! `qemu-test bench vmm` (issue 3): boots the test appliance with `oc.bench=vmm`, lets the
//! test-only `oc-bench` service inside it boot the sandbox guest with our VMM and with QEMU
//! `-M microvm` several times each, and reduces its `BENCH` console lines to one summary line.

pub mod diag;
pub mod memory;
pub mod report;
pub mod runner;
pub mod snapshot;
pub mod templates;

use crate::harness::Appliance;
use image::err;
use image::error::Result;
use report::{Run, Summary, PREFIX};
use std::time::{Duration, Instant};

/// If the console shows no new benchmark line for this long, the run is declared stuck (nested
/// boots have been seen to wedge the whole appliance VM).
const QUIET_LIMIT: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(500);

/// Boots the appliance, waits for every run, prints each, and returns the summary. With
/// `diag_rounds`, oc-bench first prints diagnostic boots (bench::diag).
pub fn vmm(runs: u32, diag_rounds: Option<u32>) -> Result<(Summary, Vec<Run>)> {
    let started = Instant::now();
    let mut args = format!("oc.bench=vmm oc.bench_runs={runs}");
    if let Some(rounds) = diag_rounds {
        args.push_str(&format!(" oc.bench_diag={rounds}"));
    }
    let mut appliance = Appliance::boot_fresh_variant(image::pipeline::Variant::Bench, &args)?;
    eprintln!(
        "[qemu-test] appliance up after {:.1}s; waiting for oc-bench ({runs} runs per VMM)",
        appliance.boot_time.as_secs_f64()
    );
    let mut done: Vec<Run> = Vec::new();
    let mut seen_lines = 0;
    let mut last_news = Instant::now();
    loop {
        let console = appliance.machine.console();
        // Only complete lines: the last one may still be being written.
        let lines: Vec<&str> = console.split('\n').collect();
        let complete = &lines[..lines.len().saturating_sub(1)];
        let bench: Vec<&str> = complete.iter().filter(|l| l.contains(PREFIX)).map(|l| l.trim_end()).collect();
        for line in bench.iter().skip(seen_lines) {
            last_news = Instant::now();
            let text = &line[line.find(PREFIX).unwrap_or(0) + PREFIX.len()..];
            if text.starts_with("run ") {
                let run = Run::parse(line).map_err(|e| err!("{e}"))?;
                eprintln!(
                    "[qemu-test] run {} #{}: first command after {} ms; \
                     resident {} KiB (VmRSS {} KiB), guest RAM resident {} KiB, beyond guest RAM {} KiB",
                    run.vmm.name(),
                    run.n,
                    run.first_command_ms,
                    run.rss_kib,
                    run.vmrss_kib,
                    run.guest_rss_kib,
                    run.overhead_kib()
                );
                done.push(run);
            } else if text == "done" {
                let summary = Summary::from_runs(&done).map_err(|e| err!("{e}"))?;
                eprintln!(
                    "[qemu-test] QEMU's fastest configuration: {} (median); it keeps {:.2} MiB beyond guest RAM (median); {:.0}s in all",
                    summary.qemu_best.name(),
                    summary.qemu_rss_overhead_mib,
                    started.elapsed().as_secs_f64()
                );
                return Ok((summary, done));
            } else if let Some(reason) = text.strip_prefix("error ") {
                return Err(err!("oc-bench failed after {} runs: {reason}", done.len()));
            } else {
                eprintln!("[qemu-test] {text}");
            }
        }
        seen_lines = bench.len();
        if let Some(status) = appliance.machine.try_exit()? {
            return Err(err!(
                "the appliance exited ({status}) during the benchmark\n{}",
                appliance.machine.console_tail(30)
            ));
        }
        if last_news.elapsed() > QUIET_LIMIT {
            return Err(err!(
                "no benchmark progress for {QUIET_LIMIT:?} ({} runs done); last console lines:\n{}",
                done.len(),
                appliance.machine.console_tail(30)
            ));
        }
        std::thread::sleep(POLL);
    }
}

//! Diagnostic boots for `qemu-test bench vmm` with `OC_BENCH_DIAG=N` (kernel argument
//! `oc.bench_diag=N`): before the measured runs, one boot per case prints where its time goes,
//! then N-1 more rounds of the quiet cases (interleaved) give each case a median, so that
//! variants (ELF vs bzImage, huge pages or not) are compared within one appliance boot.
//!
//! - our VMM's own timeline (`OC_VMM_TIMELINE=1`: its milestones and, per console line, the VM
//!   exits that reached userspace), shifted to milliseconds since `spawn()` with the appliance's
//!   CLOCK_MONOTONIC, once with `quiet` and once without (every kernel log line stamped);
//! - KVM's own counters for the VM (debugfs `kvm/<pid>-<fd>/`: all exits, nested page faults,
//!   2 MiB vs 4 KiB mappings), read when the marker appears, for our VMM and for QEMU;
//! - the transparent huge page mode of the appliance kernel and the guest RAM's AnonHugePages.

use super::report::Vmm;
use super::runner::{guest_cmdline, reflink, tail, wait_for_marker, Plan};
use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

const DEBUGFS: &str = "/sys/kernel/debug";
const TIMELINE_PREFIX: &str = "vmm-timeline us=";

struct Case {
    name: &'static str,
    vmm: Vmm,
    elf: bool,
    quiet: bool,
    env: &'static [(&'static str, &'static str)],
}

const CASES: &[Case] = &[
    Case { name: "ours-vmlinux-verbose", vmm: Vmm::Ours, elf: true, quiet: false, env: &[] },
    Case { name: "ours-vmlinux", vmm: Vmm::Ours, elf: true, quiet: true, env: &[] },
    Case { name: "ours-bzimage", vmm: Vmm::Ours, elf: false, quiet: true, env: &[] },
    Case {
        name: "ours-vmlinux-thp-madvise",
        vmm: Vmm::Ours,
        elf: true,
        quiet: true,
        env: &[("OC_VMM_HUGEPAGES", "madvise")],
    },
    Case { name: "ours-vmlinux-no-thp", vmm: Vmm::Ours, elf: true, quiet: true, env: &[("OC_VMM_HUGEPAGES", "never")] },
    Case { name: "qemu-bzimage", vmm: Vmm::Qemu, elf: false, quiet: true, env: &[] },
    Case { name: "qemu-pvh-vmlinux", vmm: Vmm::QemuPvh, elf: true, quiet: true, env: &[] },
];

/// Runs every diagnostic case `rounds` times, printing through `out`; a failed boot is
/// reported and skipped.
pub fn run(plan: &Plan, rounds: u32, out: &dyn Fn(&str)) {
    for knob in ["enabled", "defrag"] {
        let path = format!("/sys/kernel/mm/transparent_hugepage/{knob}");
        let value = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("unreadable: {e}"));
        out(&format!("diag thp {knob}: {}", value.trim()));
    }
    if let Err(e) = mount_debugfs() {
        out(&format!("diag no KVM counters: {e}"));
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    for round in 1..=rounds {
        for (case, times) in CASES.iter().zip(times.iter_mut()) {
            // The verbose boot is for its timeline only: once is enough.
            if round > 1 && !case.quiet {
                continue;
            }
            match run_case(plan, case, round == 1, out) {
                Ok(ms) => times.push(ms),
                Err(e) => out(&format!("diag {} failed: {e}", case.name)),
            }
        }
    }
    for (case, times) in CASES.iter().zip(times.iter()) {
        let list: Vec<String> = times.iter().map(|t| format!("{t:.0}")).collect();
        let median = super::report::median(times).map_or("-".to_string(), |m| format!("{m:.0}"));
        out(&format!("diag median {} first_command_ms={median} runs=[{}]", case.name, list.join(" ")));
    }
}

fn mount_debugfs() -> Result<(), String> {
    if Path::new(DEBUGFS).join("kvm").exists() {
        return Ok(());
    }
    // SAFETY: mount(2) with NUL-terminated literals and no data pointer.
    let rc = unsafe {
        libc::mount(c"none".as_ptr(), c"/sys/kernel/debug".as_ptr(), c"debugfs".as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(format!("mount debugfs: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn monotonic_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into a valid local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

/// One boot; prints its timeline and counters when `detail`; returns the first-command ms.
fn run_case(plan: &Plan, case: &Case, detail: bool, out: &dyn Fn(&str)) -> Result<f64, String> {
    let disk = plan.work_dir.join(format!("diag-{}.ext4", case.name));
    let console = plan.work_dir.join(format!("diag-{}.console", case.name));
    let stderr = plan.work_dir.join(format!("diag-{}.stderr", case.name));
    let _ = std::fs::remove_file(&console);
    reflink(&plan.template, &disk)?;
    let cmdline = if case.quiet { guest_cmdline() } else { guest_cmdline().replace(" quiet", "") };
    let kernel = if case.elf { &plan.kernel } else { &plan.bzimage };
    let mut cmd = plan.command_with(case.vmm, kernel, &cmdline, &disk, &console);
    cmd.env("OC_VMM_TIMELINE", "1");
    for (k, v) in case.env {
        cmd.env(k, v);
    }
    let stderr_file = File::create(&stderr).map_err(|e| format!("create {}: {e}", stderr.display()))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr_file);
    let spawned_us = monotonic_us();
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("start: {e}"))?;
    let marker = wait_for_marker(&mut child, &console, started);
    let counters = kvm_counters(child.id());
    let huge = anon_huge_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&disk);
    let took = marker.map_err(|e| format!("{e}; console: {}; stderr: {}", tail(&console, 5), tail(&stderr, 5)))?;
    let ms = took.as_secs_f64() * 1000.0;
    if !detail {
        let _ = std::fs::remove_file(&console);
        let _ = std::fs::remove_file(&stderr);
        return Ok(ms);
    }
    out(&format!("diag {} first command after {} ms; AnonHugePages {huge} KiB", case.name, took.as_millis()));
    out(&format!("diag {} kvm {}", case.name, counters.unwrap_or_else(|e| format!("unavailable: {e}"))));
    let text = std::fs::read_to_string(&stderr).unwrap_or_default();
    for line in text.lines() {
        if let Some((us, event)) = line.strip_prefix(TIMELINE_PREFIX).and_then(|r| r.split_once(' ')) {
            if let Ok(us) = us.parse::<u64>() {
                let ms = us.saturating_sub(spawned_us) as f64 / 1000.0;
                out(&format!("diag {} +{ms:.1}ms {event}", case.name));
            }
        }
    }
    let _ = std::fs::remove_file(&console);
    let _ = std::fs::remove_file(&stderr);
    Ok(ms)
}

/// KVM's counters for the VM of process `pid`: every non-zero file of its debugfs directory.
fn kvm_counters(pid: u32) -> Result<String, String> {
    let kvm = Path::new(DEBUGFS).join("kvm");
    let prefix = format!("{pid}-");
    let dir = std::fs::read_dir(&kvm)
        .map_err(|e| format!("list {}: {e}", kvm.display()))?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .ok_or_else(|| format!("no {}/{prefix}* directory", kvm.display()))?;
    let mut pairs: Vec<String> = std::fs::read_dir(dir.path())
        .map_err(|e| format!("list {}: {e}", dir.path().display()))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let value = std::fs::read_to_string(e.path()).ok()?;
            let value = value.trim();
            (value != "0" && value.parse::<u64>().is_ok())
                .then(|| format!("{}={value}", e.file_name().to_string_lossy()))
        })
        .collect();
    pairs.sort();
    Ok(pairs.join(" "))
}

/// The process's AnonHugePages (KiB), summed over its mappings.
fn anon_huge_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    smaps
        .lines()
        .filter_map(|l| l.strip_prefix("AnonHugePages:"))
        .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .sum()
}

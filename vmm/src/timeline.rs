//! Opt-in boot timeline for diagnosing where a boot's time goes (`OC_VMM_TIMELINE=1`).
//!
//! The nested guest's own clock is not trustworthy, so the VMM stamps its milestones with the
//! host's CLOCK_MONOTONIC (the same clock a parent process can read before `spawn()`) and
//! prints them to stderr as `vmm-timeline us=<absolute µs> <event>`. It also counts the VM
//! exits that reach userspace, by device, and appends the counts to every console line event.
//! Off by default: then every call is one relaxed atomic load.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The environment variable that turns the timeline on (any non-empty value but "0").
pub const ENV: &str = "OC_VMM_TIMELINE";
/// Every timeline line on stderr starts with this.
pub const PREFIX: &str = "vmm-timeline ";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Kinds of userspace exits that are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Serial,
    I8042,
    OtherPort,
    VirtioMmio,
    OtherMmio,
}

const EXIT_KINDS: [(Exit, &str); 5] = [
    (Exit::Serial, "serial"),
    (Exit::I8042, "i8042"),
    (Exit::OtherPort, "other_port"),
    (Exit::VirtioMmio, "virtio_mmio"),
    (Exit::OtherMmio, "other_mmio"),
];

static EXITS: [AtomicU64; 5] =
    [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// Milestones that are reported only the first time they happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Once {
    KvmRun,
    UserspaceExit,
    SerialByte,
    VirtioAccess,
    QueueNotify,
}

static ONCE: [AtomicBool; 5] = [
    AtomicBool::new(false),
    AtomicBool::new(false),
    AtomicBool::new(false),
    AtomicBool::new(false),
    AtomicBool::new(false),
];

/// Reads the switch from the environment; call once, first thing in `main`.
pub fn init_from_env() {
    let on = std::env::var(ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// CLOCK_MONOTONIC in microseconds (std's Instant hides the absolute value).
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into a valid local.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

/// Records a milestone.
pub fn mark(event: &str) {
    if enabled() {
        emit(event);
    }
}

/// Records a milestone only the first time `which` happens.
pub fn once(which: Once, event: &str) {
    if enabled() && !ONCE[which as usize].swap(true, Ordering::Relaxed) {
        emit(event);
    }
}

/// Counts one userspace exit.
pub fn exit(kind: Exit) {
    if enabled() {
        EXITS[kind as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The exit counts so far, as `name=count` words.
pub fn exit_counts() -> String {
    EXIT_KINDS
        .iter()
        .map(|(kind, name)| format!("{name}={}", EXITS[*kind as usize].load(Ordering::Relaxed)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Records one complete console line (bytes as the guest wrote them), with the exit counts.
pub fn console_line(line: &[u8]) {
    if enabled() {
        let text: String = String::from_utf8_lossy(line).chars().filter(|c| !c.is_control()).take(100).collect();
        emit(&format!("console exits[{}] {text}", exit_counts()));
    }
}

fn emit(event: &str) {
    // One write per line, so lines from several threads never interleave.
    let line = format!("{PREFIX}us={} {event}\n", monotonic_us());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_forward() {
        let a = monotonic_us();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(monotonic_us() >= a + 2000);
    }

    #[test]
    fn counts_are_named_in_a_fixed_order() {
        let text = exit_counts();
        let names: Vec<&str> = text.split(' ').map(|w| w.split('=').next().unwrap_or("")).collect();
        assert_eq!(names, ["serial", "i8042", "other_port", "virtio_mmio", "other_mmio"]);
    }
}

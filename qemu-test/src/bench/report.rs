//! The `BENCH ...` lines: `oc-bench` prints one per measured boot on the appliance console, and
//! `qemu-test bench vmm` parses them and reduces them to the one summary line issue 3 asks for.

use std::fmt;

/// Every benchmark line on the console starts with this (after the supervisor's prefix).
pub const PREFIX: &str = "BENCH ";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    /// Our `vmm` crate.
    Ours,
    /// Debian's QEMU with `-M microvm`, booting the bzImage (its linuxboot option ROM).
    Qemu,
    /// The same QEMU booting the ELF vmlinux through its PVH entry (pvh.bin option ROM).
    QemuPvh,
}

/// Every QEMU configuration measured; the summary compares against the fastest.
pub const QEMU_VARIANTS: [Vmm; 2] = [Vmm::Qemu, Vmm::QemuPvh];

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Ours => "ours",
            Vmm::Qemu => "qemu",
            Vmm::QemuPvh => "qemu-pvh",
        }
    }

    fn from_name(name: &str) -> Option<Vmm> {
        [Vmm::Ours, Vmm::Qemu, Vmm::QemuPvh].into_iter().find(|v| v.name() == name)
    }
}

/// One measured boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub vmm: Vmm,
    pub n: u32,
    /// From spawning the VMM process until its console showed the guest's first command.
    pub first_command_ms: u64,
    /// The VMM process's memory (see bench::memory), from the sample taken after the first
    /// command where the resident memory beyond guest RAM was largest.
    pub vmrss_kib: u64,
    pub rss_kib: u64,
    pub guest_rss_kib: u64,
}

impl Run {
    /// Resident memory of the VMM beyond the guest RAM it has touched.
    pub fn overhead_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_rss_kib)
    }

    /// The console line for this run.
    pub fn line(&self) -> String {
        format!(
            "{PREFIX}run vmm={} n={} first_command_ms={} vmrss_kib={} rss_kib={} guest_rss_kib={} overhead_kib={}",
            self.vmm.name(),
            self.n,
            self.first_command_ms,
            self.vmrss_kib,
            self.rss_kib,
            self.guest_rss_kib,
            self.overhead_kib()
        )
    }

    /// Parses a `BENCH run ...` line (anything before the prefix is ignored).
    pub fn parse(line: &str) -> Result<Run, String> {
        let start = line.find(PREFIX).ok_or_else(|| format!("not a benchmark line: {line:?}"))?;
        let mut words = line[start + PREFIX.len()..].split_whitespace();
        if words.next() != Some("run") {
            return Err(format!("not a run line: {line:?}"));
        }
        let fields: Vec<(&str, &str)> = words.filter_map(|w| w.split_once('=')).collect();
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| *v)
                .ok_or_else(|| format!("{name}= missing in {line:?}"))
        };
        let number = |name: &str| -> Result<u64, String> {
            field(name)?.parse::<u64>().map_err(|_| format!("{name}= is not a number in {line:?}"))
        };
        let vmm =
            field("vmm").and_then(|v| Vmm::from_name(v).ok_or_else(|| format!("unknown vmm {v:?} in {line:?}")))?;
        let n = u32::try_from(number("n")?).map_err(|_| format!("n= out of range in {line:?}"))?;
        Ok(Run {
            vmm,
            n,
            first_command_ms: number("first_command_ms")?,
            vmrss_kib: number("vmrss_kib")?,
            rss_kib: number("rss_kib")?,
            guest_rss_kib: number("guest_rss_kib")?,
        })
    }
}

/// The median of `values` (mean of the middle two for an even count); None when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[mid]),
        _ => Some(f64::midpoint(sorted[mid - 1], sorted[mid])),
    }
}

/// The medians over all runs: the numbers of the final line. QEMU's numbers are those of its
/// fastest configuration (by median first-command time) among those that ran.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub first_command_ms: f64,
    pub qemu_best: Vmm,
    pub qemu_first_command_ms: f64,
    pub vmm_rss_overhead_mib: f64,
    pub qemu_rss_overhead_mib: f64,
}

impl Summary {
    pub fn from_runs(runs: &[Run]) -> Result<Summary, String> {
        let of = |vmm: Vmm, value: fn(&Run) -> f64| -> Result<f64, String> {
            let values: Vec<f64> = runs.iter().filter(|r| r.vmm == vmm).map(value).collect();
            median(&values).ok_or_else(|| format!("no completed run with {}", vmm.name()))
        };
        let ms = |r: &Run| r.first_command_ms as f64;
        let mib = |r: &Run| r.overhead_kib() as f64 / 1024.0;
        let qemu_best = QEMU_VARIANTS
            .into_iter()
            .filter_map(|v| of(v, ms).ok().map(|t| (v, t)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(v, _)| v)
            .ok_or("no completed run with qemu")?;
        Ok(Summary {
            first_command_ms: of(Vmm::Ours, ms)?,
            qemu_best,
            qemu_first_command_ms: of(qemu_best, ms)?,
            vmm_rss_overhead_mib: of(Vmm::Ours, mib)?,
            qemu_rss_overhead_mib: of(qemu_best, mib)?,
        })
    }

    pub fn ratio(&self) -> f64 {
        if self.qemu_first_command_ms > 0.0 {
            self.first_command_ms / self.qemu_first_command_ms
        } else {
            f64::INFINITY
        }
    }
}

/// The final line, exactly as issue 3 specifies it.
impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vmm-bench first_command_ms={:.0} qemu_first_command_ms={:.0} ratio={:.2} vmm_rss_overhead_mib={:.2}",
            self.first_command_ms,
            self.qemu_first_command_ms,
            self.ratio(),
            self.vmm_rss_overhead_mib
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(vmm: Vmm, n: u32, ms: u64, rss: u64, guest: u64) -> Run {
        Run { vmm, n, first_command_ms: ms, vmrss_kib: rss - 100, rss_kib: rss, guest_rss_kib: guest }
    }

    #[test]
    fn a_run_line_round_trips_through_the_console_prefix() {
        let r = run(Vmm::Qemu, 3, 4321, 90_000, 50_000);
        let console = format!("bench: {}\r", r.line());
        assert_eq!(Run::parse(&console).expect("parses"), r);
        assert!(r.line().ends_with("overhead_kib=40000"), "{}", r.line());
    }

    #[test]
    fn malformed_run_lines_are_refused_with_a_reason() {
        assert!(Run::parse("PROBE done").is_err());
        assert!(Run::parse("BENCH done").is_err());
        let fields = "first_command_ms=5 vmrss_kib=1 rss_kib=1";
        let missing = Run::parse(&format!("BENCH run vmm=ours n=1 {fields}")).expect_err("no guest_rss");
        assert!(missing.contains("guest_rss_kib"), "{missing}");
        assert!(Run::parse(&format!("BENCH run vmm=ours n=1 {fields} guest_rss_kib=1")).is_ok());
        assert!(Run::parse(&format!("BENCH run vmm=xen n=1 {fields} guest_rss_kib=1")).is_err());
        assert!(Run::parse(&format!("BENCH run vmm=ours n=x {fields} guest_rss_kib=1")).is_err());
        assert!(Run::parse("BENCH run vmm=ours n=1 first_command_ms=-5 vmrss_kib=1 rss_kib=1 guest_rss_kib=1").is_err());
    }

    #[test]
    fn medians_of_odd_even_and_empty_sets() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    #[allow(clippy::float_cmp)] // the medians of whole milliseconds are exact
    fn the_summary_uses_medians_per_vmm_and_prints_the_issue_format() {
        let runs = [
            run(Vmm::Ours, 1, 1000, 10_240, 8192),
            run(Vmm::Qemu, 1, 4000, 60_000, 20_000),
            run(Vmm::Ours, 2, 3000, 9216, 8192),
            run(Vmm::Qemu, 2, 2000, 50_000, 20_000),
            run(Vmm::Ours, 3, 2000, 11_264, 8192),
            run(Vmm::Qemu, 3, 5000, 70_000, 20_000),
        ];
        let s = Summary::from_runs(&runs).expect("both vmms ran");
        assert_eq!(s.qemu_best, Vmm::Qemu);
        assert_eq!(s.first_command_ms, 2000.0);
        assert_eq!(s.qemu_first_command_ms, 4000.0);
        assert_eq!(s.vmm_rss_overhead_mib, 2.0);
        assert_eq!(
            s.to_string(),
            "vmm-bench first_command_ms=2000 qemu_first_command_ms=4000 ratio=0.50 vmm_rss_overhead_mib=2.00"
        );
    }

    #[test]
    fn the_fastest_qemu_configuration_is_the_one_compared() {
        let runs = [
            run(Vmm::Ours, 1, 1000, 10_240, 8192),
            run(Vmm::Qemu, 1, 4000, 60_000, 20_000),
            run(Vmm::QemuPvh, 1, 3000, 70_000, 20_000),
        ];
        let s = Summary::from_runs(&runs).expect("all ran");
        assert_eq!((s.qemu_best, s.qemu_first_command_ms), (Vmm::QemuPvh, 3000.0));
        assert_eq!(Run::parse(&runs[2].line()).expect("parses").vmm, Vmm::QemuPvh);
    }

    #[test]
    fn a_summary_needs_runs_of_both_vmms() {
        let only_ours = [run(Vmm::Ours, 1, 1000, 2048, 1024)];
        assert!(Summary::from_runs(&only_ours).expect_err("no qemu").contains("qemu"));
    }
}

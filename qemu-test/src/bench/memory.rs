//! What a VMM process keeps resident beyond its guest's RAM, read from `/proc/<pid>/smaps`: the
//! process's resident memory (the sum of every mapping's `Rss:`) minus the resident part of the
//! guest-RAM mapping. Both come from the same page-table walk. VmRSS from `/proc/<pid>/status`
//! is recorded too but not used for the difference: Linux 6.1 batches RSS counter updates per
//! thread (up to 64 page faults each), so right after a vCPU thread has faulted guest pages in,
//! VmRSS can lag behind the guest mapping's Rss and the difference would come out negative.
//!
//! The guest-RAM mapping is recognised by its size: both VMMs map a guest below 3 GiB as one
//! anonymous mapping of exactly the configured memory size (vm-memory for ours, the RAM block
//! for QEMU). If no mapping has that size the measurement is refused rather than guessed.

/// One sample of a VMM's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// VmRSS as the kernel's (batched) counters report it; for reference.
    pub vmrss_kib: u64,
    /// Sum of `Rss:` over all mappings.
    pub rss_kib: u64,
    pub guest_rss_kib: u64,
}

impl Sample {
    pub fn overhead_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_rss_kib)
    }
}

/// Reads both files of `pid`; `guest_kib` is the configured guest memory.
pub fn sample(pid: u32, guest_kib: u64) -> Result<Sample, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    let smaps =
        std::fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|e| format!("read /proc/{pid}/smaps: {e}"))?;
    Ok(Sample {
        vmrss_kib: vm_rss_kib(&status)?,
        rss_kib: total_rss_kib(&smaps),
        guest_rss_kib: guest_rss_kib(&smaps, guest_kib)?,
    })
}

/// The summed `Rss:` of every mapping (what /proc/<pid>/smaps_rollup reports).
pub fn total_rss_kib(smaps: &str) -> u64 {
    parse_smaps(smaps).iter().map(|m| m.rss_kib).sum()
}

/// The `VmRSS:` field of a /proc/<pid>/status text, in KiB.
pub fn vm_rss_kib(status: &str) -> Result<u64, String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(kib_value)
        .ok_or_else(|| "no VmRSS in /proc/<pid>/status (has the process ended?)".to_string())
}

/// The summed `Rss:` of the anonymous mappings whose `Size:` is exactly `guest_kib`.
pub fn guest_rss_kib(smaps: &str, guest_kib: u64) -> Result<u64, String> {
    let mappings = parse_smaps(smaps);
    let guest: Vec<&Mapping> = mappings.iter().filter(|m| m.anonymous && m.size_kib == guest_kib).collect();
    if guest.is_empty() {
        let mut sizes: Vec<u64> = mappings.iter().map(|m| m.size_kib).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        sizes.truncate(5);
        return Err(format!(
            "no anonymous mapping of {guest_kib} KiB (the guest RAM) in smaps; largest mappings (KiB): {sizes:?}"
        ));
    }
    Ok(guest.iter().map(|m| m.rss_kib).sum())
}

#[derive(Debug, Default)]
struct Mapping {
    size_kib: u64,
    rss_kib: u64,
    /// No backing file (the header line has no path, or a pseudo name such as [heap]).
    anonymous: bool,
}

fn parse_smaps(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let Some(first) = line.split_whitespace().next() else { continue };
        if first.ends_with(':') {
            if let Some(current) = out.last_mut() {
                match first {
                    "Size:" => current.size_kib = kib_value(&line[first.len()..]).unwrap_or(0),
                    "Rss:" => current.rss_kib = kib_value(&line[first.len()..]).unwrap_or(0),
                    _ => {}
                }
            }
        } else if first.contains('-') {
            // "start-end perms offset dev inode [path]": the sixth field names a file if any.
            let path = line.split_whitespace().nth(5);
            out.push(Mapping { anonymous: path.is_none_or(|p| !p.starts_with('/')), ..Mapping::default() });
        }
    }
    out
}

/// "   1234 kB" -> 1234.
fn kib_value(text: &str) -> Option<u64> {
    let mut words = text.split_whitespace();
    let value = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
00400000-00600000 r-xp 00000000 00:02 17    /bin/vmm
Size:               2048 kB
Rss:                1200 kB
VmFlags: rd ex mr mw me
7f0000000000-7f0020000000 rw-p 00000000 00:00 0 
Size:             524288 kB
KernelPageSize:        4 kB
Rss:              180000 kB
Anonymous:        180000 kB
VmFlags: rd wr mr mw me nr
7f1000000000-7f1004000000 rw-p 00000000 00:00 0 
Size:              65536 kB
Rss:                 300 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0    [stack]
Size:                132 kB
Rss:                  24 kB
";

    #[test]
    fn finds_the_guest_ram_mapping_by_its_size() {
        assert_eq!(guest_rss_kib(SMAPS, 524_288).expect("found"), 180_000);
    }

    #[test]
    fn the_total_is_every_mapping_summed() {
        assert_eq!(total_rss_kib(SMAPS), 1200 + 180_000 + 300 + 24);
    }

    #[test]
    fn refuses_when_no_mapping_has_the_guest_size() {
        let e = guest_rss_kib(SMAPS, 262_144).expect_err("no 256 MiB mapping");
        assert!(e.contains("524288"), "the message lists the largest mappings: {e}");
    }

    #[test]
    fn a_file_mapping_of_the_guest_size_is_not_guest_ram() {
        let file_backed = "00400000-20400000 r--p 00000000 00:02 17    /data/big.img\nSize: 524288 kB\nRss: 9 kB\n";
        assert!(guest_rss_kib(file_backed, 524_288).is_err());
    }

    #[test]
    fn reads_vmrss_and_the_overhead_never_goes_negative() {
        let status = "Name:\tvmm\nVmPeak:\t  600000 kB\nVmRSS:\t  181500 kB\nThreads:\t2\n";
        assert_eq!(vm_rss_kib(status).expect("VmRSS"), 181_500);
        assert!(vm_rss_kib("Name:\tzombie\n").is_err());
        assert_eq!(Sample { vmrss_kib: 1, rss_kib: 181_500, guest_rss_kib: 180_000 }.overhead_kib(), 1500);
        assert_eq!(Sample { vmrss_kib: 10, rss_kib: 10, guest_rss_kib: 20 }.overhead_kib(), 0);
    }

    #[test]
    fn values_without_a_kb_unit_are_not_numbers() {
        assert_eq!(kib_value("  12 kB"), Some(12));
        assert_eq!(kib_value("  12"), None);
        assert_eq!(kib_value(" x kB"), None);
    }
}

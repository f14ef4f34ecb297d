//! Which pages of a resumed guest's RAM a snapshot need not read. Guest RAM resumed from a
//! memory file is a private mapping of it: a page the guest never wrote is still the file's page,
//! and where the file has a hole that page is zero. Reading such a page to find out faults in a
//! page-cache page for the hole; over all of guest RAM that is one fault per 4 KiB, which under
//! nested emulation took 17.5 s for a 512 MiB guest (a booted guest's untouched pages map the
//! shared zero page instead, 1.1 s). So a page is skipped without reading when this process's
//! page table (`/proc/self/pagemap`) shows no private copy of it and the file has a hole there.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

const PAGE: u64 = 4096;
/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const FILE_OR_SHARED: u64 = 1 << 61;

/// The memory file a guest was resumed from, and this process's page table, both opened before
/// the VMM confined itself (no path resolves afterwards).
pub struct ResumedMemory {
    backing: File,
    pagemap: File,
}

impl ResumedMemory {
    pub fn open(backing: &File) -> Result<ResumedMemory, String> {
        let backing = backing.try_clone().map_err(|e| format!("cannot keep the memory file: {e}"))?;
        let pagemap = File::open("/proc/self/pagemap").map_err(|e| format!("cannot open /proc/self/pagemap: {e}"))?;
        Ok(ResumedMemory { backing, pagemap })
    }

    /// The byte ranges of the memory file that hold data (everything else is a hole).
    pub fn data_ranges(&self) -> Result<Vec<Range<u64>>, String> {
        let len = self.backing.metadata().map_err(|e| format!("cannot stat the memory file: {e}"))?.len();
        let fd = self.backing.as_raw_fd();
        let mut ranges = Vec::new();
        let mut at = 0u64;
        while at < len {
            // SAFETY: lseek on a descriptor this struct owns; no memory is passed.
            let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: no data after `at`
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { len } else { hole as u64 };
            ranges.push(data as u64..end);
            at = end;
        }
        Ok(ranges)
    }

    /// For each of the `pages` pages at host address `host` (guest address `gpa`): true when it
    /// must be read (the guest wrote it, or the file has data there), false when it is certainly
    /// zero. `data` is `data_ranges()`.
    pub fn must_read(&self, host: usize, gpa: u64, pages: usize, data: &[Range<u64>]) -> Result<Vec<bool>, String> {
        let mut entries = vec![0u8; pages * 8];
        let offset = (host as u64 / PAGE) * 8;
        self.pagemap.read_exact_at(&mut entries, offset).map_err(|e| format!("cannot read the page table: {e}"))?;
        Ok(entries
            .chunks_exact(8)
            .enumerate()
            .map(|(i, raw)| {
                let mut word = [0u8; 8];
                word.copy_from_slice(raw);
                let entry = u64::from_le_bytes(word);
                let written = (entry & PRESENT != 0 && entry & FILE_OR_SHARED == 0) || entry & SWAPPED != 0;
                let page = gpa + i as u64 * PAGE;
                written || overlaps(data, page..page + PAGE)
            })
            .collect())
    }
}

/// Whether `range` overlaps any of the sorted, disjoint `ranges`.
fn overlaps(ranges: &[Range<u64>], range: Range<u64>) -> bool {
    let i = ranges.partition_point(|r| r.end <= range.start);
    ranges.get(i).is_some_and(|r| r.start < range.end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::map_guest_memory_from;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    #[test]
    fn overlap_lookup() {
        let ranges = [0..4096, 8192..16384];
        assert!(overlaps(&ranges, 0..4096));
        assert!(!overlaps(&ranges, 4096..8192));
        assert!(overlaps(&ranges, 12288..16384));
        assert!(!overlaps(&ranges, 16384..20480));
    }

    #[test]
    fn only_pages_written_or_backed_by_data_are_read() {
        let path = std::env::temp_dir().join(format!("vmm-resumed-{}", std::process::id()));
        let file = File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.set_len(32 << 20).unwrap();
        file.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        let mem = map_guest_memory_from(&file, 32 << 20).unwrap();
        let resumed = ResumedMemory::open(&file).unwrap();
        let data = resumed.data_ranges().unwrap();
        assert_eq!(data.first().map(|r| r.start), Some(1 << 20));
        // The guest reads a hole (a page-cache page, not its own) and writes another page.
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(3 << 20)).unwrap();
        mem.write_slice(&[1u8; 16], GuestAddress(5 << 20)).unwrap();
        let region = mem.iter().next().unwrap();
        let host = region.as_ptr() as usize;
        let pages = (8 << 20) / PAGE as usize;
        let read = resumed.must_read(host, 0, pages, &data).unwrap();
        let wanted: Vec<usize> = read.iter().enumerate().filter(|(_, r)| **r).map(|(i, _)| i).collect();
        assert_eq!(wanted, vec![256, 1280], "the file's data page and the written page");

        // A snapshot that skips the rest says exactly what one that reads every page says.
        let out = |tag: &str| {
            let p = std::env::temp_dir().join(format!("vmm-resumed-{tag}-{}", std::process::id()));
            (p.clone(), File::options().create(true).truncate(true).read(true).write(true).open(p).unwrap())
        };
        let (skip_path, skipping) = out("skip");
        let (full_path, full) = out("full");
        let skipped = crate::snapshot::memory_file::write(&mem, &skipping, Some(&resumed)).unwrap();
        let whole = crate::snapshot::memory_file::write(&mem, &full, None).unwrap();
        assert_eq!(skipped, whole);
        assert_eq!(skipped.data_bytes, 2 * PAGE);
        for p in [&path, &skip_path, &full_path] {
            let _ = std::fs::remove_file(p);
        }
    }
}

//! Guest RAM: where it lives in guest-physical space, and the full-memory dump that tests use
//! to prove that no secret ever reaches a sandbox's memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

pub type GuestMemory = GuestMemoryMmap<()>;

/// The (start, size) ranges of guest RAM for `mem_bytes` of memory: below the MMIO gap
/// first, the remainder above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if mem_bytes > MMIO_GAP_START {
        ranges.push((GuestAddress(MMIO_GAP_END), (mem_bytes - MMIO_GAP_START) as usize));
    }
    ranges
}

/// x86-64 huge page. KVM can map guest RAM with 2 MiB pages only where the host address and the
/// guest-physical address agree modulo 2 MiB, so each region starts on such a boundary.
pub const HUGE_PAGE: usize = 2 << 20;
/// Diagnostic switch for measuring what huge pages are worth: `OC_VMM_HUGEPAGES=madvise` marks
/// guest RAM MADV_HUGEPAGE, `never` MADV_NOHUGEPAGE, `system` (the default) gives no advice.
pub const HUGEPAGES_ENV: &str = "OC_VMM_HUGEPAGES";

/// What guest RAM asks of transparent huge pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePages {
    /// MADV_HUGEPAGE: huge pages even at the price of direct compaction when a fault finds
    /// no free 2 MiB block (the host's `defrag` setting decides).
    Advise,
    /// No advice: the host's THP mode decides (with `always`, huge pages when one is free).
    System,
    /// MADV_NOHUGEPAGE: 4 KiB pages only.
    Never,
}

impl HugePages {
    pub fn from_env() -> HugePages {
        match std::env::var(HUGEPAGES_ENV).as_deref() {
            Ok("madvise") => HugePages::Advise,
            Ok("never") => HugePages::Never,
            _ => HugePages::System,
        }
    }
}

/// Maps anonymous guest RAM (reserved lazily: untouched pages cost nothing), 2 MiB aligned so
/// that where the host hands out a transparent huge page, KVM maps it as one: one fault (and
/// one nested-paging exit) then brings in 2 MiB instead of 4 KiB. No MADV_HUGEPAGE by default:
/// measured nested it was no faster than no advice (qemu-test/BENCH_RESULT.md), and with the
/// host's `defrag=madvise` it lets a fault stall in direct compaction.
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemory, String> {
    let hugepages = HugePages::from_env();
    let fail = |e: String| format!("cannot map {} MiB of guest memory: {e}", mem_bytes >> 20);
    let regions = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(start, size)| {
            let host = map_aligned(size, hugepages).map_err(fail)?;
            // SAFETY: `host` is the start of a fresh anonymous mapping of exactly `size` bytes
            // that this process never unmaps (guest RAM lives until exit; KVM slots point at it).
            unsafe { region_at(host, size, start, MAP_FLAGS) }.map_err(fail)
        })
        .collect::<Result<Vec<_>, String>>()?;
    GuestMemory::from_regions(regions).map_err(|e| fail(e.to_string()))
}

const MAP_FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// Guest RAM region at guest address `start` over the `size` bytes mapped at `host` (mapped
/// with `flags`, read-write).
///
/// # Safety
/// `host` must be a live mapping of at least `size` bytes that is never unmapped while the
/// region (or anything it is handed to, such as a KVM memory slot) is in use.
unsafe fn region_at(
    host: *mut u8,
    size: usize,
    start: GuestAddress,
    flags: libc::c_int,
) -> Result<GuestRegionMmap<()>, String> {
    // SAFETY: the caller promises what `with_raw_mmap_pointer` requires (see above).
    let mapping = unsafe {
        vm_memory::mmap::MmapRegionBuilder::new(size)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_raw_mmap_pointer(host)
    }
    .build()
    .map_err(|e| e.to_string())?;
    GuestRegionMmap::new(mapping, start).ok_or_else(|| "region end overflows".into())
}

/// Guest RAM from a snapshot's memory file (offset = guest-physical address), mapped privately:
/// pages come from the file when the guest first touches them and its writes never reach the
/// file, so a restore costs what the guest touches, and one file can back many sandboxes.
pub fn map_guest_memory_from(file: &File, mem_bytes: u64) -> Result<GuestMemory, String> {
    let fail = |e: String| format!("cannot map the snapshot's {} MiB of guest memory: {e}", mem_bytes >> 20);
    let ranges = ram_ranges(mem_bytes);
    let end = ranges.last().map_or(0, |(start, size)| start.0 + *size as u64);
    let len = file.metadata().map_err(|e| fail(format!("cannot stat the memory file: {e}")))?.len();
    if len != end {
        return Err(fail(format!("the memory file is {len} bytes, this guest needs {end}")));
    }
    let regions = ranges
        .into_iter()
        .map(|(start, size)| {
            let host = map_aligned(size, HugePages::Never).map_err(fail)?;
            // SAFETY: MAP_FIXED over the reservation just made (ours, `size` bytes, nothing in it
            // referenced yet) replaces it with the file's pages at offset `start`, which the
            // length check above showed to be inside the file.
            let mapped = unsafe {
                libc::mmap(
                    host.cast::<libc::c_void>(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    start.0 as libc::off_t,
                )
            };
            if mapped == libc::MAP_FAILED || mapped.cast::<u8>() != host {
                return Err(fail(format!("mmap failed: {}", std::io::Error::last_os_error())));
            }
            // SAFETY: `host` is a private file mapping of exactly `size` bytes made above that
            // this process never unmaps (guest RAM lives until exit; KVM slots point at it).
            unsafe { region_at(host, size, start, libc::MAP_PRIVATE | libc::MAP_NORESERVE) }.map_err(fail)
        })
        .collect::<Result<Vec<_>, String>>()?;
    GuestMemory::from_regions(regions).map_err(|e| fail(e.to_string()))
}

/// Maps `size` bytes of anonymous memory starting on a `HUGE_PAGE` boundary: reserves a huge
/// page more than needed and gives back the unaligned head and the tail.
fn map_aligned(size: usize, hugepages: HugePages) -> Result<*mut u8, String> {
    let reserve = size.checked_add(HUGE_PAGE).ok_or("size overflows")?;
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing; no existing
    // memory is affected and the result is checked.
    let base =
        unsafe { libc::mmap(std::ptr::null_mut(), reserve, libc::PROT_READ | libc::PROT_WRITE, MAP_FLAGS, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(format!("mmap failed: {}", std::io::Error::last_os_error()));
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let head = start - base;
    let tail = reserve - head - size;
    // SAFETY: both ranges lie inside the mapping made above, and nothing refers to them.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
    }
    let advice = match hugepages {
        HugePages::Advise => Some(libc::MADV_HUGEPAGE),
        HugePages::Never => Some(libc::MADV_NOHUGEPAGE),
        HugePages::System => None,
    };
    if let Some(advice) = advice {
        // SAFETY: advice on our own fresh mapping. It fails harmlessly (EINVAL) where the kernel
        // has no transparent huge pages; guest RAM then simply uses 4 KiB pages.
        unsafe { libc::madvise(start as *mut libc::c_void, size, advice) };
    }
    Ok(start as *mut u8)
}

/// Chunk size for the dump: big enough to be fast, small enough to skip zero runs.
const DUMP_CHUNK: usize = 1 << 20;

/// Writes all of guest RAM to `out` at file offset == guest-physical address. All-zero
/// chunks are left as holes, so the file is sparse but reads back as the full memory image.
/// Returns the number of bytes of RAM covered.
pub fn dump_guest_memory(mem: &GuestMemory, out: &File) -> Result<u64, String> {
    out.set_len(0).map_err(|e| format!("cannot truncate the memory dump file: {e}"))?;
    let covered = for_each_chunk(mem, DUMP_CHUNK, |gpa, chunk| {
        if chunk.iter().any(|&b| b != 0) {
            out.write_all_at(chunk, gpa).map_err(|e| format!("cannot write the memory dump: {e}"))?;
        }
        Ok(())
    })?;
    // The logical size must reach the end of the last region even if it ended in zeroes.
    let end = mem.last_addr().0 + 1;
    out.set_len(end).map_err(|e| format!("cannot size the memory dump: {e}"))?;
    out.sync_data().map_err(|e| format!("cannot flush the memory dump: {e}"))?;
    Ok(covered)
}

/// Copies all of guest RAM out in pieces of at most `chunk_size` bytes and hands each to `f`
/// with its guest-physical address; returns the bytes of RAM covered.
pub fn for_each_chunk(
    mem: &GuestMemory,
    chunk_size: usize,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<u64, String> {
    let mut chunk = vec![0u8; chunk_size];
    let mut covered = 0u64;
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(chunk_size as u64) as usize;
            region
                .read_slice(&mut chunk[..n], MemoryRegionAddress(off))
                .map_err(|e| format!("cannot read guest memory at {:#x}: {e}", start + off))?;
            f(start + off, &chunk[..n])?;
            off += n as u64;
        }
        covered += len;
    }
    Ok(covered)
}

// `read_slice` on a region comes from this trait.
use vm_memory::Bytes as _;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vm_memory::Bytes;

    #[test]
    fn small_guests_have_one_low_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn big_guests_continue_above_4g() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), ((4u64 << 30) - MMIO_GAP_START) as usize));
    }

    #[test]
    fn guest_ram_starts_on_a_huge_page_boundary_and_is_one_mapping_of_its_size() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        let host = region.as_ptr() as usize;
        assert_eq!(host % HUGE_PAGE, 0);
        mem.write_slice(b"end", GuestAddress((64 << 20) - 3)).unwrap();
        // /proc/self/maps shows a mapping from that address covering the guest (the bench's
        // memory accounting looks for the mapping of the guest's size).
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps.lines().find(|l| l.starts_with(&format!("{host:x}-"))).expect("mapping listed");
        let (range, _) = line.split_once(' ').unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let len = usize::from_str_radix(b, 16).unwrap() - usize::from_str_radix(a, 16).unwrap();
        assert!(len >= 64 << 20, "{line}");
    }

    #[test]
    fn memory_mapped_from_a_snapshot_reads_the_file_and_never_writes_it() {
        let mem = create_guest_memory(32 << 20).unwrap();
        mem.write_slice(b"before the snapshot", GuestAddress(0x4000)).unwrap();
        let path = std::env::temp_dir().join(format!("vmm-map-test-{}", std::process::id()));
        let f = File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        crate::snapshot::memory_file::write(&mem, &f, None).unwrap();
        let restored = map_guest_memory_from(&f, 32 << 20).unwrap();
        assert_eq!(restored.iter().next().unwrap().as_ptr() as usize % HUGE_PAGE, 0);
        let mut text = [0u8; 19];
        restored.read_slice(&mut text, GuestAddress(0x4000)).unwrap();
        assert_eq!(&text, b"before the snapshot");
        restored.write_slice(b"AFTER", GuestAddress(0x4000)).unwrap();
        let mut on_disk = [0u8; 5];
        f.read_exact_at(&mut on_disk, 0x4000).unwrap();
        assert_eq!(&on_disk, b"befor", "the guest's writes stay private");
        // Two restores of one file do not see each other.
        let other = map_guest_memory_from(&f, 32 << 20).unwrap();
        other.read_slice(&mut text, GuestAddress(0x4000)).unwrap();
        assert_eq!(&text, b"before the snapshot");
        assert!(map_guest_memory_from(&f, 64 << 20).unwrap_err().contains("this guest needs"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn dump_places_bytes_at_their_guest_address() {
        let mem = create_guest_memory(4 << 20).unwrap();
        mem.write_slice(b"osb_marker_xyz", GuestAddress(0x123456)).unwrap();
        let path = std::env::temp_dir().join(format!("vmm-dump-test-{}", std::process::id()));
        let f = File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        assert_eq!(dump_guest_memory(&mem, &f).unwrap(), 4 << 20);
        let mut all = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut all).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(all.len(), 4 << 20);
        assert_eq!(&all[0x123456..0x123456 + 14], b"osb_marker_xyz");
        assert!(all[..0x123456].iter().all(|&b| b == 0));
    }
}

//! Guest RAM: where it lives in guest-physical space, and the full-memory dump that tests use
//! to prove that no secret ever reaches a sandbox's memory.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

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

/// Maps anonymous guest RAM (reserved lazily: untouched pages cost nothing).
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemory, String> {
    GuestMemory::from_ranges(&ram_ranges(mem_bytes))
        .map_err(|e| format!("cannot map {} MiB of guest memory: {e}", mem_bytes >> 20))
}

/// Chunk size for the dump: big enough to be fast, small enough to skip zero runs.
const DUMP_CHUNK: usize = 1 << 20;

/// Writes all of guest RAM to `out` at file offset == guest-physical address. All-zero
/// chunks are left as holes, so the file is sparse but reads back as the full memory image.
/// Returns the number of bytes of RAM covered.
pub fn dump_guest_memory(mem: &GuestMemory, out: &File) -> Result<u64, String> {
    out.set_len(0).map_err(|e| format!("cannot truncate the memory dump file: {e}"))?;
    let mut chunk = vec![0u8; DUMP_CHUNK];
    let mut covered = 0u64;
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(DUMP_CHUNK as u64) as usize;
            region
                .read_slice(&mut chunk[..n], MemoryRegionAddress(off))
                .map_err(|e| format!("cannot read guest memory at {:#x}: {e}", start + off))?;
            if chunk[..n].iter().any(|&b| b != 0) {
                out.write_all_at(&chunk[..n], start + off)
                    .map_err(|e| format!("cannot write the memory dump: {e}"))?;
            }
            off += n as u64;
        }
        covered += len;
    }
    // The logical size must reach the end of the last region even if it ended in zeroes.
    let end = mem.last_addr().0 + 1;
    out.set_len(end).map_err(|e| format!("cannot size the memory dump: {e}"))?;
    out.sync_data().map_err(|e| format!("cannot flush the memory dump: {e}"))?;
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

//! The snapshot's memory file: guest RAM at file offset = guest-physical address, with the pages
//! that hold only zeroes (never touched, or cleared) left as holes, so the file costs what the
//! guest used. A restore maps it copy-on-write (`memory::map_guest_memory_from`).
//!
//! Its digest (CRC-32 over each written page and its address) goes into the state file. A
//! restore checks the file's length but not the digest: that would read all of guest memory and
//! undo what mapping it lazily saves; `verify` is there for whoever wants the full check.

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::resumed_memory::ResumedMemory;
use crate::memory::{for_each_chunk, GuestMemory};

const PAGE: usize = 4096;
/// Guest memory is copied out in chunks of this size and written as runs of non-zero pages.
const CHUNK: usize = 1 << 20;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryFileInfo {
    /// The file's length: the end of the highest RAM region.
    pub len: u64,
    /// Bytes of pages actually written (the rest are holes).
    pub data_bytes: u64,
    pub digest: u32,
}

/// Writes all of guest RAM into `out` (emptied first) and flushes it. For a guest resumed from a
/// memory file (`resumed`), pages that are certainly zero are not read (see `resumed_memory`).
pub fn write(mem: &GuestMemory, out: &File, resumed: Option<&ResumedMemory>) -> Result<MemoryFileInfo, String> {
    out.set_len(0).map_err(|e| format!("cannot empty the memory file: {e}"))?;
    let mut digest = crc32fast::Hasher::new();
    let mut data_bytes = 0u64;
    let mut write_chunk = |gpa: u64, chunk: &[u8]| -> Result<(), String> {
        data_bytes += write_nonzero_runs(chunk, gpa, out, &mut digest)?;
        Ok(())
    };
    match resumed {
        None => {
            for_each_chunk(mem, CHUNK, write_chunk)?;
        }
        Some(resumed) => {
            let data = resumed.data_ranges()?;
            let mut chunk = vec![0u8; CHUNK];
            for region in mem.iter() {
                let (start, len, host) = (region.start_addr().0, region.len(), region.as_ptr() as usize);
                let mut off = 0u64;
                while off < len {
                    let n = (len - off).min(CHUNK as u64) as usize;
                    let must_read = resumed.must_read(host + off as usize, start + off, n.div_ceil(PAGE), &data)?;
                    chunk[..n].fill(0);
                    for (p, read) in must_read.iter().enumerate() {
                        if *read {
                            let at = p * PAGE;
                            let end = (at + PAGE).min(n);
                            region
                                .read_slice(&mut chunk[at..end], MemoryRegionAddress(off + at as u64))
                                .map_err(|e| format!("cannot read guest memory at {:#x}: {e}", start + off))?;
                        }
                    }
                    write_chunk(start + off, &chunk[..n])?;
                    off += n as u64;
                }
            }
        }
    }
    let len = mem.last_addr().0 + 1;
    out.set_len(len).map_err(|e| format!("cannot size the memory file: {e}"))?;
    out.sync_data().map_err(|e| format!("cannot flush the memory file: {e}"))?;
    Ok(MemoryFileInfo { len, data_bytes, digest: digest.finalize() })
}

/// Writes the runs of non-zero pages of `chunk` (at guest address `gpa`); returns their bytes.
fn write_nonzero_runs(chunk: &[u8], gpa: u64, out: &File, digest: &mut crc32fast::Hasher) -> Result<u64, String> {
    let mut written = 0u64;
    let mut run: Option<usize> = None;
    let pages = chunk.len().div_ceil(PAGE);
    for p in 0..=pages {
        let page = (p < pages).then(|| &chunk[p * PAGE..((p + 1) * PAGE).min(chunk.len())]);
        let nonzero = page.is_some_and(|page| !is_zero(page));
        if let Some(page) = page.filter(|_| nonzero) {
            digest.update(&(gpa + (p * PAGE) as u64).to_le_bytes());
            digest.update(page);
        }
        match (nonzero, run) {
            (true, None) => run = Some(p),
            (false, Some(first)) => {
                let bytes = &chunk[first * PAGE..(p * PAGE).min(chunk.len())];
                out.write_all_at(bytes, gpa + (first * PAGE) as u64)
                    .map_err(|e| format!("cannot write the memory file: {e}"))?;
                written += bytes.len() as u64;
                run = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

fn is_zero(bytes: &[u8]) -> bool {
    // Eight bytes at a time: this scan runs over all of guest RAM.
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns, so viewing aligned bytes as u64 is sound.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Reads the whole file back and checks it against the digest the state file recorded.
pub fn verify(file: &File, info: &MemoryFileInfo) -> Result<(), String> {
    let len = file.metadata().map_err(|e| format!("cannot stat the memory file: {e}"))?.len();
    if len != info.len {
        return Err(format!("memory file is {len} bytes, the snapshot says {}", info.len));
    }
    let mut buf = vec![0u8; CHUNK];
    let mut digest = crc32fast::Hasher::new();
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(CHUNK as u64) as usize;
        file.read_exact_at(&mut buf[..n], off).map_err(|e| format!("cannot read the memory file: {e}"))?;
        for (p, page) in buf[..n].chunks(PAGE).enumerate() {
            if !is_zero(page) {
                digest.update(&(off + (p * PAGE) as u64).to_le_bytes());
                digest.update(page);
            }
        }
        off += n as u64;
    }
    if digest.finalize() != info.digest {
        return Err("memory file is damaged (digest mismatch)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{Bytes, GuestAddress};

    fn temp(name: &str) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("vmm-memfile-{name}-{}", std::process::id()));
        let f = File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        (path, f)
    }

    #[test]
    fn only_touched_pages_take_space_and_the_digest_catches_a_change() {
        let mem = create_guest_memory(64 << 20).unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(&[7u8; 3 * PAGE], GuestAddress(10 << 20)).unwrap();
        mem.write_slice(b"last", GuestAddress((64 << 20) - 4)).unwrap();
        let (path, f) = temp("sparse");
        let info = write(&mem, &f, None).unwrap();
        assert_eq!(info.len, 64 << 20);
        assert_eq!(info.data_bytes, 5 * PAGE as u64);
        let meta = f.metadata().unwrap();
        assert!(meta.blocks() * 512 <= 64 * PAGE as u64, "{} blocks allocated", meta.blocks());
        let mut page = [0u8; 4];
        f.read_exact_at(&mut page, (64 << 20) - 4).unwrap();
        assert_eq!(&page, b"last");
        verify(&f, &info).unwrap();
        f.write_all_at(b"X", (10 << 20) + 5).unwrap();
        assert_eq!(verify(&f, &info).unwrap_err(), "memory file is damaged (digest mismatch)");
        f.set_len(1 << 20).unwrap();
        assert!(verify(&f, &info).unwrap_err().contains("the snapshot says"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn zero_scan_is_exact_at_every_offset() {
        let mut page = vec![0u8; PAGE + 3];
        assert!(is_zero(&page[1..]));
        for at in [1, 8, PAGE, PAGE + 2] {
            page[at] = 1;
            assert!(!is_zero(&page[1..]), "byte {at}");
            page[at] = 0;
        }
    }
}

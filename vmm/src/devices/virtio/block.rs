//! virtio-blk (virtio 1.x, section 5.2) backed by a file or block device.
//!
//! Requests are served synchronously on the VMM's event thread with pread/pwrite straight
//! into guest memory; FLUSH is an fdatasync, so a write the guest saw flushed is on disk.

use std::fs::File;
use std::os::unix::io::AsRawFd;

use vm_memory::{Bytes, GuestMemoryBackend};

use super::queue::{Descriptor, Queue};
use super::{VirtioDevice, DEVICE_ID_BLOCK, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
const HEADER_LEN: u32 = 16;
const ID_LEN: usize = 20;

pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
    sizes: [u16; 1],
}

#[derive(Debug, PartialEq, Eq)]
enum RequestError {
    /// The chain can't be a block request at all: complete it without a status byte.
    Malformed(&'static str),
    /// A well-formed request that fails: report this status.
    Status(u8),
}

impl Block {
    /// `file` is the opened disk; its size must be a whole number of sectors.
    pub fn new(file: File, read_only: bool, id: &str) -> Result<Self, String> {
        let len = file_size(&file)?;
        if len == 0 || len % SECTOR_SIZE != 0 {
            return Err(format!("disk size {len} is not a positive multiple of {SECTOR_SIZE} bytes"));
        }
        let mut serial = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Block { file, read_only, capacity_sectors: len / SECTOR_SIZE, id: serial, sizes: [QUEUE_SIZE] })
    }

    /// Serves one request; returns the number of bytes written into guest buffers.
    fn serve(&mut self, mem: &GuestMemory, chain: &[Descriptor]) -> u32 {
        // Linux frames a request as [header][data...][status]; we rely on that framing.
        let (Some(header), Some(status)) = (chain.first(), chain.last()) else { return 0 };
        if chain.len() < 2 || !status.writable {
            return 0;
        }
        let data = &chain[1..chain.len() - 1];
        let (code, written) = match self.execute(mem, header, data) {
            Ok(n) => (S_OK, n),
            Err(RequestError::Status(s)) => (s, 0),
            Err(RequestError::Malformed(_)) => (S_IOERR, 0),
        };
        if mem.write_obj(code, status.addr).is_err() {
            return written;
        }
        written + 1
    }

    fn execute(&mut self, mem: &GuestMemory, header: &Descriptor, data: &[Descriptor]) -> Result<u32, RequestError> {
        if header.writable || header.len < HEADER_LEN {
            return Err(RequestError::Malformed("bad request header"));
        }
        let raw: [u8; 16] = mem.read_obj(header.addr).map_err(|_| RequestError::Malformed("header unreadable"))?;
        let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let sector = u64::from_le_bytes([raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15]]);
        match kind {
            T_IN | T_OUT => {
                let reading = kind == T_IN;
                if !reading && self.read_only {
                    return Err(RequestError::Status(S_IOERR));
                }
                if data.iter().any(|d| d.writable != reading) {
                    return Err(RequestError::Malformed("data buffer has the wrong direction"));
                }
                let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
                let start = sector.checked_mul(SECTOR_SIZE).ok_or(RequestError::Status(S_IOERR))?;
                let end = start.checked_add(total).ok_or(RequestError::Status(S_IOERR))?;
                if !total.is_multiple_of(SECTOR_SIZE) || end > self.capacity_sectors * SECTOR_SIZE {
                    return Err(RequestError::Status(S_IOERR));
                }
                let mut offset = start;
                for d in data {
                    self.transfer(mem, d, offset, reading).map_err(|_| RequestError::Status(S_IOERR))?;
                    offset += u64::from(d.len);
                }
                Ok(if reading { total as u32 } else { 0 })
            }
            T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(|_| RequestError::Status(S_IOERR))?;
                }
                Ok(0)
            }
            T_GET_ID => {
                let Some(buf) = data.first().filter(|d| d.writable) else {
                    return Err(RequestError::Malformed("GET_ID without a buffer"));
                };
                let n = (buf.len as usize).min(ID_LEN);
                mem.write_slice(&self.id[..n], buf.addr).map_err(|_| RequestError::Status(S_IOERR))?;
                Ok(n as u32)
            }
            _ => Err(RequestError::Status(S_UNSUPP)),
        }
    }

    /// Moves one guest buffer to or from the disk at `offset`, without a bounce copy.
    fn transfer(&self, mem: &GuestMemory, d: &Descriptor, offset: u64, reading: bool) -> std::io::Result<()> {
        let slice =
            mem.get_slice(d.addr, d.len as usize).map_err(|_| std::io::Error::from_raw_os_error(libc::EFAULT))?;
        let guard = slice.ptr_guard_mut();
        let ptr = guard.as_ptr();
        let len = d.len as usize;
        let mut done = 0usize;
        while done < len {
            let at = (offset + done as u64) as libc::off64_t;
            // SAFETY: `ptr..ptr+len` is one mapped guest-memory region (get_slice checked
            // the range and the guard keeps it mapped); the kernel copies to or from it
            // and we hold no Rust references into it.
            let n = unsafe {
                let p = ptr.add(done).cast::<libc::c_void>();
                if reading {
                    libc::pread64(self.file.as_raw_fd(), p, len - done, at)
                } else {
                    libc::pwrite64(self.file.as_raw_fd(), p, len - done, at)
                }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            done += n as usize;
        }
        Ok(())
    }
}

fn file_size(file: &File) -> Result<u64, String> {
    use std::io::{Seek, SeekFrom};
    // Seeking works for regular files and block devices alike (metadata().len() is 0
    // for block devices).
    let mut f = file;
    let len = f.seek(SeekFrom::End(0)).map_err(|e| format!("cannot size the disk: {e}"))?;
    f.seek(SeekFrom::Start(0)).map_err(|e| format!("cannot size the disk: {e}"))?;
    Ok(len)
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u32 {
        DEVICE_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | F_FLUSH | F_SEG_MAX;
        if self.read_only {
            f |= F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (le64), size_max (le32), seg_max (le32).
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.checked_add(i as u64).and_then(|o| config.get(o as usize).copied()).unwrap_or(0);
        }
    }

    fn activate(&mut self, _: &GuestMemory, _: &[Queue], _: u64) -> Result<(), String> {
        Ok(())
    }

    fn reset(&mut self) {}

    fn process_queue(&mut self, mem: &GuestMemory, queues: &mut [Queue], index: usize) -> Result<bool, String> {
        let Some(queue) = queues.get_mut(index) else { return Ok(false) };
        let mut used = false;
        while let Some((head, chain)) = queue.pop(mem).map_err(|e| e.to_string())? {
            let written = match chain {
                Ok(chain) => self.serve(mem, &chain.descriptors),
                Err(_) => 0, // a malformed chain goes back untouched
            };
            queue.add_used(mem, head, written).map_err(|e| e.to_string())?;
            used = true;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::testing::*;
    use crate::memory::create_guest_memory;
    use std::io::{Read, Seek, SeekFrom, Write};
    use vm_memory::GuestAddress;

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    fn disk(sectors: u64, fill: u8) -> (File, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("vmm-blk-{}-{:?}", std::process::id(), std::thread::current().id()));
        let mut f = File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        f.write_all(&vec![fill; (sectors * SECTOR_SIZE) as usize]).unwrap();
        (f, path)
    }

    fn header(mem: &GuestMemory, kind: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_obj(raw, GuestAddress(HDR)).unwrap();
    }

    /// Posts [header][data of `len` bytes, direction by `data_write`][status] as chain 0.
    fn post(mem: &GuestMemory, avail_idx: u16, len: u32, data_write: bool) {
        write_desc(mem, 0, HDR, 16, NEXT, 1);
        write_desc(mem, 1, DATA, len, NEXT | if data_write { WRITE } else { 0 }, 2);
        write_desc(mem, 2, STATUS, 1, WRITE, 0);
        make_available(mem, 16, avail_idx, 0);
    }

    fn status(mem: &GuestMemory) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn read_then_write_then_flush_round_trip_through_the_file() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let (file, path) = disk(8, 0xab);
        let mut blk = Block::new(file, false, "root").unwrap();
        let mut queues = vec![ready_queue(16)];

        header(&mem, T_IN, 2);
        post(&mem, 0, 1024, true);
        assert!(blk.process_queue(&mem, &mut queues, 0).unwrap());
        assert_eq!(status(&mem), S_OK);
        assert_eq!(used_elem(&mem, 0), (0, 1025));
        let mut buf = vec![0u8; 1024];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf.iter().all(|&b| b == 0xab));

        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        header(&mem, T_OUT, 7);
        post(&mem, 1, 512, false);
        blk.process_queue(&mem, &mut queues, 0).unwrap();
        assert_eq!(status(&mem), S_OK);
        assert_eq!(used_elem(&mem, 1), (0, 1));

        header(&mem, T_FLUSH, 0);
        write_desc(&mem, 0, HDR, 16, NEXT, 2);
        make_available(&mem, 16, 2, 0);
        blk.process_queue(&mem, &mut queues, 0).unwrap();
        assert_eq!(status(&mem), S_OK);
        assert_eq!(used_index(&mem), 3);

        let mut on_disk = Vec::new();
        let mut f = File::open(&path).unwrap();
        f.seek(SeekFrom::Start(7 * 512)).unwrap();
        f.read_to_end(&mut on_disk).unwrap();
        assert_eq!(on_disk, vec![0x5a; 512]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn requests_past_the_end_fail_with_ioerr() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let (file, path) = disk(4, 0);
        let mut blk = Block::new(file, false, "root").unwrap();
        let mut queues = vec![ready_queue(16)];
        header(&mem, T_IN, 3);
        post(&mem, 0, 1024, true); // sectors 3 and 4; the disk has 0..=3
        blk.process_queue(&mem, &mut queues, 0).unwrap();
        assert_eq!(status(&mem), S_IOERR);
        header(&mem, T_IN, u64::MAX / 2);
        post(&mem, 1, 512, true); // sector * 512 overflows
        blk.process_queue(&mem, &mut queues, 0).unwrap();
        assert_eq!(status(&mem), S_IOERR);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_disks_refuse_writes_and_say_so() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let (file, path) = disk(4, 7);
        let mut blk = Block::new(file, true, "root").unwrap();
        assert_ne!(blk.features() & F_RO, 0);
        let mut queues = vec![ready_queue(16)];
        header(&mem, T_OUT, 0);
        post(&mem, 0, 512, false);
        blk.process_queue(&mem, &mut queues, 0).unwrap();
        assert_eq!(status(&mem), S_IOERR);
        assert_eq!(std::fs::read(&path).unwrap(), vec![7; 2048]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn wrong_direction_unknown_type_and_short_header() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let (file, path) = disk(4, 0);
        let mut blk = Block::new(file, false, "root").unwrap();
        let mut queues = vec![ready_queue(16)];
        header(&mem, T_IN, 0);
        post(&mem, 0, 512, false); // IN into a device-readable buffer
        blk.process_queue(&mem, &mut queues, 0).unwrap();
        assert_eq!(status(&mem), S_IOERR);
        header(&mem, 99, 0);
        post(&mem, 1, 512, true);
        blk.process_queue(&mem, &mut queues, 0).unwrap();
        assert_eq!(status(&mem), S_UNSUPP);
        header(&mem, T_IN, 0);
        write_desc(&mem, 0, HDR, 8, NEXT, 2);
        make_available(&mem, 16, 2, 0);
        blk.process_queue(&mem, &mut queues, 0).unwrap();
        assert_eq!(status(&mem), S_IOERR);
        assert_eq!(used_index(&mem), 3, "every chain is returned to the driver");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn config_space_reports_capacity_and_seg_max() {
        let (file, path) = disk(6, 0);
        let blk = Block::new(file, false, "root").unwrap();
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 6);
        let mut seg = [0u8; 4];
        blk.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), 254);
        let mut past = [0xffu8; 4];
        blk.read_config(u64::MAX - 1, &mut past);
        assert_eq!(past, [0; 4]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn odd_sized_disks_are_rejected() {
        let path = std::env::temp_dir().join(format!("vmm-blk-odd-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 1000]).unwrap();
        let f = File::options().read(true).write(true).open(&path).unwrap();
        assert!(Block::new(f, false, "x").is_err());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn get_id_returns_the_serial() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let (file, path) = disk(1, 0);
        let mut blk = Block::new(file, false, "sandbox-root").unwrap();
        let mut queues = vec![ready_queue(16)];
        header(&mem, T_GET_ID, 0);
        post(&mem, 0, 20, true);
        blk.process_queue(&mem, &mut queues, 0).unwrap();
        let mut id = [0u8; 12];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"sandbox-root");
        std::fs::remove_file(path).unwrap();
    }
}

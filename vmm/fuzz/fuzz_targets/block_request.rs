//! Drives the virtio-blk device (`vmm::fuzzing::Block`) through its queue with requests a
//! hostile guest built: headers, sectors, data buffers, status bytes and their framing all
//! come from the input (see common.rs); the disk is a small unlinked temporary file. Byte 1
//! of the input: bit 0 makes the disk read-only, the rest picks a config-space read.

#![no_main]

use std::fs::File;
use std::sync::Mutex;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm::fuzzing::{Block, VirtioDevice};

mod common;

const DISK_BYTES: u64 = 64 << 10;

/// A disk file (tmpfs when there is one, so FLUSH costs nothing), reopened per device.
fn disk() -> File {
    static DISK: OnceLock<Mutex<File>> = OnceLock::new();
    let disk = DISK.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let path = dir.join(format!("vmm-fuzz-disk-{}", std::process::id()));
        let f = File::options().create(true).truncate(true).read(true).write(true).open(&path).expect("disk file");
        f.set_len(DISK_BYTES).expect("disk size");
        let _ = std::fs::remove_file(&path);
        Mutex::new(f)
    });
    disk.lock().expect("disk lock").try_clone().expect("disk fd")
}

fuzz_target!(|data: &[u8]| {
    let Some((mem, q, extra)) = common::load(data) else { return };
    let Ok(mut block) = Block::new(disk(), extra & 1 != 0, "fuzz") else { return };
    let mut config = [0u8; 8];
    block.read_config(u64::from(extra >> 1) * 3, &mut config);
    if !q.is_valid(mem) {
        return;
    }
    let mut queues = [q];
    // Serves every chain the guest posted; an Err means the guest corrupted the ring and
    // the transport would stop the device.
    let _ = block.process_queue(mem, &mut queues, 0);
});

//! Shared by both targets: a guest whose RAM and queue are built from the fuzz input.
//!
//! Input layout: byte 0 picks the queue size (`1 << (b % 9)`, 1..=256; with the high bit set,
//! a size no driver may use, to cover the layout check), byte 1 is target specific, the rest
//! is copied into guest RAM at `TABLE`. The rings are packed right after each other for the
//! chosen size (descriptor table, then avail ring, then used ring), so a few dozen input bytes
//! reach all of them; buffers may point anywhere, including past the end of RAM. Everything
//! the guest controls in a real VM (descriptors, links, flags, lengths, indices, buffer
//! contents) comes from the input.

use std::sync::OnceLock;

use vm_memory::{Bytes, GuestAddress};
use vmm::fuzzing::{create_guest_memory, GuestMemory, Queue};

/// Small, so that fuzzed addresses land inside RAM often enough.
pub const RAM: u64 = 64 << 10;
pub const TABLE: u64 = 0x1000;
const MAX_IMAGE: usize = (RAM - TABLE) as usize;
static ZEROS: [u8; RAM as usize] = [0; RAM as usize];

/// One guest memory for the whole run (guest RAM is never unmapped), cleared for each input.
pub fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| create_guest_memory(RAM).expect("guest memory for fuzzing"))
}

/// Loads `data` as described above; returns the programmed (not yet validated) queue and
/// the target-specific byte.
pub fn load(data: &[u8]) -> Option<(&'static GuestMemory, Queue, u8)> {
    let (&size_byte, rest) = data.split_first()?;
    let (&extra, image) = rest.split_first()?;
    let mem = memory();
    mem.write_slice(&ZEROS, GuestAddress(0)).ok()?;
    mem.write_slice(&image[..image.len().min(MAX_IMAGE)], GuestAddress(TABLE)).ok()?;
    let mut q = Queue::new(256);
    q.size = if size_byte & 0x80 != 0 { u16::from(size_byte) * 3 } else { 1 << (size_byte % 9) };
    let n = u64::from(q.size);
    let avail = TABLE + 16 * n;
    let used = (avail + 6 + 2 * n).next_multiple_of(4);
    q.ready = true;
    q.desc_table = GuestAddress(TABLE);
    q.avail_ring = GuestAddress(avail);
    q.used_ring = GuestAddress(used);
    Some((mem, q, extra))
}

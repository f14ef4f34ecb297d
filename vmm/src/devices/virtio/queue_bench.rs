//! Side-by-side timing of our split virtqueue (`queue.rs`) and rust-vmm's `virtio-queue` on the
//! same in-process guest memory: the device side of a block-style workload (pop a chain, read
//! its descriptors, return it on the used ring). Three columns:
//!
//! - `ours`: `queue::Queue`, what the block device uses;
//! - `virtio-queue + checks`: `virtio-queue` with what a switch would have to add for our
//!   devices to behave as now (`candidate` below: bad layouts refused at activation, chains
//!   checked and collected, quietly truncated chains turned into errors);
//! - `virtio-queue bare`: `virtio-queue` alone, no checks and no Vec per chain (a floor, not
//!   something our devices could use as is).
//!
//! Ignored by default; run it with
//!
//!     cargo test -p vmm --release -- --ignored --nocapture queue_bench
//!
//! Only the device side is timed, in CPU time of this thread (the build machines are shared, so
//! wall time mostly measures the neighbours); the driver side (publishing avail entries) is the
//! same for all three, and the three alternate so that noise hits them alike.

use std::time::Duration;

use virtio_queue::{Queue as RustVmmQueue, QueueT};

use super::queue::testing::{make_available, ready_queue, write_desc, AVAIL, DESC, NEXT, USED, WRITE};
use crate::memory::{create_guest_memory, GuestMemory};

const SIZE: u16 = 256;
/// Descriptors per chain: header, data, status, as a block request has.
const CHAIN_LEN: u16 = 3;
const CHAINS_PER_BATCH: u16 = SIZE / CHAIN_LEN;
const BATCHES: usize = 12_000;
const ROUNDS: usize = 9;

/// CPU time this thread has used so far.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn set_up_table(mem: &GuestMemory) {
    for c in 0..CHAINS_PER_BATCH {
        let h = c * CHAIN_LEN;
        let buf = 0x10_0000 + 0x3000 * u64::from(c);
        write_desc(mem, h, buf, 16, NEXT, h + 1);
        write_desc(mem, h + 1, buf + 0x1000, 4096, NEXT | WRITE, h + 2);
        write_desc(mem, h + 2, buf + 0x2000, 1, WRITE, 0);
    }
}

/// Publishes one batch of chains starting at avail index `idx`; returns the next index.
fn publish(mem: &GuestMemory, idx: u16) -> u16 {
    for c in 0..CHAINS_PER_BATCH {
        make_available(mem, SIZE, idx.wrapping_add(c), c * CHAIN_LEN);
    }
    idx.wrapping_add(CHAINS_PER_BATCH)
}

/// Runs `BATCHES` batches through `serve_batch` (which returns the descriptors it saw) and
/// returns the CPU time spent in it.
fn timed(mem: &GuestMemory, mut serve_batch: impl FnMut() -> usize) -> Duration {
    let (mut idx, mut spent, mut seen) = (0u16, Duration::ZERO, 0usize);
    for _ in 0..BATCHES {
        idx = publish(mem, idx);
        let t = thread_cpu_time();
        seen += serve_batch();
        spent += thread_cpu_time().checked_sub(t).unwrap();
    }
    assert_eq!(seen, BATCHES * (CHAINS_PER_BATCH * CHAIN_LEN) as usize);
    spent
}

fn ours(mem: &GuestMemory) -> Duration {
    let mut q = ready_queue(SIZE);
    assert!(q.is_valid(mem));
    timed(mem, || {
        let mut seen = 0;
        while let Some((head, chain)) = q.pop(mem).unwrap() {
            let chain = chain.unwrap();
            seen += chain.descriptors.len();
            q.add_used(mem, head, chain.descriptors[1].len + 1).unwrap();
        }
        seen
    })
}

fn candidate(mem: &GuestMemory) -> Duration {
    let mut q = candidate::Queue::activate(mem, SIZE).unwrap();
    timed(mem, || {
        let mut seen = 0;
        while let Some((head, chain)) = q.pop(mem).unwrap() {
            let chain = chain.unwrap();
            seen += chain.descriptors.len();
            q.add_used(mem, head, chain.descriptors[1].len + 1).unwrap();
        }
        seen
    })
}

fn bare(mem: &GuestMemory) -> Duration {
    let mut q = candidate::ring(SIZE).unwrap();
    timed(mem, || {
        let mut seen = 0;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut len = 0;
            for d in chain {
                seen += 1;
                len = d.len();
            }
            q.add_used(mem, head, len).unwrap();
        }
        seen
    })
}

/// What `queue::Queue` would become on top of `virtio-queue` (measured, not used: see
/// the numbers in queue.rs).
mod candidate {
    use std::sync::atomic::Ordering;

    use virtio_queue::{QueueOwnedT, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    use super::super::queue::{Descriptor, DescriptorChain, QueueError};
    use super::{RustVmmQueue, AVAIL, DESC, USED};
    use crate::memory::GuestMemory;

    /// A ring at the test layout, refusing what our `is_valid` refuses.
    pub fn ring(size: u16) -> Option<RustVmmQueue> {
        let mut ring = RustVmmQueue::new(size).ok()?;
        ring.try_set_size(size).ok()?;
        ring.try_set_desc_table_address(GuestAddress(DESC)).ok()?;
        ring.try_set_avail_ring_address(GuestAddress(AVAIL)).ok()?;
        ring.try_set_used_ring_address(GuestAddress(USED)).ok()?;
        ring.set_ready(true);
        Some(ring)
    }

    pub struct Queue {
        ring: RustVmmQueue,
    }

    impl Queue {
        pub fn activate(mem: &GuestMemory, size: u16) -> Option<Self> {
            ring(size).filter(|r| r.is_valid(mem)).map(|ring| Queue { ring })
        }

        #[allow(clippy::type_complexity)]
        pub fn pop(
            &mut self,
            mem: &GuestMemory,
        ) -> Result<Option<(u16, Result<DescriptorChain, QueueError>)>, QueueError> {
            let (size, next) = (self.ring.size(), self.ring.next_avail());
            let chain = match self.ring.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                    let avail = self.ring.avail_idx(mem, Ordering::Acquire).map_or(next, |i| i.0);
                    return Err(QueueError::AvailIndexJump { next, avail });
                }
                Err(_) => return Err(QueueError::RingAccess(AVAIL)),
            };
            let Some(chain) = chain else { return Ok(None) };
            let head = chain.head_index();
            if head >= size {
                return Err(QueueError::HeadOutOfRange(head));
            }
            let mut descriptors = Vec::new();
            let mut last = None;
            for d in chain {
                let (addr, len) = (d.addr(), d.len());
                if len == 0 || !mem.check_range(addr, len as usize) {
                    return Ok(Some((head, Err(QueueError::BadBuffer { addr: addr.0, len }))));
                }
                descriptors.push(Descriptor { addr, len, writable: d.is_write_only() });
                last = Some(d);
            }
            // virtio-queue ends a bad chain quietly: a last descriptor that still says "more"
            // means a link out of the table or a loop; no descriptor at all, a bad indirect table.
            let chain = match last {
                None => Err(QueueError::IndirectNotNegotiated),
                Some(d) if d.has_next() && d.next() >= size => Err(QueueError::NextOutOfRange(d.next())),
                Some(d) if d.has_next() => Err(QueueError::ChainTooLong),
                Some(_) => Ok(DescriptorChain { head, descriptors }),
            };
            Ok(Some((head, chain)))
        }

        pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<(), QueueError> {
            self.ring.add_used(mem, head, len).map_err(|_| QueueError::RingAccess(USED))
        }
    }
}

#[test]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
fn queue_bench() {
    let mem = create_guest_memory(16 << 20).unwrap();
    set_up_table(&mem);
    let chains = (BATCHES * CHAINS_PER_BATCH as usize) as f64;
    let ns = |d: Duration| d.as_nanos() as f64 / chains;
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        a.push(ns(ours(&mem)));
        b.push(ns(candidate(&mem)));
        c.push(ns(bare(&mem)));
    }
    let stats = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2])
    };
    println!("queue_bench: {} chains of {CHAIN_LEN} descriptors per run, {ROUNDS} runs each", chains as u64);
    println!("queue_bench: ns of CPU per chain      min  median");
    for (name, v) in [("ours", &a), ("virtio-queue + checks", &b), ("virtio-queue bare", &c)] {
        let (min, median) = stats(v);
        println!("queue_bench: {name:<22} {min:6.1} {median:6.1}");
    }
}

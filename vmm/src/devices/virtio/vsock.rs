//! virtio-vsock (virtio 1.x, section 5.10) with the data path in the host kernel's
//! vhost-vsock: the guest's CID is its identity on the host's AF_VSOCK sockets.
//!
//! The VMM only negotiates and hands the rx and tx rings to vhost; the event queue
//! (transport resets after migration) is never used and stays with the VMM, idle.

use std::os::unix::io::AsRawFd;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::queue::Queue;
use super::vhost::{MemoryRegion, VhostVsock};
use super::{VirtioDevice, DEVICE_ID_VSOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::memory::GuestMemory;

pub const QUEUE_SIZE: u16 = 256;
/// rx and tx go to vhost; queue 2 is the event queue.
pub const VHOST_QUEUES: usize = 2;

pub struct Vsock {
    cid: u64,
    backend: VhostVsock,
    offered: u64,
    /// One per vhost queue, registered as ioeventfds on QueueNotify with the queue index.
    kicks: [EventFd; VHOST_QUEUES],
    /// The device's irqfd; vhost signals it directly.
    call: EventFd,
    running: bool,
    sizes: [u16; 3],
}

impl Vsock {
    pub fn new(cid: u64, backend: VhostVsock, kicks: [EventFd; VHOST_QUEUES], call: EventFd) -> Result<Self, String> {
        let host = backend.features().map_err(|e| format!("VHOST_GET_FEATURES failed: {e}"))?;
        if host & VIRTIO_F_VERSION_1 == 0 {
            return Err("the host's vhost-vsock does not support virtio 1.0".into());
        }
        let offered = host & (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC);
        Ok(Vsock { cid, backend, offered, kicks, call, running: false, sizes: [QUEUE_SIZE; 3] })
    }

    fn start(&mut self, mem: &GuestMemory, queues: &[Queue], features: u64) -> std::io::Result<()> {
        self.backend.set_features(features)?;
        let regions: Vec<MemoryRegion> = mem
            .iter()
            .map(|r| MemoryRegion {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                flags_padding: 0,
            })
            .collect();
        self.backend.set_mem_table(&regions)?;
        let host =
            |a| mem.get_host_address(a).map(|p| p as u64).map_err(|_| std::io::Error::from_raw_os_error(libc::EFAULT));
        for (i, q) in queues.iter().take(VHOST_QUEUES).enumerate() {
            let index = i as u32;
            self.backend.set_vring_num(index, q.size)?;
            self.backend.set_vring_addr(index, host(q.desc_table)?, host(q.avail_ring)?, host(q.used_ring)?)?;
            self.backend.set_vring_base(index, 0)?;
            self.backend.set_vring_call(index, self.call.as_raw_fd())?;
            self.backend.set_vring_kick(index, self.kicks[i].as_raw_fd())?;
        }
        self.backend.set_running(true)
    }
}

impl VirtioDevice for Vsock {
    fn device_id(&self) -> u32 {
        DEVICE_ID_VSOCK
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_cid_config(self.cid, offset, data);
    }

    fn activate(&mut self, mem: &GuestMemory, queues: &[Queue], features: u64) -> Result<(), String> {
        if queues.iter().take(VHOST_QUEUES).any(|q| !q.ready) {
            return Err("the rx and tx queues must both be ready".into());
        }
        self.start(mem, queues, features).map_err(|e| format!("cannot start vhost-vsock: {e}"))?;
        self.running = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.running {
            // If vhost can't stop, the worst case is that it keeps serving rings the
            // guest is about to reprogram; the next activation replaces them.
            let _ = self.backend.set_running(false);
            self.running = false;
        }
    }

    fn process_queue(&mut self, _: &GuestMemory, _: &mut [Queue], _: usize) -> Result<bool, String> {
        // rx/tx notifications go to vhost through ioeventfds; event-queue buffers are
        // simply held until a transport event we never send.
        Ok(false)
    }

    fn completes_in_kernel(&self) -> bool {
        true
    }
}

/// Reads `struct virtio_vsock_config` (guest_cid, le64) at `offset`; bytes past it are zero.
fn read_cid_config(cid: u64, offset: u64, data: &mut [u8]) {
    let config = cid.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset.checked_add(i as u64).and_then(|o| config.get(o as usize).copied()).unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_holds_the_cid_little_endian() {
        let mut b = [0u8; 8];
        read_cid_config(0x0012_3456_789a, 0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x0012_3456_789a);
        let mut hi = [0xffu8; 4];
        read_cid_config(0x1_0000_0003, 4, &mut hi);
        assert_eq!(hi, [1, 0, 0, 0]);
        let mut past = [0xffu8; 2];
        read_cid_config(3, 7, &mut past);
        assert_eq!(past, [0, 0]);
    }
}

//! virtio-vsock (virtio 1.x, section 5.10) with the data path in the host kernel's
//! vhost-vsock: the guest's CID is its identity on the host's AF_VSOCK sockets.
//!
//! The VMM only negotiates and hands the rx and tx rings to vhost; the event queue
//! (transport resets after migration) is never used and stays with the VMM, idle.

use std::os::unix::io::AsRawFd;

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
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

    fn start(
        &mut self,
        mem: &GuestMemory,
        queues: &[Queue],
        features: u64,
        bases: [u16; VHOST_QUEUES],
    ) -> std::io::Result<()> {
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
            self.backend.set_vring_base(index, bases[i])?;
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
        self.start(mem, queues, features, [0; VHOST_QUEUES]).map_err(|e| format!("cannot start vhost-vsock: {e}"))?;
        self.running = true;
        Ok(())
    }

    fn pause_backend(&mut self) -> Result<Vec<u16>, String> {
        self.backend.set_running(false).map_err(|e| format!("cannot stop vhost-vsock: {e}"))?;
        self.running = false;
        (0..VHOST_QUEUES as u32)
            .map(|q| {
                self.backend.vring_base(q).map_err(|e| format!("cannot read vhost-vsock queue {q}'s position: {e}"))
            })
            .collect()
    }

    fn resume_backend(&mut self) -> Result<(), String> {
        self.backend.set_running(true).map_err(|e| format!("cannot restart vhost-vsock: {e}"))?;
        self.running = true;
        Ok(())
    }

    /// The backend resumes where it stood; the driver is then told its transport was reset:
    /// the connections it had belong to a host that no longer holds them (and after a fork, its
    /// CID changed), so it closes them and reads the CID again. Listening sockets stay.
    fn restore(
        &mut self,
        mem: &GuestMemory,
        queues: &mut [Queue],
        features: u64,
        backend_positions: &[u16],
    ) -> Result<(), String> {
        let bases: [u16; VHOST_QUEUES] = backend_positions.try_into().map_err(|_| {
            format!("snapshot has {} vhost queue positions, expected {VHOST_QUEUES}", backend_positions.len())
        })?;
        if queues.iter().take(VHOST_QUEUES).any(|q| !q.ready) {
            return Err("the rx and tx queues must both be ready".into());
        }
        self.start(mem, queues, features, bases).map_err(|e| format!("cannot start vhost-vsock: {e}"))?;
        self.running = true;
        // Without a free event buffer the event is lost and the driver only notices the reset
        // when its connections fail; the Linux driver keeps the queue filled.
        post_transport_reset(mem, queues.get_mut(EVENT_QUEUE).ok_or("no event queue")?).map(|_| ())
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
/// The event queue, which the VMM serves (vhost only has rx and tx).
const EVENT_QUEUE: usize = 2;
/// `struct virtio_vsock_event { le32 id; }` with id VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (0).
const TRANSPORT_RESET_EVENT: [u8; 4] = 0u32.to_le_bytes();

/// Puts a transport-reset event in the driver's next event buffer. Returns whether one was
/// there (the Linux driver keeps the queue filled; without a buffer the event is lost, and the
/// driver only notices the reset when its connections fail).
fn post_transport_reset(mem: &GuestMemory, queue: &mut Queue) -> Result<bool, String> {
    if !queue.ready {
        return Ok(false);
    }
    let Some((head, chain)) = queue.pop(mem).map_err(|e| format!("event queue: {e}"))? else {
        return Ok(false);
    };
    let written = match chain {
        Ok(chain) => {
            match chain.descriptors.iter().find(|d| d.writable && d.len as usize >= TRANSPORT_RESET_EVENT.len()) {
                Some(d) => {
                    mem.write_slice(&TRANSPORT_RESET_EVENT, d.addr).map_err(|e| format!("event queue buffer: {e}"))?;
                    TRANSPORT_RESET_EVENT.len() as u32
                }
                None => 0,
            }
        }
        Err(_) => 0,
    };
    queue.add_used(mem, head, written).map_err(|e| format!("event queue: {e}"))?;
    Ok(true)
}

fn read_cid_config(cid: u64, offset: u64, data: &mut [u8]) {
    let config = cid.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset.checked_add(i as u64).and_then(|o| config.get(o as usize).copied()).unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::devices::virtio::queue::testing::{make_available, ready_queue, used_elem, used_index, write_desc};
    use crate::memory::create_guest_memory;
    use vm_memory::GuestAddress;

    #[test]
    fn a_restore_tells_the_driver_its_transport_was_reset() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut q = ready_queue(8);
        mem.write_slice(&[0xaa; 4], GuestAddress(0x8000)).unwrap();
        write_desc(&mem, 0, 0x8000, 4, 2 /* device-writable */, 0);
        make_available(&mem, 8, 0, 0);
        assert!(post_transport_reset(&mem, &mut q).unwrap());
        assert_eq!(used_index(&mem), 1);
        assert_eq!(used_elem(&mem, 0), (0, 4));
        let mut event = [0xffu8; 4];
        mem.read_slice(&mut event, GuestAddress(0x8000)).unwrap();
        assert_eq!(event, [0; 4], "id 0: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
        // No buffer left: nothing to signal, and no error.
        assert!(!post_transport_reset(&mem, &mut q).unwrap());
    }

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

//! Virtio devices on the MMIO transport: the split virtqueue, the transport's register
//! file, and the block and vsock devices behind it.

pub mod block;
pub mod mmio;
pub mod queue;
#[cfg(test)]
mod queue_bench;
pub mod vhost;
pub mod vsock;

use crate::memory::GuestMemory;
use queue::Queue;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

pub const DEVICE_ID_BLOCK: u32 = 2;
pub const DEVICE_ID_VSOCK: u32 = 19;

/// A device model behind a `mmio::MmioTransport`.
pub trait VirtioDevice: Send {
    fn device_id(&self) -> u32;
    /// Feature bits offered to the driver (VIRTIO_F_VERSION_1 must be among them).
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device-specific configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Called when the driver sets DRIVER_OK with every queue validated.
    fn activate(&mut self, mem: &GuestMemory, queues: &[Queue], features: u64) -> Result<(), String>;
    /// The driver reset the device (wrote 0 to Status).
    fn reset(&mut self);
    /// Handles new buffers on queue `index`. Returns whether used buffers were added.
    /// `Err` means the driver corrupted the queue; the transport then stops the device.
    fn process_queue(&mut self, mem: &GuestMemory, queues: &mut [Queue], index: usize) -> Result<bool, String>;
    /// True for devices whose queues a kernel backend (vhost) completes and interrupts
    /// directly: the VMM never learns when, so the interrupt status must always say
    /// "used buffers" (a spurious check costs the guest one ring scan).
    fn completes_in_kernel(&self) -> bool {
        false
    }
    /// For a snapshot: stops the device's kernel backend and returns where it stands in each
    /// queue it serves (nothing for devices the VMM serves itself, whose queues say it all).
    fn pause_backend(&mut self) -> Result<Vec<u16>, String> {
        Ok(Vec::new())
    }
    /// After a snapshot the VM survives: the backend takes over again.
    fn resume_backend(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Brings an active device back from a snapshot (instead of `activate`), with the queue
    /// positions `pause_backend` returned. The transport interrupts the driver afterwards.
    fn restore(
        &mut self,
        mem: &GuestMemory,
        queues: &mut [Queue],
        features: u64,
        backend_positions: &[u16],
    ) -> Result<(), String> {
        let _ = backend_positions;
        self.activate(mem, queues, features)
    }
}

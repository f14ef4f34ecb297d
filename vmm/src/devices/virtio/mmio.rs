//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2): the register window
//! the guest driver programs, feature negotiation, queue setup and device status.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::queue::{Queue, QueueState};
use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4f43_4d56; // "VMCO"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG_SPACE: u64 = 0x100;
/// Offset of QueueNotify, where ioeventfds are registered.
pub const NOTIFY_OFFSET: u64 = REG_QUEUE_NOTIFY;

#[cfg(test)]
pub const STATUS_ACKNOWLEDGE: u32 = 1;
#[cfg(test)]
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;

pub const INT_USED_BUFFER: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// What a snapshot keeps of a transport: its registers, its queues, and the positions of a
/// kernel backend in the queues it serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TransportState {
    device_id: u32,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    active: bool,
    queues: Vec<QueueState>,
    backend_positions: Vec<u16>,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemory>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    irq: EventFd,
    active: bool,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: Arc<GuestMemory>, irq: EventFd) -> Self {
        let queues = device.queue_max_sizes().iter().map(|&m| Queue::new(m)).collect();
        MmioTransport {
            device,
            mem,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            irq,
            active: false,
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.active {
            return None; // queue registers are frozen once the device runs
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return; // the spec requires 32-bit aligned register access
        }
        let value = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_id(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.queues.get(self.queue_sel as usize).map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.queues.get(self.queue_sel as usize).map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => {
                if self.active && self.device.completes_in_kernel() {
                    self.interrupt_status | INT_USED_BUFFER
                } else {
                    self.interrupt_status
                }
            }
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            return; // block and vsock configuration is read-only
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else { return };
        if !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes(bytes);
        let set_low = |addr: &mut GuestAddress, v: u32| addr.0 = (addr.0 & !0xffff_ffff) | u64::from(v);
        let set_high = |addr: &mut GuestAddress, v: u32| addr.0 = (addr.0 & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            // Features are frozen once the driver set FEATURES_OK.
            REG_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.size = v.min(u32::from(u16::MAX)) as u16;
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.ready = v == 1;
                }
            }
            REG_QUEUE_DESC_LOW => self.selected_queue().map_or((), |q| set_low(&mut q.desc_table, v)),
            REG_QUEUE_DESC_HIGH => self.selected_queue().map_or((), |q| set_high(&mut q.desc_table, v)),
            REG_QUEUE_DRIVER_LOW => self.selected_queue().map_or((), |q| set_low(&mut q.avail_ring, v)),
            REG_QUEUE_DRIVER_HIGH => self.selected_queue().map_or((), |q| set_high(&mut q.avail_ring, v)),
            REG_QUEUE_DEVICE_LOW => self.selected_queue().map_or((), |q| set_low(&mut q.used_ring, v)),
            REG_QUEUE_DEVICE_HIGH => self.selected_queue().map_or((), |q| set_high(&mut q.used_ring, v)),
            REG_QUEUE_NOTIFY => self.process_queue(v as usize),
            REG_INTERRUPT_ACK => self.interrupt_status &= !v,
            REG_STATUS => self.write_status(v),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let newly = v & !self.status;
        self.status = v;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // Reading Status back without FEATURES_OK tells the driver we refused.
                self.status &= !STATUS_FEATURES_OK;
            }
        }
        if newly & STATUS_DRIVER_OK != 0 && !self.active {
            crate::timeline::mark(&format!("virtio device type {} DRIVER_OK", self.device.device_id()));
            if let Err(e) = self.activate() {
                eprintln!("vmm: virtio device {} not started: {e}", self.device.device_id());
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        if self.status & STATUS_FEATURES_OK == 0 {
            return Err("driver set DRIVER_OK without FEATURES_OK".into());
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready && !q.is_valid(&self.mem) {
                return Err(format!("queue {i} layout is invalid"));
            }
        }
        self.device.activate(&self.mem, &self.queues, self.driver_features)?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.interrupt_status = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Runs the device on queue `index` (from an ioeventfd or a trapped notify write).
    pub fn process_queue(&mut self, index: usize) {
        if !self.active || self.status & STATUS_NEEDS_RESET != 0 || !self.queues.get(index).is_some_and(|q| q.ready) {
            return;
        }
        match self.device.process_queue(&self.mem, &mut self.queues, index) {
            Ok(true) => {
                if self.queues[index].wants_interrupt(&self.mem) {
                    self.raise(INT_USED_BUFFER);
                }
            }
            Ok(false) => {}
            Err(e) => {
                eprintln!("vmm: virtio device {} stopped: {e}", self.device.device_id());
                self.status |= STATUS_NEEDS_RESET;
                self.raise(INT_CONFIG_CHANGE);
            }
        }
    }

    /// For a snapshot, with the vCPUs stopped: the registers and queues, after stopping the
    /// device's kernel backend (which `resume_after_save` starts again).
    pub fn save(&mut self) -> Result<TransportState, String> {
        let backend_positions = if self.active { self.device.pause_backend()? } else { Vec::new() };
        Ok(TransportState {
            device_id: self.device.device_id(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
            active: self.active,
            queues: self.queues.iter().map(Queue::state).collect(),
            backend_positions,
        })
    }

    pub fn resume_after_save(&mut self) -> Result<(), String> {
        if self.active {
            self.device.resume_backend()?;
        }
        Ok(())
    }

    /// Puts a fresh transport in the saved state and brings its device back. Everything in
    /// the snapshot is checked as if the guest had written it: a damaged or foreign state is
    /// refused, never trusted.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), String> {
        let id = self.device.device_id();
        if s.device_id != id {
            return Err(format!("snapshot has virtio device type {} where this VM has {id}", s.device_id));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "snapshot has {} queues for virtio device type {id}, expected {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        for (q, saved) in self.queues.iter_mut().zip(&s.queues) {
            q.restore(saved);
        }
        self.queue_sel = s.queue_sel;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        if !s.active {
            return Ok(());
        }
        if self.driver_features & !self.device.features() != 0 {
            return Err(format!("snapshot's virtio device type {id} uses features this host does not offer"));
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready && !q.is_valid(&self.mem) {
                return Err(format!("snapshot's virtio device type {id} queue {i} layout is invalid"));
            }
        }
        self.device
            .restore(&self.mem, &mut self.queues, self.driver_features, &s.backend_positions)
            .map_err(|e| format!("virtio device type {id}: {e}"))?;
        self.active = true;
        Ok(())
    }

    /// Once the restored VM's interrupt controllers hold their saved state: interrupts once.
    /// An interrupt the device raised just before the snapshot may still have been on its way
    /// into the old VM's IOAPIC (KVM injects an irqfd's edge from a worker thread) and is then
    /// in neither snapshot; the driver would wait for it forever (with EVENT_IDX the backend
    /// never signals again until the driver catches up). With it, the driver looks at its
    /// rings and finds what is there, or nothing, which a virtio driver takes in stride.
    pub fn signal_after_restore(&mut self) {
        if self.active {
            self.raise(INT_USED_BUFFER);
        }
    }

    fn raise(&mut self, why: u32) {
        self.interrupt_status |= why;
        // Failing to signal an eventfd means its counter is saturated: already pending.
        let _ = self.irq.write(1);
    }

    #[cfg(test)]
    pub fn is_active(&self) -> bool {
        self.active
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::devices::virtio::queue::testing::{AVAIL, DESC, USED};
    use crate::memory::create_guest_memory;
    use std::sync::Mutex;

    /// A device that records what the transport did to it.
    pub struct Probe {
        pub log: Arc<Mutex<Vec<String>>>,
        pub sizes: Vec<u16>,
    }

    impl VirtioDevice for Probe {
        fn device_id(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn activate(&mut self, _: &GuestMemory, queues: &[Queue], features: u64) -> Result<(), String> {
            self.log.lock().unwrap().push(format!("activate {features:#x} size {}", queues[0].size));
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().push("reset".into());
        }
        fn process_queue(&mut self, _: &GuestMemory, _: &mut [Queue], index: usize) -> Result<bool, String> {
            self.log.lock().unwrap().push(format!("queue {index}"));
            Ok(true)
        }
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Vec<String>>>, EventFd) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mem = Arc::new(create_guest_memory(16 << 20).unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Probe { log: log.clone(), sizes: vec![16] };
        (MmioTransport::new(Box::new(dev), mem, irq.try_clone().unwrap()), log, irq)
    }

    /// The Linux driver's probe sequence up to DRIVER_OK.
    pub fn drive_to_ok(t: &mut MmioTransport, features_hi: u32, features_lo: u32, size: u32) {
        w(t, REG_STATUS, 0);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, features_hi);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, features_lo);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        w(t, REG_QUEUE_SEL, 0);
        w(t, REG_QUEUE_NUM, size);
        w(t, REG_QUEUE_DESC_LOW, DESC as u32);
        w(t, REG_QUEUE_DESC_HIGH, 0);
        w(t, REG_QUEUE_DRIVER_LOW, AVAIL as u32);
        w(t, REG_QUEUE_DRIVER_HIGH, 0);
        w(t, REG_QUEUE_DEVICE_LOW, USED as u32);
        w(t, REG_QUEUE_DEVICE_HIGH, 0);
        w(t, REG_QUEUE_READY, 1);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0, "queue 1 does not exist");
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0b101);
        let mut cfg = [0u8; 2];
        t.read(CONFIG_SPACE + 8, &mut cfg);
        assert_eq!(cfg, [8, 9]);
    }

    #[test]
    fn misaligned_or_narrow_register_access_reads_zero() {
        let (mut t, _, _) = transport();
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(REG_MAGIC + 2, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn full_negotiation_activates_and_notify_interrupts() {
        let (mut t, log, irq) = transport();
        drive_to_ok(&mut t, 1, 0b100, 8);
        assert!(t.is_active());
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_USED_BUFFER);
        w(&mut t, REG_INTERRUPT_ACK, INT_USED_BUFFER);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        // Queue registers are frozen while running.
        w(&mut t, REG_QUEUE_NUM, 2);
        w(&mut t, REG_STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(
            *log.lock().unwrap(),
            vec!["activate 0x100000004 size 8".to_string(), "queue 0".into(), "reset".into()]
        );
    }

    #[test]
    fn a_saved_transport_restores_into_a_fresh_one_and_keeps_serving() {
        let (mut t, log, _) = transport();
        drive_to_ok(&mut t, 1, 0b100, 8);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        let saved = t.save().unwrap();
        // Through the file format and back, as a snapshot carries it.
        let saved: TransportState = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let (mut fresh, fresh_log, irq) = transport();
        fresh.restore(&saved).unwrap();
        fresh.signal_after_restore();
        assert_eq!(irq.read().unwrap(), 1, "restored devices interrupt once");
        assert!(fresh.is_active());
        assert_eq!(r(&mut fresh, REG_STATUS), r(&mut t, REG_STATUS));
        assert_eq!(r(&mut fresh, REG_INTERRUPT_STATUS), INT_USED_BUFFER, "the un-acknowledged interrupt survives");
        assert_eq!(fresh.queues[0].state(), t.queues[0].state());
        // The device was brought back without a driver handshake, then serves its queue.
        w(&mut fresh, REG_QUEUE_NOTIFY, 0);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(*fresh_log.lock().unwrap(), vec!["activate 0x100000004 size 8".to_string(), "queue 0".into()]);
        assert_eq!(log.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_foreign_or_damaged_transport_state_is_refused() {
        let (mut t, _, _) = transport();
        drive_to_ok(&mut t, 1, 0b100, 8);
        let saved = t.save().unwrap();
        let mut other = saved.clone();
        other.device_id = 2;
        let (mut fresh, _, _) = transport();
        assert!(fresh.restore(&other).unwrap_err().contains("device type 2 where this VM has 42"));
        let mut bad_ring = saved.clone();
        bad_ring.queues[0].desc_table = 1 << 40; // outside guest memory
        assert!(fresh.restore(&bad_ring).unwrap_err().contains("layout is invalid"));
        let mut unoffered = saved;
        unoffered.driver_features |= 0b010;
        assert!(fresh.restore(&unoffered).unwrap_err().contains("features this host does not offer"));
        assert!(!fresh.is_active());
    }

    #[test]
    fn unoffered_features_or_missing_version_1_are_refused() {
        let (mut t, log, _) = transport();
        drive_to_ok(&mut t, 1, 0b010, 8); // bit 1 was never offered
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        assert!(!t.is_active());
        drive_to_ok(&mut t, 0, 0b001, 8); // legacy driver without VERSION_1
        assert!(!t.is_active());
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn invalid_queue_layout_needs_reset_instead_of_running() {
        let (mut t, log, _) = transport();
        drive_to_ok(&mut t, 1, 0, 12); // not a power of two
        assert!(!t.is_active());
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert!(log.lock().unwrap().is_empty());
    }
}

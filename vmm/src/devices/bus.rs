//! Routes trapped port I/O and MMIO accesses from vCPU threads to the device that decodes
//! the address. Nothing decodes most of the space: reads there return all ones, like an
//! empty bus, and writes vanish.

use std::sync::{Arc, Mutex};

use super::legacy::LegacyDevices;
use super::virtio::mmio::MmioTransport;
use crate::layout::{
    COM1_PORT, COM1_PORT_COUNT, I8042_COMMAND_PORT, I8042_DATA_PORT, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::timeline::{self, Exit, Once};

/// Counts a port exit for the diagnostic timeline.
fn count_port(port: u16) {
    timeline::exit(match port {
        p if (COM1_PORT..COM1_PORT + COM1_PORT_COUNT).contains(&p) => Exit::Serial,
        I8042_DATA_PORT | I8042_COMMAND_PORT => Exit::I8042,
        _ => Exit::OtherPort,
    });
}

pub struct Bus {
    pub legacy: LegacyDevices,
    /// Device `i` occupies `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

impl Bus {
    fn virtio_at(&self, addr: u64) -> Option<(&Arc<Mutex<MmioTransport>>, u64)> {
        let found = addr
            .checked_sub(VIRTIO_MMIO_BASE)
            .and_then(|rel| Some((self.virtio.get((rel / VIRTIO_MMIO_SIZE) as usize)?, rel % VIRTIO_MMIO_SIZE)));
        if found.is_some() {
            timeline::exit(Exit::VirtioMmio);
            timeline::once(Once::VirtioAccess, "first virtio-mmio access");
        } else {
            timeline::exit(Exit::OtherMmio);
        }
        found
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        count_port(port);
        if !self.legacy.read(port, data) {
            data.fill(0xff);
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        count_port(port);
        self.legacy.write(port, data);
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.virtio_at(addr) {
            Some((dev, offset)) => match dev.lock() {
                Ok(mut d) => d.read(offset, data),
                Err(_) => data.fill(0xff),
            },
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((dev, offset)) = self.virtio_at(addr) {
            if let Ok(mut d) = dev.lock() {
                d.write(offset, data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::console::ConsoleLog;
    use crate::devices::virtio::mmio::tests::Probe;
    use crate::exit::ExitSignal;
    use crate::memory::create_guest_memory;
    use vmm_sys_util::eventfd::EventFd;

    fn bus(devices: usize) -> Bus {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let log = std::fs::File::create("/dev/null").unwrap();
        let legacy = LegacyDevices::new(EventFd::new(0).unwrap(), ConsoleLog::new(log, exit.clone()), exit);
        let mem = Arc::new(create_guest_memory(16 << 20).unwrap());
        let virtio = (0..devices)
            .map(|_| {
                let probe = Probe { log: Arc::new(Mutex::new(Vec::new())), sizes: vec![8] };
                Arc::new(Mutex::new(MmioTransport::new(Box::new(probe), mem.clone(), EventFd::new(0).unwrap())))
            })
            .collect();
        Bus { legacy, virtio }
    }

    #[test]
    fn mmio_windows_map_to_devices_in_order() {
        let b = bus(2);
        let mut magic = [0u8; 4];
        b.mmio_read(VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE, &mut magic);
        assert_eq!(&magic, b"virt");
        b.mmio_read(VIRTIO_MMIO_BASE + 2 * VIRTIO_MMIO_SIZE, &mut magic);
        assert_eq!(magic, [0xff; 4], "no third device");
        b.mmio_read(VIRTIO_MMIO_BASE - 4, &mut magic);
        assert_eq!(magic, [0xff; 4]);
    }

    #[test]
    fn empty_ports_float_high() {
        let b = bus(0);
        let mut d = [0u8; 2];
        b.pio_read(0xcf8, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }
}

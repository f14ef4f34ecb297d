//! The port-I/O devices: COM1 (8250 UART) and the i8042's CPU-reset line.
//!
//! Power-off has no port: the sandbox kernel is built without ACPI (image/guest-kernel.config),
//! so it ends `poweroff` with its `reboot: Power down` console line, which the console sink
//! (`console.rs`) turns into the power-off exit.

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::ConsoleLog;
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::{COM1_PORT, COM1_PORT_COUNT, I8042_COMMAND_PORT, I8042_DATA_PORT};

/// Raises an interrupt line through an irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The i8042 "pulse reset line" command ends the VM as a reboot.
pub struct ResetLine(pub Arc<ExitSignal>);

impl Trigger for ResetLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.request(ExitReason::Reboot);
        Ok(())
    }
}

pub type SerialConsole = Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleLog<File>>;

pub struct LegacyDevices {
    serial: Mutex<SerialConsole>,
    i8042: Mutex<I8042Device<ResetLine>>,
}

impl LegacyDevices {
    pub fn new(serial_irq: EventFd, console: ConsoleLog<File>, exit: Arc<ExitSignal>) -> Self {
        LegacyDevices {
            serial: Mutex::new(Serial::new(IrqLine(serial_irq), console)),
            i8042: Mutex::new(I8042Device::new(ResetLine(exit))),
        }
    }

    /// Handles an IN; returns false if no device decodes `port` (the bus then reads 0xff).
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        if data.len() != 1 {
            return false;
        }
        data[0] = match port {
            p if (COM1_PORT..COM1_PORT + COM1_PORT_COUNT).contains(&p) => match self.serial.lock() {
                Ok(mut s) => s.read((p - COM1_PORT) as u8),
                Err(_) => return false,
            },
            I8042_DATA_PORT | I8042_COMMAND_PORT => match self.i8042.lock() {
                Ok(mut k) => k.read((port - I8042_DATA_PORT) as u8),
                Err(_) => return false,
            },
            _ => return false,
        };
        true
    }

    /// Handles an OUT; writes to unknown ports are ignored, as on real hardware.
    pub fn write(&self, port: u16, data: &[u8]) {
        let [value] = data else { return };
        match port {
            p if (COM1_PORT..COM1_PORT + COM1_PORT_COUNT).contains(&p) => {
                if let Ok(mut s) = self.serial.lock() {
                    // An interrupt that can't be raised leaves the guest's driver polling.
                    let _ = s.write((p - COM1_PORT) as u8, *value);
                }
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => {
                if let Ok(mut k) = self.i8042.lock() {
                    let _ = k.write((port - I8042_DATA_PORT) as u8, *value);
                }
            }
            _ => {}
        }
    }

    pub fn flush_console(&self) {
        if let Ok(mut s) = self.serial.lock() {
            let _ = s.writer_mut().flush_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> (LegacyDevices, Arc<ExitSignal>, EventFd, std::path::PathBuf) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let path =
            std::env::temp_dir().join(format!("vmm-console-{}-{:?}", std::process::id(), std::thread::current().id()));
        let file = File::create(&path).unwrap();
        let d = LegacyDevices::new(irq.try_clone().unwrap(), ConsoleLog::new(file, exit.clone()), exit.clone());
        (d, exit, irq, path)
    }

    #[test]
    fn serial_bytes_reach_the_console_log() {
        let (d, _exit, _irq, path) = devices();
        for b in b"hello\n" {
            d.write(COM1_PORT, &[*b]);
        }
        d.flush_console();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello\n");
        // Line status register: transmitter empty bits set, so the guest keeps sending.
        let mut lsr = [0u8];
        assert!(d.read(COM1_PORT + 5, &mut lsr));
        assert_eq!(lsr[0] & 0x60, 0x60);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn i8042_reset_command_is_a_reboot() {
        let (d, exit, _irq, path) = devices();
        d.write(I8042_COMMAND_PORT, &[0xaa]); // self-test: not a reset
        assert_eq!(exit.reason(), None);
        d.write(I8042_COMMAND_PORT, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn the_former_acpi_sleep_port_is_not_decoded() {
        // 0x600 was the ACPI sleep-control register; with no ACPI tables no guest is told of it.
        let (d, exit, _irq, path) = devices();
        let mut b = [0u8];
        assert!(!d.read(0x600, &mut b));
        d.write(0x600, &[(5 << 2) | (1 << 5)]); // what an ACPI S5 power-off would write
        assert_eq!(exit.reason(), None);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn unknown_ports_and_wide_accesses_are_not_decoded() {
        let (d, exit, _irq, path) = devices();
        let mut b = [0u8];
        assert!(!d.read(0x80, &mut b));
        let mut w = [0u8; 2];
        assert!(!d.read(COM1_PORT, &mut w));
        d.write(0x80, &[0xfe]);
        d.write(I8042_COMMAND_PORT, &[0xfe, 0xfe]);
        assert_eq!(exit.reason(), None);
        std::fs::remove_file(path).unwrap();
    }
}

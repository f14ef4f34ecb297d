//! The port-I/O devices: COM1 (8250 UART) and the i8042's CPU-reset line.
//!
//! Power-off has no port: the sandbox kernel is built without ACPI (image/guest-kernel.config),
//! so it ends `poweroff` with its `reboot: Power down` console line, which the console sink
//! (`console.rs`) turns into the power-off exit.

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
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

/// The UART's registers and unread input in a snapshot. (The i8042 keeps nothing worth saving:
/// its only job here is the reset line.)
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SerialSnapshot {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl LegacyDevices {
    pub fn new(serial_irq: EventFd, console: ConsoleLog<File>, exit: Arc<ExitSignal>) -> Self {
        LegacyDevices {
            serial: Mutex::new(Serial::new(IrqLine(serial_irq), console)),
            i8042: Mutex::new(I8042Device::new(ResetLine(exit))),
        }
    }

    /// The devices as a snapshot left them.
    pub fn restored(
        saved: &SerialSnapshot,
        serial_irq: EventFd,
        console: ConsoleLog<File>,
        exit: Arc<ExitSignal>,
    ) -> Result<Self, String> {
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, IrqLine(serial_irq), vm_superio::serial::NoEvents, console)
            .map_err(|e| format!("snapshot's serial port state is refused: {e:?}"))?;
        Ok(LegacyDevices { serial: Mutex::new(serial), i8042: Mutex::new(I8042Device::new(ResetLine(exit))) })
    }

    pub fn serial_snapshot(&self) -> Result<SerialSnapshot, String> {
        let s = self.serial.lock().map_err(|_| "serial port lock poisoned".to_string())?.state();
        Ok(SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
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
    fn the_serial_port_comes_back_as_the_snapshot_left_it() {
        let (d, exit, irq, path) = devices();
        d.write(COM1_PORT + 3, &[0x80]); // DLAB on
        d.write(COM1_PORT, &[0x01]); // divisor 1: 115200 baud
        d.write(COM1_PORT + 3, &[0x03]); // 8N1, DLAB off
        d.write(COM1_PORT + 7, &[0x5a]); // scratch
        d.write(COM1_PORT + 1, &[0x02]); // THR-empty interrupt on
        let saved = d.serial_snapshot().unwrap();
        let saved: SerialSnapshot = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let file = File::create(&path).unwrap();
        let back = LegacyDevices::restored(&saved, irq, ConsoleLog::new(file, exit.clone()), exit).unwrap();
        assert_eq!(back.serial_snapshot().unwrap(), saved);
        let mut b = [0u8];
        assert!(back.read(COM1_PORT + 7, &mut b));
        assert_eq!(b[0], 0x5a);
        let mut too_much = saved;
        too_much.in_buffer = vec![0; 65];
        let (_, exit, irq, _) = devices();
        let file = File::create(&path).unwrap();
        assert!(LegacyDevices::restored(&too_much, irq, ConsoleLog::new(file, exit.clone()), exit).is_err());
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

//! The ACPI power button, read as key events from its evdev device (modules `button`, `evdev`).

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// struct input_event on 64-bit: struct timeval (16 bytes), type u16, code u16, value i32.
const EVENT_SIZE: usize = 24;

pub struct PowerButtons {
    devices: Vec<File>,
}

impl PowerButtons {
    /// Opens every input device named "Power Button" (ACPI exposes one or two).
    pub fn open() -> PowerButtons {
        let mut devices = Vec::new();
        if let Ok(entries) = fs::read_dir("/sys/class/input") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with("event") {
                    continue;
                }
                let label = crate::sys::fs::read_trimmed(entry.path().join("device/name")).unwrap_or_default();
                if label != "Power Button" {
                    continue;
                }
                match OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(format!("/dev/input/{name}"))
                {
                    Ok(file) => devices.push(file),
                    Err(e) => crate::log!("cannot open power button /dev/input/{name}: {e}"),
                }
            }
        }
        PowerButtons { devices }
    }

    pub fn count(&self) -> usize {
        self.devices.len()
    }

    pub fn fds(&self) -> Vec<RawFd> {
        self.devices.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect()
    }

    /// Whether the readable device `fd` reported a power key press.
    pub fn pressed(&mut self, fd: RawFd) -> bool {
        let Some(device) = self.devices.iter_mut().find(|f| f.as_raw_fd() == fd) else { return false };
        let mut buf = [0u8; EVENT_SIZE * 16];
        let mut pressed = false;
        while let Ok(n) = device.read(&mut buf) {
            if n == 0 {
                break;
            }
            pressed |= buf[..n].chunks_exact(EVENT_SIZE).any(is_power_press);
        }
        pressed
    }
}

fn is_power_press(event: &[u8]) -> bool {
    let kind = u16::from_ne_bytes([event[16], event[17]]);
    let code = u16::from_ne_bytes([event[18], event[19]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> [u8; EVENT_SIZE] {
        let mut e = [0u8; EVENT_SIZE];
        e[16..18].copy_from_slice(&kind.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_power_key_press_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, 30, 1)), "another key");
        assert!(!is_power_press(&event(0, KEY_POWER, 1)), "sync event");
    }
}

//! The serial console's sink: the guest's ttyS0 output goes line-buffered to the console
//! log, and the kernel's last words are spotted on the way through.
//!
//! A kernel without ACPI (our sandbox kernel) has no way to switch the machine off: `poweroff`
//! and `halt` end with every CPU halted and interrupts off, which a VMM cannot see. Its final
//! console line can be seen, so it is the power-off signal. Likewise the panic banner marks a
//! panic. A guest that prints these lines itself only ends its own VM, with a wrong status.

use std::collections::VecDeque;
use std::io::{self, LineWriter, Write};
use std::sync::Arc;

use crate::exit::{ExitReason, ExitSignal};
use crate::timeline::{self, Once};

/// What Linux prints first when it panics (kernel/panic.c). Documented as our panic
/// detection: a guest that prints this itself only ends its own VM as "panicked".
pub const PANIC_BANNER: &[u8] = b"Kernel panic - not syncing";
/// What kernel/reboot.c prints right before halting or powering off the machine.
pub const HALT_LINES: [&[u8]; 2] = [b"reboot: System halted", b"reboot: Power down"];
const LONGEST_MARKER: usize = 26;
/// The timeline keeps this much of a console line (a guest may never end one).
const TIMELINE_LINE_MAX: usize = 200;

pub struct ConsoleLog<W: Write> {
    out: LineWriter<W>,
    recent: VecDeque<u8>,
    exit: Arc<ExitSignal>,
    /// The line being written, kept only for the diagnostic timeline.
    line: Vec<u8>,
}

impl<W: Write> ConsoleLog<W> {
    pub fn new(out: W, exit: Arc<ExitSignal>) -> Self {
        ConsoleLog {
            out: LineWriter::new(out),
            recent: VecDeque::with_capacity(LONGEST_MARKER),
            exit,
            line: Vec::new(),
        }
    }

    fn scan(&mut self, byte: u8) {
        if self.recent.len() == LONGEST_MARKER {
            self.recent.pop_front();
        }
        self.recent.push_back(byte);
        let ends_with = |marker: &[u8]| {
            marker.last() == Some(&byte)
                && self.recent.len() >= marker.len()
                && self.recent.iter().skip(self.recent.len() - marker.len()).eq(marker.iter())
        };
        if ends_with(PANIC_BANNER) {
            self.exit.note_panic();
        }
        if HALT_LINES.iter().any(|m| ends_with(m)) {
            self.exit.request(ExitReason::PowerOff);
        }
    }
}

impl<W: Write> Write for ConsoleLog<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.scan(b);
        }
        if timeline::enabled() {
            timeline::once(Once::SerialByte, "first serial byte");
            for &b in buf {
                if b == b'\n' {
                    timeline::console_line(&self.line);
                    self.line.clear();
                } else if self.line.len() < TIMELINE_LINE_MAX {
                    self.line.push(b);
                }
            }
        }
        // A console log that can't be written must not stop the guest: drop the bytes.
        if self.out.write_all(buf).is_err() {
            let _ = self.out.flush();
        }
        Ok(buf.len())
    }

    /// The UART model flushes after every byte; honouring that would cost one write(2)
    /// per console byte, so lines are flushed when they end (or on `flush_now`).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> ConsoleLog<W> {
    /// Writes out a partial last line (when the VM stops).
    pub fn flush_now(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_split_across_writes_is_detected() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut log = ConsoleLog::new(Vec::new(), exit.clone());
        log.write_all(b"[    1.0] Kernel pan").unwrap();
        assert!(!exit.panic_seen());
        for b in b"ic - not syncing: VFS: Unable to mount root fs\n" {
            log.write_all(&[*b]).unwrap();
        }
        assert!(exit.panic_seen());
        log.flush_now().unwrap();
        assert!(log.out.get_ref().starts_with(b"[    1.0] Kernel panic - not syncing: VFS"));
    }

    #[test]
    fn halt_and_power_down_lines_are_a_power_off() {
        for line in [&b"[   2.1] reboot: System halted\n"[..], b"[   2.1] reboot: Power down\n"] {
            let exit = Arc::new(ExitSignal::new().unwrap());
            let mut log = ConsoleLog::new(Vec::new(), exit.clone());
            log.write_all(b"reboot: Restarting system\n").unwrap();
            assert_eq!(exit.reason(), None);
            log.write_all(line).unwrap();
            assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        }
    }

    #[test]
    fn longest_marker_fits_the_window() {
        let longest = HALT_LINES.iter().map(|m| m.len()).chain([PANIC_BANNER.len()]).max().unwrap();
        assert_eq!(longest, LONGEST_MARKER);
    }

    #[test]
    fn output_is_written_per_line_not_per_byte() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut log = ConsoleLog::new(Vec::new(), exit);
        log.write_all(b"partial").unwrap();
        log.flush().unwrap();
        assert!(log.out.get_ref().is_empty());
        log.write_all(b" line\nnext").unwrap();
        assert_eq!(log.out.get_ref().as_slice(), b"partial line\n");
        log.flush_now().unwrap();
        assert_eq!(log.out.get_ref().as_slice(), b"partial line\nnext");
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut log = ConsoleLog::new(Vec::new(), exit.clone());
        log.write_all(b"Kernel panic - not really\nno panic - not syncing\n").unwrap();
        assert!(!exit.panic_seen());
    }
}

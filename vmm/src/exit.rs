//! Why the VM stopped, and the process exit status that tells the caller.
//!
//! Any thread (a vCPU, a device, the console scanner) may report the first reason; the
//! main thread waits on `ExitSignal::event` and ends the process with `ExitReason::code`.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Exit statuses of `vmm run` (documented in the crate docs and NOTES.md).
pub const STATUS_POWEROFF: u8 = 0;
pub const STATUS_VMM_ERROR: u8 = 1;
pub const STATUS_USAGE: u8 = 2;
pub const STATUS_REBOOT: u8 = 3;
pub const STATUS_PANIC: u8 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    PowerOff,
    Reboot,
    Panic,
    VmmError,
}

impl ExitReason {
    pub fn code(self) -> u8 {
        match self {
            ExitReason::PowerOff => STATUS_POWEROFF,
            ExitReason::Reboot => STATUS_REBOOT,
            ExitReason::Panic => STATUS_PANIC,
            ExitReason::VmmError => STATUS_VMM_ERROR,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            ExitReason::PowerOff => "guest powered off",
            ExitReason::Reboot => "guest rebooted",
            ExitReason::Panic => "guest kernel panicked",
            ExitReason::VmmError => "VMM error",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        [ExitReason::PowerOff, ExitReason::Reboot, ExitReason::Panic, ExitReason::VmmError]
            .into_iter()
            .find(|r| *r as u8 + 1 == v)
    }
}

/// Shared between all threads; the first reported reason wins.
pub struct ExitSignal {
    reason: AtomicU8,
    panic_seen: AtomicBool,
    error: Mutex<Option<String>>,
    pub event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: AtomicU8::new(0),
            panic_seen: AtomicBool::new(false),
            error: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    pub fn request(&self, reason: ExitReason) {
        if self.reason.compare_exchange(0, reason as u8 + 1, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            // A failed eventfd write can only mean the counter is saturated: already woken.
            let _ = self.event.write(1);
        }
    }

    pub fn fail(&self, message: String) {
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(message);
        }
        self.request(ExitReason::VmmError);
    }

    /// The console showed the kernel's panic banner; the guest will reboot or hang next.
    pub fn note_panic(&self) {
        if !self.panic_seen.swap(true, Ordering::SeqCst) {
            let _ = self.event.write(1);
        }
    }

    pub fn panic_seen(&self) -> bool {
        self.panic_seen.load(Ordering::SeqCst)
    }

    /// The reason to report: a reboot or triple fault after a panic banner is a panic.
    pub fn reason(&self) -> Option<ExitReason> {
        let r = ExitReason::from_u8(self.reason.load(Ordering::SeqCst))?;
        Some(if r == ExitReason::Reboot && self.panic_seen() { ExitReason::Panic } else { r })
    }

    pub fn error_message(&self) -> Option<String> {
        self.error.lock().ok().and_then(|e| e.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_the_main_thread() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.request(ExitReason::PowerOff);
        s.request(ExitReason::Reboot);
        assert_eq!(s.reason(), Some(ExitReason::PowerOff));
        assert_eq!(s.event.read().unwrap(), 1);
    }

    #[test]
    fn reboot_after_panic_banner_is_a_panic() {
        let s = ExitSignal::new().unwrap();
        s.note_panic();
        s.request(ExitReason::Reboot);
        assert_eq!(s.reason(), Some(ExitReason::Panic));
        assert_eq!(s.reason().unwrap().code(), STATUS_PANIC);
    }

    #[test]
    fn errors_keep_the_first_message() {
        let s = ExitSignal::new().unwrap();
        s.fail("first".into());
        s.fail("second".into());
        assert_eq!(s.reason(), Some(ExitReason::VmmError));
        assert_eq!(s.error_message().as_deref(), Some("first"));
    }

    #[test]
    fn status_codes_are_distinct() {
        let codes = [STATUS_POWEROFF, STATUS_VMM_ERROR, STATUS_USAGE, STATUS_REBOOT, STATUS_PANIC];
        for (i, a) in codes.iter().enumerate() {
            assert!(codes[i + 1..].iter().all(|b| a != b));
        }
    }
}

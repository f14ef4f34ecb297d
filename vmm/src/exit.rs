//! Why the VM stopped, and the process exit status that tells the caller.
//!
//! Any thread (a vCPU, a device, the console scanner) may report the first reason; the
//! main thread waits on `ExitSignal::event` and ends the process with `ExitReason::code`.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

pub use vmm_contract::ExitStatus;

/// Exit statuses of `vmm run`, as the appliance reads them (`vmm_contract::exit`).
pub const STATUS_VMM_ERROR: u8 = ExitStatus::VmmError.code();
pub const STATUS_USAGE: u8 = ExitStatus::Usage.code();

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    PowerOff,
    Reboot,
    Panic,
    VmmError,
    /// A snapshot was written on request and the VMM stops (not raised by the guest).
    Hibernated,
}

impl ExitReason {
    /// The exit status that tells the appliance this reason.
    pub fn status(self) -> ExitStatus {
        match self {
            ExitReason::PowerOff => ExitStatus::PowerOff,
            ExitReason::Reboot => ExitStatus::Reboot,
            ExitReason::Panic => ExitStatus::Panic,
            ExitReason::VmmError => ExitStatus::VmmError,
            ExitReason::Hibernated => ExitStatus::Hibernated,
        }
    }

    pub fn code(self) -> u8 {
        self.status().code()
    }

    pub fn describe(self) -> &'static str {
        self.status().describe()
    }

    fn from_u8(v: u8) -> Option<Self> {
        [ExitReason::PowerOff, ExitReason::Reboot, ExitReason::Panic, ExitReason::VmmError, ExitReason::Hibernated]
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
        assert_eq!(s.reason().unwrap().status(), ExitStatus::Panic);
    }

    #[test]
    fn errors_keep_the_first_message() {
        let s = ExitSignal::new().unwrap();
        s.fail("first".into());
        s.fail("second".into());
        assert_eq!(s.reason(), Some(ExitReason::VmmError));
        assert_eq!(s.error_message().as_deref(), Some("first"));
    }
}

//! Ending the machine: reboot(2), and the panic policy of PID 1 (print, sync, reboot; never hang).

use std::io;

/// What to do once everything is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    PowerOff,
    Reboot,
}

impl PowerAction {
    pub fn name(self) -> &'static str {
        match self {
            PowerAction::PowerOff => "power off",
            PowerAction::Reboot => "reboot",
        }
    }
}

/// Performs the action. Only returns if the kernel refused (then the error says why).
pub fn execute(action: PowerAction) -> io::Error {
    let cmd = match action {
        PowerAction::PowerOff => libc::RB_POWER_OFF,
        PowerAction::Reboot => libc::RB_AUTOBOOT,
    };
    // SAFETY: reboot(2) with a valid command constant; it has no memory arguments.
    unsafe { libc::reboot(cmd) };
    io::Error::last_os_error()
}

/// Makes Ctrl-Alt-Del send SIGINT to PID 1 instead of an immediate hard reboot, so that the
/// keyboard combination (or QEMU's `sendkey ctrl-alt-delete`) triggers a clean reboot.
pub fn route_ctrl_alt_del_to_init() -> io::Result<()> {
    // SAFETY: reboot(2) with RB_DISABLE_CAD only flips a kernel flag.
    let ret = unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
    super::check(ret, || "reboot(RB_DISABLE_CAD)".into()).map(|_| ())
}

/// Installs a panic hook that prints the panic on the console, syncs and reboots. PID 1 must
/// never sit in a panic: the kernel would panic in turn, or the machine would hang.
pub fn reboot_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        crate::sys::console::line("init", &format!("PANIC: {info}; rebooting"));
        if std::process::id() == 1 {
            super::fs::sync_all();
            let err = execute(PowerAction::Reboot);
            crate::sys::console::line("init", &format!("reboot after panic failed: {err}"));
        }
    }));
}

/// Last resort when PID 1 has nothing left to do and reboot(2) failed: sleep forever rather
/// than exit (an exiting PID 1 panics the kernel).
pub fn halt_forever() -> ! {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

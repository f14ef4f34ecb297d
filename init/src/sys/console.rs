//! Console logging with a boot-relative timestamp, the one log every operator can see.

use std::io::Write;

/// Seconds since boot (CLOCK_BOOTTIME), the clock the kernel's own console lines use.
pub fn uptime() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes into it.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
    if ret != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Writes one line `[  12.345] <source>: <message>` to stderr (the console for PID 1).
/// Failures to write are ignored: there is nowhere else to report them.
pub fn line(source: &str, message: &str) {
    let text = format!("[{:>9.3}] {source}: {message}\n", uptime());
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

/// `log!("fmt", args)`: a console line from init itself.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::sys::console::line("init", &format!($($arg)*)) };
}

//! Small filesystem helpers: reading kernel-provided text files and syncing.

use std::fs;
use std::io;
use std::path::Path;

/// Reads a small text file (procfs, sysfs), trimming the trailing newline.
pub fn read_trimmed(path: impl AsRef<Path>) -> io::Result<String> {
    let path = path.as_ref();
    fs::read_to_string(path)
        .map(|s| s.trim_end().to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("read {}: {e}", path.display())))
}

/// Flushes every filesystem's dirty data to its device.
pub fn sync_all() {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// The kernel command line, empty if /proc is not mounted.
pub fn kernel_cmdline() -> String {
    read_trimmed("/proc/cmdline").unwrap_or_default()
}

/// The value of `key=value` on a command line (last one wins, like the kernel's own parsing).
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_value_takes_the_last_exact_key() {
        let cmdline = "console=ttyS0 oc.data=/dev/vda oc.data_x=1 oc.data=/dev/vdb quiet";
        assert_eq!(cmdline_value(cmdline, "oc.data"), Some("/dev/vdb"));
        assert_eq!(cmdline_value(cmdline, "console"), Some("ttyS0"));
        assert_eq!(cmdline_value(cmdline, "quiet"), None);
        assert_eq!(cmdline_value(cmdline, "oc.dat"), None);
    }
}

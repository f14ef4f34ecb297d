//! Keeps each sandbox's console log (written by its VMM, on the data disk) to a few MiB: a
//! guest that prints without end would otherwise fill the disk the store lives on. The VMM
//! appends; here the oldest part is cut out from the front, so the log keeps the latest output
//! (what explains a failure) and the VMM's jail needs no new system calls.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

/// A log larger than this is cut back to about `KEEP_BYTES`.
pub const MAX_LOG_BYTES: u64 = 4 << 20;
pub const KEEP_BYTES: u64 = 2 << 20;
/// A guest's serial port writes a few MiB/s at most (every byte is a VM exit), so a log
/// overshoots its cap by a few MiB between checks at worst.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What `trim` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Trimmed {
    Untouched,
    /// The oldest bytes were cut out (the file system supports it); the rest stays in order.
    CutFront(u64),
    /// The file system cannot cut a file's front: the log was emptied instead.
    Emptied(u64),
}

/// Cuts `path` back to its last `keep` bytes (rounded to the file system's block size) once it
/// is larger than `max`. Safe while the VMM appends: the kernel serializes both on the inode,
/// and an O_APPEND writer writes at the new end.
pub fn trim(path: &Path, max: u64, keep: u64) -> io::Result<Trimmed> {
    let file = File::options().write(true).open(path)?;
    let meta = file.metadata()?;
    let size = meta.len();
    if size <= max {
        return Ok(Trimmed::Untouched);
    }
    let block = meta.blksize().max(1);
    let cut = size.saturating_sub(keep) / block * block;
    if cut == 0 {
        return Ok(Trimmed::Untouched);
    }
    let len = libc::off_t::try_from(cut).map_err(|_| io::Error::other("log too large"))?;
    // SAFETY: the fd is open for writing for the duration of the call; COLLAPSE_RANGE only
    // changes this file's contents, and the range lies inside the file (cut < size).
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_COLLAPSE_RANGE, 0, len) };
    if rc == 0 {
        return Ok(Trimmed::CutFront(cut));
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EINVAL) => {
            file.set_len(0)?;
            Ok(Trimmed::Emptied(size))
        }
        _ => Err(error),
    }
}

/// Checks every sandbox directory's console log, for the life of the process.
pub fn spawn(sandboxes_dir: &Path, log_name: &'static str) -> io::Result<()> {
    let dir = sandboxes_dir.to_path_buf();
    std::thread::Builder::new().name("console-trim".into()).spawn(move || loop {
        std::thread::sleep(CHECK_EVERY);
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path().join(log_name);
            match trim(&path, MAX_LOG_BYTES, KEEP_BYTES) {
                Ok(Trimmed::Untouched) => {}
                Ok(Trimmed::CutFront(bytes)) => {
                    println!(
                        "appliance: {}: cut the oldest {} KiB of its console log",
                        entry.path().display(),
                        bytes >> 10
                    );
                }
                Ok(Trimmed::Emptied(bytes)) => {
                    println!("appliance: {}: console log emptied at {} KiB", entry.path().display(), bytes >> 10);
                }
                // A sandbox that just ended takes its log with it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("appliance: cannot trim {}: {e}", path.display()),
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("console-trim-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn a_log_over_the_cap_keeps_its_latest_bytes_in_order() {
        let dir = temp("cut");
        let path = dir.join("console.log");
        let mut log = File::options().create(true).append(true).open(&path).expect("open");
        // Numbered lines, so what is kept can be checked for order and recency.
        for i in 0..200_000u32 {
            writeln!(log, "line {i:08}").expect("write");
        }
        let size = fs::metadata(&path).expect("meta").len();
        let outcome = trim(&path, 1 << 20, 256 << 10).expect("trim");
        let after = fs::read(&path).expect("read");
        match outcome {
            Trimmed::CutFront(cut) => {
                assert_eq!(after.len() as u64, size - cut);
                assert!(after.len() as u64 >= 256 << 10 && (after.len() as u64) < (256 << 10) + 65536);
                assert!(after.ends_with(b"line 00199999\n"));
                // Still appendable at the end, by the writer that was open all along.
                writeln!(log, "after").expect("write");
                assert!(fs::read(&path).expect("read").ends_with(b"line 00199999\nafter\n"));
            }
            // tmpfs and some others cannot collapse a range: the log is emptied and still usable.
            Trimmed::Emptied(_) => {
                assert!(after.is_empty());
                writeln!(log, "after").expect("write");
                assert_eq!(fs::read(&path).expect("read"), b"after\n");
            }
            Trimmed::Untouched => panic!("a {size}-byte log was not trimmed"),
        }
        assert_eq!(trim(&path, 1 << 20, 256 << 10).expect("trim"), Trimmed::Untouched);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_log_is_not_found() {
        let dir = temp("missing");
        let err = trim(&dir.join("console.log"), 1, 1).expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let _ = fs::remove_dir_all(&dir);
    }
}

//! A sandbox's guest console as the API shows it (`GET /api/sandboxes/{id}/logs`): the tail of the
//! log its VMM writes while it runs and, when it ends, that tail kept in `consoles/<id>.log` on
//! the data disk until its record is forgotten. Only what the guest wrote to its serial port is
//! in either file; the VMM's own messages go to `vmm.log`, never here.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How much of an ended sandbox's console is kept, and the most the API answers with.
pub const KEEP_BYTES: u64 = 256 << 10;

/// The last `max` bytes of the file at `path` (fewer when it is shorter), starting after the
/// first line break when the cut fell inside a line. A missing file is empty.
pub fn read_tail(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start))?;
    // `take` bounds the read even if the VMM appends meanwhile.
    let mut out = Vec::with_capacity(usize::try_from(len - start).unwrap_or(0));
    file.take(max).read_to_end(&mut out)?;
    if start > 0 {
        if let Some(i) = out.iter().position(|&b| b == b'\n') {
            out.drain(..=i);
        }
    }
    Ok(out)
}

/// Where the console of ended sandbox `id` is kept. Ids are UUIDs (the API checks them); any
/// other name is refused, so an id can never name a path outside `dir`.
pub fn kept_path(dir: &Path, id: &str) -> Option<PathBuf> {
    let safe = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    safe.then(|| dir.join(format!("{id}.log")))
}

/// Keeps the tail of a sandbox's console log before its directory is removed.
pub fn keep(log: &Path, dir: &Path, id: &str) -> io::Result<()> {
    let Some(target) = kept_path(dir, id) else { return Ok(()) };
    let tail = read_tail(log, KEEP_BYTES)?;
    fs::create_dir_all(dir)?;
    fs::write(target, tail)
}

/// Drops the kept console of a forgotten sandbox (nothing kept is not an error).
pub fn forget(dir: &Path, id: &str) -> io::Result<()> {
    let Some(target) = kept_path(dir, id) else { return Ok(()) };
    match fs::remove_file(target) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("console-keep-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn the_tail_is_bounded_and_starts_at_a_line() {
        let dir = temp("tail");
        let log = dir.join("console.log");
        let text: String = (0..1000).map(|i| format!("line {i:04}\n")).collect();
        fs::write(&log, &text).expect("write");
        let tail = read_tail(&log, 100).expect("tail");
        assert!(tail.len() <= 100);
        assert!(tail.starts_with(b"line "), "{}", String::from_utf8_lossy(&tail));
        assert!(tail.ends_with(b"line 0999\n"));
        assert_eq!(read_tail(&log, 1 << 20).expect("all"), text.as_bytes());
        assert!(read_tail(&dir.join("missing"), 10).expect("missing").is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn kept_consoles_outlive_the_log_until_forgotten() {
        let dir = temp("keep");
        let log = dir.join("console.log");
        fs::write(&log, b"booted\n").expect("write");
        let kept = dir.join("consoles");
        let id = "0123abcd-0000-4000-8000-000000000000";
        keep(&log, &kept, id).expect("keep");
        fs::remove_file(&log).expect("rm");
        assert_eq!(read_tail(&kept.join(format!("{id}.log")), KEEP_BYTES).expect("kept"), b"booted\n");
        forget(&kept, id).expect("forget");
        forget(&kept, id).expect("forget twice");
        assert!(!kept.join(format!("{id}.log")).exists());
        assert_eq!(kept_path(&kept, "../etc/passwd"), None);
        let _ = fs::remove_dir_all(&dir);
    }
}

//! A writer for the "newc" cpio format the kernel unpacks as its initramfs. Entries carry
//! fixed ownership and timestamps so the same inputs give the same bytes.

use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

pub struct CpioWriter<W: Write> {
    out: W,
    next_inode: u32,
    written: u64,
}

/// What an entry is.
pub enum Kind<'a> {
    Directory,
    File(&'a [u8]),
    Symlink(&'a str),
    CharDevice { major: u32, minor: u32 },
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter { out, next_inode: 1, written: 0 }
    }

    /// Appends one entry. `path` is relative to the archive root, without a leading '/'.
    pub fn add(&mut self, path: &str, permissions: u32, kind: Kind) -> io::Result<()> {
        if path.is_empty() || path.starts_with('/') || path.contains('\0') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad cpio path {path:?}")));
        }
        let (type_bits, data, rdev) = match kind {
            Kind::Directory => (0o040_000, &[][..], (0, 0)),
            Kind::File(bytes) => (0o100_000, bytes, (0, 0)),
            Kind::Symlink(target) => (0o120_000, target.as_bytes(), (0, 0)),
            Kind::CharDevice { major, minor } => (0o020_000, &[][..], (major, minor)),
        };
        let nlink = if type_bits == 0o040_000 { 2 } else { 1 };
        let inode = self.next_inode;
        self.next_inode += 1;
        self.header(inode, type_bits | (permissions & 0o7777), nlink, data.len(), rdev, path)?;
        self.write_padded(data)
    }

    /// Writes the trailer and returns the sink and the archive size.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.header(0, 0, 1, 0, (0, 0), TRAILER)?;
        // Pad to 512 bytes like cpio(1) does; the kernel does not require it.
        let pad = (512 - (self.written % 512)) % 512;
        self.emit(&vec![0u8; pad as usize])?;
        Ok((self.out, self.written))
    }

    fn header(
        &mut self,
        inode: u32,
        mode: u32,
        nlink: u32,
        size: usize,
        rdev: (u32, u32),
        name: &str,
    ) -> io::Result<()> {
        let size = u32::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is larger than 4 GiB")))?;
        let fields = [inode, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        let mut header = String::with_capacity(110);
        header.push_str(MAGIC);
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.emit(header.as_bytes())?;
        let mut name_bytes = name.as_bytes().to_vec();
        name_bytes.push(0);
        self.write_padded(&name_bytes)
    }

    fn write_padded(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.emit(bytes)?;
        let pad = (4 - (self.written % 4)) % 4;
        self.emit(&[0u8; 3][..pad as usize])
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_readable_by_cpio_tool_layout() {
        let mut w = CpioWriter::new(Vec::new());
        w.add("dev", 0o755, Kind::Directory).expect("dir");
        w.add("dev/console", 0o600, Kind::CharDevice { major: 5, minor: 1 }).expect("dev");
        w.add("init", 0o755, Kind::File(b"hello")).expect("file");
        w.add("sbin", 0o777, Kind::Symlink("bin")).expect("link");
        let (bytes, size) = w.finish().expect("finish");
        assert_eq!(bytes.len() as u64, size);
        assert_eq!(size % 512, 0);
        assert!(bytes.starts_with(b"070701"));
        // Second header begins on a 4-byte boundary right after "dev\0" padded.
        let second = 110 + 4; // 110 header + "dev\0" (4 bytes, already aligned: 114 % 4 == 2 -> pad 2)
        let second = second + (4 - second % 4) % 4;
        assert_eq!(&bytes[second..second + 6], b"070701");
        // The char device carries its major/minor in rdevmajor/rdevminor.
        let header = std::str::from_utf8(&bytes[second..second + 110]).expect("ascii");
        assert_eq!(&header[6 + 9 * 8..6 + 10 * 8], "00000005");
        assert_eq!(&header[6 + 10 * 8..6 + 11 * 8], "00000001");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("TRAILER!!!"));
        assert!(text.contains("hello"));
    }

    #[test]
    fn same_entries_give_same_bytes_and_bad_paths_fail() {
        let build = || {
            let mut w = CpioWriter::new(Vec::new());
            w.add("a", 0o644, Kind::File(b"x")).expect("add");
            w.finish().expect("finish").0
        };
        assert_eq!(build(), build());
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.add("/abs", 0o644, Kind::File(b"")).is_err());
        assert!(w.add("", 0o644, Kind::File(b"")).is_err());
    }

    #[test]
    fn cpio_tool_extracts_what_we_write() {
        if !std::path::Path::new("/usr/bin/cpio").exists() {
            eprintln!("cpio(1) not installed; layout checked by the other tests");
            return;
        }
        let mut w = CpioWriter::new(Vec::new());
        w.add("d", 0o755, Kind::Directory).expect("dir");
        w.add("d/f", 0o640, Kind::File(b"content\n")).expect("file");
        w.add("l", 0o777, Kind::Symlink("d/f")).expect("link");
        let (bytes, _) = w.finish().expect("finish");
        let dir = std::env::temp_dir().join(format!("cpio-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let mut child = std::process::Command::new("cpio")
            .args(["-id", "--quiet"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cpio");
        child.stdin.take().expect("stdin").write_all(&bytes).expect("write");
        assert!(child.wait().expect("wait").success());
        assert_eq!(std::fs::read(dir.join("d/f")).expect("read"), b"content\n");
        assert_eq!(std::fs::read_link(dir.join("l")).expect("link").to_str(), Some("d/f"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}

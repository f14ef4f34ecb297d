//! The sandbox initramfs: our sandbox PID 1 and nothing else, so that the init and agent every
//! sandbox runs are the appliance's own, whatever its root disk holds. The guest kernel unpacks
//! it and runs `/oc-init` (`rdinit=`); init mounts the root disk on `/newroot`, moves it over `/`
//! and carries on there (init/src/sandbox/switch_root.rs). A template (or an imported archive)
//! needs no init of its own, and none it brings is ever run as PID 1 or as the agent.
//!
//! An uncompressed newc archive: the guest kernel unpacks it as it is, where a compressed one
//! (gzip is what the guest kernel reads) is inflated on every boot. Measured with this guest
//! kernel under TCG (QEMU microvm, not nested, 2026-12-05), three boots each: unpacking the 2.0 MiB
//! archive took 13-26 ms, the 0.9 MiB `gzip -9` one 67-80 ms; the VMM reads the larger file from
//! the page cache at host speed. Building it takes milliseconds, so it is written with every
//! build rather than cached.

use crate::error::Result;
use crate::initramfs::Tree;
use std::path::Path;

/// Where the sandbox PID 1 lives in the archive (the guest command line's `rdinit=`).
pub const INIT_PATH: &str = "/oc-init";
/// Where init mounts the root disk before moving it over `/`.
pub const NEW_ROOT: &str = "/newroot";

/// The archive's tree: `/oc-init` (the `init` binary at `init`), `/dev/console` (the kernel
/// opens it for PID 1 before anything is mounted), and the mount points init uses before the
/// switch (`/dev`, `/proc`, `/newroot`).
pub fn tree(init: &Path) -> Result<Tree> {
    let mut tree = Tree::new();
    for dir in ["/dev", "/proc", NEW_ROOT] {
        tree.dir(dir)?;
    }
    tree.char_device("/dev/console", 5, 1, 0o600)?;
    tree.host_file(INIT_PATH, init, 0o755)?;
    Ok(tree)
}

/// Writes the archive for the `init` binary to `out`; returns its size.
pub fn write(init: &Path, out: &Path) -> Result<u64> {
    tree(init)?.write_uncompressed(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (path, mode, file size) of every entry of a newc archive, up to the trailer.
    fn entries(archive: &[u8]) -> Vec<(String, u32, usize)> {
        let field = |at: usize, i: usize| {
            let hex = std::str::from_utf8(&archive[at + 6 + i * 8..at + 14 + i * 8]).expect("ascii header");
            usize::from_str_radix(hex, 16).expect("hex field")
        };
        let align = |n: usize| n.div_ceil(4) * 4;
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(&archive[at..at + 6], b"070701", "newc magic at {at}");
            let (mode, size, name_len) = (field(at, 1), field(at, 6), field(at, 11));
            // uid, gid and mtime are fixed: the same inputs give the same bytes.
            assert_eq!((field(at, 2), field(at, 3), field(at, 5)), (0, 0, 0), "owner and time at {at}");
            let name = String::from_utf8(archive[at + 110..at + 110 + name_len - 1].to_vec()).expect("name");
            if name == "TRAILER!!!" {
                return out;
            }
            at = align(at + 110 + name_len);
            out.push((name, mode as u32, size));
            at = align(at + size);
        }
    }

    #[test]
    fn the_archive_holds_only_the_init_and_its_mount_points_reproducibly() {
        let dir = std::env::temp_dir().join(format!("image-sandbox-initrd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let init = dir.join("init");
        std::fs::write(&init, b"\x7fELF pretend init").expect("init");
        let (a, b) = (dir.join("a.cpio"), dir.join("b.cpio"));
        let size = write(&init, &a).expect("write");
        write(&init, &b).expect("write again");
        let archive = std::fs::read(&a).expect("read");
        assert_eq!(archive.len() as u64, size);
        assert_eq!(archive, std::fs::read(&b).expect("read"), "the same init gives the same bytes");
        assert!(archive.starts_with(b"070701"), "uncompressed newc: the kernel copies it as it is");
        assert_eq!(
            entries(&archive),
            vec![
                ("dev".to_string(), 0o040_755, 0),
                ("dev/console".to_string(), 0o020_600, 0),
                ("newroot".to_string(), 0o040_755, 0),
                ("oc-init".to_string(), 0o100_755, 17),
                ("proc".to_string(), 0o040_755, 0),
            ]
        );
        assert_eq!(INIT_PATH.trim_start_matches('/'), "oc-init");
        assert_eq!(NEW_ROOT, "/newroot", "init/src/sandbox/switch_root.rs mounts the root disk there");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cpio_tool_unpacks_it_as_the_kernel_would() {
        if !std::path::Path::new("/usr/bin/cpio").exists() {
            eprintln!("cpio(1) not installed; the layout is checked by the other test");
            return;
        }
        let dir = std::env::temp_dir().join(format!("image-sandbox-initrd-cpio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("out")).expect("mkdir");
        std::fs::write(dir.join("init"), b"init bytes").expect("init");
        write(&dir.join("init"), &dir.join("initrd.cpio")).expect("write");
        let listed = std::process::Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(dir.join("initrd.cpio"))
            .output()
            .expect("cpio -t");
        assert!(listed.status.success());
        assert_eq!(String::from_utf8_lossy(&listed.stdout), "dev\ndev/console\nnewroot\noc-init\nproc\n");
        let unpacked = std::process::Command::new("cpio")
            .args(["-id", "--quiet", "--no-absolute-filenames", "-F"])
            .arg(dir.join("initrd.cpio"))
            .current_dir(dir.join("out"))
            .status()
            .expect("cpio -i");
        // Making /dev/console needs root; the file itself must come out either way.
        let _ = unpacked;
        assert_eq!(std::fs::read(dir.join("out/oc-init")).expect("oc-init"), b"init bytes");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

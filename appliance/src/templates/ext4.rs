//! An unpacked root filesystem becomes a template disk: the files a sandbox gets whatever the
//! image brought, then `mke2fs -d` (e2fsprogs, carried in the appliance's image) makes a sparse
//! ext4 file of it.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;
/// Free room a new template's file system has beyond its content (the disk is sparse: room costs
/// nothing until written; a create's `diskMB` gives more).
const ROOM: u64 = 1 << 30;
/// Per entry, beyond its bytes: its inode, its directory entry, a partly used last block.
const PER_ENTRY: u64 = 4096;
/// Where mke2fs is looked for: the appliance carries it in /sbin; a development host may keep it
/// in /usr/sbin.
const MKE2FS: &[&str] = &["/sbin/mke2fs", "/usr/sbin/mke2fs"];

/// What a sandbox's name resolution needs, as in the templates the image ships: names are
/// resolved by the appliance's proxy, the hostname comes from the kernel command line, and
/// `localhost` must resolve without a DNS server.
const SANDBOX_FILES: &[(&str, &str)] = &[
    ("resolv.conf", "# Names are resolved by the appliance's proxy (HTTPS_PROXY), not here.\n"),
    ("hostname", "sandbox\n"),
    ("hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
];

/// Writes `SANDBOX_FILES` into `root/etc`, replacing what the image had there. A root whose
/// `etc` is not a directory (a symlink, which must never be followed here) keeps what it has.
pub fn add_sandbox_files(root: &Path) -> std::io::Result<()> {
    let etc = root.join("etc");
    match fs::symlink_metadata(&etc) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => fs::create_dir(&etc)?,
        Err(e) => return Err(e),
    }
    for (name, content) in SANDBOX_FILES {
        let path = etc.join(name);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => fs::remove_file(&path)?,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // create_new: a file that appeared in between is not followed or overwritten.
        let mut file = fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        std::io::Write::write_all(&mut file, content.as_bytes())?;
    }
    Ok(())
}

/// The disk length for `content_bytes` in `entries` entries: the content with a quarter more for
/// the file system's own blocks, plus `ROOM`, in whole MiB.
pub fn disk_bytes(content_bytes: u64, entries: u64) -> u64 {
    let needed = content_bytes.saturating_add(entries.saturating_mul(PER_ENTRY));
    let total = needed.saturating_add(needed / 4).saturating_add(ROOM);
    total.div_ceil(MIB) * MIB
}

/// Makes `disk` an ext4 file system holding the tree `root` (ownership, modes, links and
/// extended attributes as they are there); returns the disk's length.
pub fn make_disk(root: &Path, disk: &Path, label: &str, content_bytes: u64, entries: u64) -> Result<u64, String> {
    let bytes = disk_bytes(content_bytes, entries);
    let program = MKE2FS.iter().find(|p| Path::new(p).is_file()).copied().unwrap_or("mke2fs");
    // One inode per entry and as many again spare (mke2fs's default ratio may give fewer for a
    // tree of many small files).
    let inodes = entries.saturating_mul(2).max(65_536);
    // The label is at most 16 bytes in ext4's superblock.
    let label: String = label.chars().take(16).collect();
    let output = Command::new(program)
        .args(["-q", "-F", "-t", "ext4", "-L", &label, "-N", &inodes.to_string(), "-E", "root_owner=0:0", "-d"])
        .arg(root)
        .arg(disk)
        .arg(format!("{}k", bytes / 1024))
        .stdin(Stdio::null())
        // `mke2fs -d` names every file it copies even with -q; only its errors are kept.
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(format!(
            "{program} failed ({}): {}",
            output.status,
            last.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    // mke2fs may leave out a last block group too small to hold its own metadata.
    fs::metadata(disk).map(|m| m.len()).map_err(|e| format!("cannot read {}: {e}", disk.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("appliance-template-ext4-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn the_disk_is_the_content_with_room_in_whole_mib() {
        assert_eq!(disk_bytes(0, 0), ROOM);
        let bytes = disk_bytes(100 * MIB, 1000);
        assert_eq!(bytes % MIB, 0);
        assert!((125 * MIB + ROOM..131 * MIB + ROOM).contains(&bytes), "{bytes}");
    }

    #[test]
    fn sandbox_files_replace_the_images_and_never_follow_a_symlink() {
        let dir = temp_dir("files");
        let (root, outside) = (dir.join("root"), dir.join("outside"));
        fs::create_dir_all(root.join("etc")).expect("etc");
        fs::create_dir_all(&outside).expect("outside");
        fs::write(outside.join("hosts"), b"host's own\n").expect("hosts");
        std::os::unix::fs::symlink(outside.join("hosts"), root.join("etc/hosts")).expect("symlink");
        fs::write(root.join("etc/hostname"), b"image\n").expect("hostname");
        add_sandbox_files(&root).expect("files");
        assert_eq!(fs::read(outside.join("hosts")).expect("read"), b"host's own\n", "the symlink was not followed");
        assert!(fs::read_to_string(root.join("etc/hosts")).expect("hosts").starts_with("127.0.0.1\tlocalhost"));
        assert_eq!(fs::read(root.join("etc/hostname")).expect("read"), b"sandbox\n");
        assert!(root.join("etc/resolv.conf").is_file());

        // An `etc` that is a symlink is left alone (and the outside with it).
        let other = dir.join("other");
        fs::create_dir_all(&other).expect("other");
        std::os::unix::fs::symlink(&outside, other.join("etc")).expect("symlink");
        add_sandbox_files(&other).expect("files");
        assert!(!outside.join("resolv.conf").exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_tree_becomes_an_ext4_disk_with_its_files() {
        if !MKE2FS.iter().any(|p| Path::new(p).is_file()) {
            println!("skipped: no mke2fs on this host");
            return;
        }
        let dir = temp_dir("mkfs");
        let root = dir.join("root");
        fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        fs::write(root.join("usr/bin/hello"), b"#!/bin/sh\necho hello\n").expect("write");
        let disk = dir.join("disk.ext4");
        let bytes = make_disk(&root, &disk, "a-long-template-name-for-a-label", 30, 2).expect("mkfs");
        assert_eq!(fs::metadata(&disk).expect("meta").len(), bytes);
        assert!((ROOM..=disk_bytes(30, 2)).contains(&bytes), "{bytes}");
        let out = Command::new("debugfs").arg("-R").arg("cat /usr/bin/hello").arg(&disk).output().expect("debugfs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "#!/bin/sh\necho hello\n");
        let _ = fs::remove_dir_all(&dir);
    }
}

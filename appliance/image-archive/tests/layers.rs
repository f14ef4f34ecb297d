//! What the unpacked tree holds: metadata, links, FIFOs, xattrs, and how layers stack
//! (whiteouts, opaque directories, replacement).

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use common::{lgetxattr, oci, Scratch, Tar, MTIME};

fn mode(meta: &fs::Metadata) -> u32 {
    meta.permissions().mode() & 0o7777
}

/// The owner an entry should end up with: its own as root, ours otherwise (chown's EPERM is
/// then ignored), so the suite also passes unprivileged.
fn owner(uid: u32, gid: u32) -> (u32, u32) {
    // SAFETY: geteuid/getegid have no preconditions and cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid == 0 {
        (uid, gid)
    } else {
        (euid, egid)
    }
}

#[test]
fn owners_modes_and_times_are_exact_including_setuid_setgid_and_sticky() {
    let s = Scratch::new("meta");
    let archive = Tar::new()
        .dir_with("./", 0o755, (0, 0), 1_000_000_000)
        .dir_with("usr/bin", 0o755, (0, 0), 1_200_000_000)
        .file_with("usr/bin/su", b"su", 0o4755, (0, 0), MTIME)
        .file_with("usr/bin/wall", b"wall", 0o2755, (0, 5), MTIME)
        .dir_with("tmp", 0o1777, (0, 0), 1_300_000_000)
        .file_with("home/me/notes", b"mine", 0o640, (1234, 5678), 1_234_567_890)
        // A directory closed to everyone, with content written after its entry.
        .dir_with("secret", 0o000, (1000, 1000), 1_111_111_111)
        .file("secret/inside", b"x")
        .pax(&[("mtime", b"1500000000.25")])
        .file("precise", b"p")
        .bytes();
    let unpacked = s.rootfs(&archive).expect("unpack");
    assert_eq!(unpacked.kind, image_archive::ArchiveKind::Rootfs);
    assert_eq!(unpacked.unpacked_bytes, 2 + 4 + 4 + 1 + 1);
    let meta = |rel: &str| fs::symlink_metadata(s.path(rel)).expect(rel);
    assert_eq!(mode(&meta("usr/bin/su")), 0o4755);
    assert_eq!(mode(&meta("usr/bin/wall")), 0o2755);
    assert_eq!(meta("usr/bin/wall").gid(), owner(0, 5).1);
    assert_eq!(mode(&meta("tmp")), 0o1777);
    let notes = meta("home/me/notes");
    assert_eq!(((notes.uid(), notes.gid()), mode(&notes)), (owner(1234, 5678), 0o640));
    assert_eq!(notes.mtime(), 1_234_567_890);
    // home and home/me were not listed: made 0755.
    assert_eq!(mode(&meta("home/me")), 0o755);
    let secret = meta("secret");
    assert_eq!(((secret.uid(), secret.gid()), mode(&secret)), (owner(1000, 1000), 0));
    assert_eq!(secret.mtime(), 1_111_111_111, "directory times are set after their content");
    assert_eq!(meta("usr/bin").mtime(), 1_200_000_000);
    assert_eq!(meta("tmp").mtime(), 1_300_000_000);
    // Reopened so the test can look inside (and, unprivileged, clean up).
    fs::set_permissions(s.path("secret"), fs::Permissions::from_mode(0o700)).expect("chmod");
    assert_eq!(meta("secret/inside").len(), 1);
    let precise = meta("precise");
    assert_eq!((precise.mtime(), precise.mtime_nsec()), (1_500_000_000, 250_000_000));
    // The root directory entry applies to the root itself.
    assert_eq!(fs::metadata(&s.root).expect("root").mtime(), 1_000_000_000);
    assert_eq!(unpacked.entries, 9 + 3, "entries plus the parents made for usr/bin and home/me/notes");
    s.assert_contained();
}

#[test]
fn symlinks_hard_links_and_fifos_are_recreated() {
    let s = Scratch::new("links");
    let lower = Tar::new().file("etc/os-release", b"ID=test").bytes();
    let upper = Tar::new()
        .dir("usr/lib", 0o755)
        .symlink("usr/lib/os-release", "../../etc/os-release")
        .symlink("usr/passwd", "/etc/passwd")
        .file_with("bin/busybox", b"busybox", 0o755, (0, 0), MTIME)
        .hardlink("bin/sh", "bin/busybox")
        // A link to a file from the layer below.
        .hardlink("usr/os-release.hard", "etc/os-release")
        .fifo("run/initctl", 0o600)
        .bytes();
    s.image(&oci(&[lower, upper])).expect("unpack");
    assert_eq!(fs::read_link(s.path("usr/lib/os-release")).expect("link").to_str(), Some("../../etc/os-release"));
    assert_eq!(fs::read(s.path("usr/lib/os-release")).expect("through the link"), b"ID=test");
    assert_eq!(fs::read_link(s.path("usr/passwd")).expect("link").to_str(), Some("/etc/passwd"));
    let link = fs::symlink_metadata(s.path("usr/passwd")).expect("lstat");
    assert_eq!(link.mtime(), MTIME as i64, "a symlink's own time is set");
    let (busybox, sh) = (fs::metadata(s.path("bin/busybox")).expect("a"), fs::metadata(s.path("bin/sh")).expect("b"));
    assert_eq!((busybox.ino(), busybox.nlink()), (sh.ino(), 2));
    let lower_file = fs::metadata(s.path("etc/os-release")).expect("lower");
    assert_eq!(lower_file.ino(), fs::metadata(s.path("usr/os-release.hard")).expect("link").ino());
    let fifo = fs::symlink_metadata(s.path("run/initctl")).expect("fifo");
    assert!(fifo.file_type().is_fifo());
    assert_eq!(mode(&fifo), 0o600);
    s.assert_contained();
}

#[test]
fn user_xattrs_are_set_and_refused_ones_are_counted() {
    let s = Scratch::new("xattr");
    let archive = Tar::new()
        .pax(&[("SCHILY.xattr.user.dir", b"d")])
        .dir("data", 0o755)
        .pax(&[("SCHILY.xattr.user.mime", b"text/plain"), ("SCHILY.xattr.user.bin", b"\x00\xff")])
        .file("data/file", b"content")
        // Linux takes no user.* attribute on a symlink: skipped and counted.
        .pax(&[("SCHILY.xattr.user.link", b"x")])
        .symlink("data/link", "file")
        .bytes();
    let unpacked = s.rootfs(&archive).expect("unpack");
    assert_eq!(lgetxattr(&s.path("data/file"), "user.mime").as_deref(), Some(&b"text/plain"[..]));
    assert_eq!(lgetxattr(&s.path("data/file"), "user.bin").as_deref(), Some(&b"\x00\xff"[..]));
    assert_eq!(lgetxattr(&s.path("data"), "user.dir").as_deref(), Some(&b"d"[..]));
    assert_eq!(lgetxattr(&s.path("data/link"), "user.link"), None);
    assert_eq!(unpacked.skipped_xattrs, 1);
    s.assert_contained();
}

#[test]
fn whiteouts_delete_from_lower_layers_only() {
    let s = Scratch::new("whiteout");
    let lower = Tar::new()
        .file("etc/a", b"a")
        .file("etc/b", b"b")
        .file("data/x", b"x")
        .file("data/sub/y", b"y")
        .file("keep", b"k")
        .symlink("link", "/nowhere")
        .bytes();
    let upper = Tar::new()
        .file("etc/.wh.a", b"")
        .file(".wh.data", b"")
        .file(".wh.link", b"")
        .file(".wh.missing", b"")
        .file("nothere/.wh.x", b"")
        // Written by this layer before its own whiteout: the whiteout only covers lower layers.
        .file("fresh", b"f")
        .file(".wh.fresh", b"")
        .bytes();
    s.image(&oci(&[lower, upper])).expect("unpack");
    assert!(!s.path("etc/a").exists());
    assert_eq!(fs::read(s.path("etc/b")).expect("b"), b"b");
    assert!(!s.path("data").exists(), "a whole directory is whited out");
    assert!(fs::symlink_metadata(s.path("link")).is_err(), "the symlink itself is removed");
    assert_eq!(fs::read(s.path("keep")).expect("keep"), b"k");
    assert_eq!(fs::read(s.path("fresh")).expect("fresh"), b"f");
    assert!(!s.path("nothere").exists(), "a whiteout does not make its directory");
    assert!(!s.path("etc/.wh.a").exists() && !s.path(".wh.data").exists(), "whiteouts are not files");
    s.assert_contained();
}

#[test]
fn an_opaque_directory_keeps_what_its_own_layer_adds_before_and_after_the_marker() {
    let s = Scratch::new("opaque");
    let lower = Tar::new()
        .file("d/old", b"old")
        .file("d/olddir/f", b"f")
        .file("d/same", b"lower")
        .file("d/sub/lower", b"l")
        .file("outside", b"o")
        .bytes();
    let upper = Tar::new()
        .dir("d", 0o750)
        .file("d/before", b"before")
        .file("d/same", b"upper")
        .file("d/sub/deep", b"deep")
        .file("d/.wh..wh..opq", b"")
        .file("d/after", b"after")
        .file("e/.wh..wh..opq", b"")
        .bytes();
    s.image(&oci(&[lower, upper])).expect("unpack");
    let mut names: Vec<String> =
        fs::read_dir(s.path("d")).expect("d").map(|e| e.expect("e").file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(names, ["after", "before", "same", "sub"]);
    assert_eq!(fs::read(s.path("d/same")).expect("same"), b"upper");
    assert!(s.path("d/sub/deep").exists() && !s.path("d/sub/lower").exists());
    assert_eq!(fs::read(s.path("outside")).expect("outside"), b"o");
    assert_eq!(mode(&fs::metadata(s.path("d")).expect("d")), 0o750);
    assert!(s.path("e").is_dir(), "an opaque directory is part of its layer");
    assert!(!s.path("d/.wh..wh..opq").exists());
    s.assert_contained();
}

#[test]
fn later_entries_replace_earlier_ones() {
    let s = Scratch::new("replace");
    let lower = Tar::new()
        .file("x/child", b"c")
        .file("y", b"file")
        .file_with("z/c", b"kept", 0o644, (0, 0), MTIME)
        .dir("z", 0o755)
        .symlink("w", "/etc/shadow")
        .fifo("p", 0o644)
        .bytes();
    let upper = Tar::new()
        .file("x", b"now a file")
        .dir("y", 0o700)
        .dir_with("z", 0o711, (7, 7), MTIME)
        .file("w", b"not through the link")
        .file("p", b"no longer a fifo")
        .bytes();
    s.image(&oci(&[lower, upper])).expect("unpack");
    assert_eq!(fs::read(s.path("x")).expect("x"), b"now a file");
    assert!(s.path("y").is_dir());
    assert_eq!(mode(&fs::metadata(s.path("y")).expect("y")), 0o700);
    let z = fs::metadata(s.path("z")).expect("z");
    assert_eq!((mode(&z), z.uid()), (0o711, owner(7, 7).0), "a directory over a directory updates its metadata");
    assert_eq!(fs::read(s.path("z/c")).expect("z/c"), b"kept", "and keeps its content");
    assert!(fs::symlink_metadata(s.path("w")).expect("w").is_file());
    assert_eq!(fs::read(s.path("w")).expect("w"), b"not through the link");
    assert!(fs::symlink_metadata(s.path("p")).expect("p").is_file());
    s.assert_contained();
}

#[test]
fn a_gzip_or_zstd_rootfs_tarball_is_detected_by_its_magic() {
    let tar = Tar::new().file("hello", b"world").bytes();
    for (tag, archive) in [("gz", common::gzip(&tar)), ("zst", common::zstd(&tar)), ("plain", tar.clone())] {
        let s = Scratch::new(&format!("rootfs-{tag}"));
        let unpacked = s.rootfs(&archive).expect(tag);
        assert_eq!((unpacked.layers, unpacked.entries), (1, 1));
        assert_eq!(fs::read(s.path("hello")).expect("hello"), b"world");
        s.assert_contained();
    }
}

//! Hostile archives: each is refused with the right kind, naming the entry, and nothing is
//! written outside the root (the sentinel directory next to it stays as it was).

mod common;

use std::fs;

use common::{assert_invalid, assert_too_large, oci, Scratch, Tar};
use image_archive::{Limits, Refusal};
use tar::EntryType;

/// Refused as a rootfs tarball and as a layer of an OCI image, with `needle` in the message,
/// and contained both times.
#[track_caller]
fn refused(tag: &str, archive: &[u8], needle: &str) {
    let s = Scratch::new(&format!("{tag}-rootfs"));
    let m = assert_invalid(s.rootfs(archive), needle);
    assert!(m.starts_with("entry \"") || !needle.starts_with("entry"), "{m}");
    s.assert_contained();
    let s = Scratch::new(&format!("{tag}-image"));
    let m = assert_invalid(s.image(&oci(&[archive.to_vec()])), needle);
    assert!(m.starts_with("layer 1 (sha256:"), "{m}");
    s.assert_contained();
}

#[test]
fn paths_that_climb_are_absolute_empty_or_hold_nul_are_refused() {
    refused("dotdot", &Tar::new().raw(b"../sentinel/evil", EntryType::Regular, b"", b"x").bytes(), "\"..\" component");
    refused("dotdot-mid", &Tar::new().raw(b"a/../../sentinel/evil", EntryType::Regular, b"", b"x").bytes(), "\"..\"");
    let s = Scratch::new("abs-target");
    let absolute = format!("{}/evil", s.sentinel.display());
    refused("abs", &Tar::new().file(&absolute, b"x").bytes(), "the path is absolute");
    s.assert_contained();
    refused("empty", &Tar::new().raw(b"", EntryType::Regular, b"", b"x").bytes(), "the path is empty");
    let nul = Tar::new().pax(&[("path", b"a\0b")]).file("placeholder", b"x").bytes();
    refused("nul", &nul, "NUL");
}

#[test]
fn nothing_is_written_through_a_symlink_in_the_tree() {
    let s = Scratch::new("through");
    let sentinel = s.sentinel.display().to_string();
    // An absolute symlink is allowed (it resolves inside the sandbox) ...
    let archive = Tar::new().symlink("escape", &sentinel).file("escape/evil", b"x").bytes();
    refused("through-file", &archive, "goes through escape, which is a symlink");
    let archive = Tar::new().symlink("escape", &sentinel).dir("escape/sub", 0o755).bytes();
    refused("through-dir", &archive, "which is a symlink");
    let archive = Tar::new().symlink("escape", &sentinel).fifo("escape/fifo", 0o644).bytes();
    refused("through-fifo", &archive, "which is a symlink");
    let archive = Tar::new().symlink("escape", &sentinel).symlink("escape/link", "x").bytes();
    refused("through-symlink", &archive, "which is a symlink");
    // ... and neither a whiteout nor an opaque marker deletes through it.
    let archive = Tar::new().symlink("escape", &sentinel).file("escape/.wh.keep", b"").bytes();
    refused("through-whiteout", &archive, "the whiteout goes through escape");
    let archive = Tar::new().symlink("escape", &sentinel).file("escape/.wh..wh..opq", b"").bytes();
    refused("through-opaque", &archive, "which is a symlink");
    s.assert_contained();
    // A symlink in a lower layer counts the same.
    let lower = Tar::new().symlink("etc", &sentinel).bytes();
    let upper = Tar::new().file("etc/passwd", b"x").bytes();
    let s = Scratch::new("through-layers");
    let m = assert_invalid(s.image(&oci(&[lower, upper])), "which is a symlink");
    assert!(m.starts_with("layer 2 (sha256:") && m.contains("entry \"etc/passwd\""), "{m}");
    s.assert_contained();
}

#[test]
fn symlinks_climbing_above_the_root_are_refused() {
    let archive = Tar::new().dir("a", 0o755).symlink("a/b", "../../../etc").bytes();
    refused("climb", &archive, "entry \"a/b\": the symlink target \"../../../etc\" climbs above the root");
    refused("climb-top", &Tar::new().symlink("up", "..").bytes(), "climbs above the root");
    refused("climb-empty", &Tar::new().raw(b"empty", EntryType::Symlink, b"", b"").bytes(), "empty target");
}

#[test]
fn hard_links_must_name_a_regular_file_already_in_the_tree() {
    let s = Scratch::new("hl-abs-target");
    let keep = format!("{}/keep", s.sentinel.display());
    let archive = Tar::new().raw(b"h", EntryType::Link, keep.as_bytes(), b"").bytes();
    refused("hl-abs", &archive, "the path is absolute");
    let archive = Tar::new().raw(b"h", EntryType::Link, b"../sentinel/keep", b"").bytes();
    refused("hl-dotdot", &archive, "\"..\" component");
    refused("hl-missing", &Tar::new().hardlink("h", "nothere").bytes(), "its link target nothere is not in the tree");
    refused("hl-dir", &Tar::new().dir("d", 0o755).hardlink("h", "d").bytes(), "not a regular file");
    let archive = Tar::new().file("f", b"x").symlink("s", "f").hardlink("h", "s").bytes();
    refused("hl-symlink", &archive, "its link target s is not a regular file");
    let archive = Tar::new().fifo("p", 0o644).hardlink("h", "p").bytes();
    refused("hl-fifo", &archive, "not a regular file");
    let archive = Tar::new().file("a/b", b"x").hardlink("a", "a/b").bytes();
    refused("hl-inside", &archive, "its link target a/b is inside it");
    let sentinel = s.sentinel.display().to_string();
    let archive = Tar::new().symlink("escape", &sentinel).hardlink("h", "escape/keep").bytes();
    refused("hl-through", &archive, "the link target goes through escape, which is a symlink");
    s.assert_contained();
}

#[test]
fn device_nodes_and_unknown_entry_types_are_refused() {
    refused(
        "char",
        &Tar::new().raw(b"dev/null", EntryType::Char, b"", b"").bytes(),
        "character devices are not allowed",
    );
    refused("block", &Tar::new().raw(b"dev/sda", EntryType::Block, b"", b"").bytes(), "block devices are not allowed");
    refused("sparse", &Tar::new().raw(b"s", EntryType::new(b'V'), b"", b"").bytes(), "entries of type 'V'");
    // Data on an entry that has none would be read differently by other tar readers.
    let archive = Tar::new().raw(b"d", EntryType::Directory, b"", &[0u8; 512]).bytes();
    refused("dir-data", &archive, "a directory entry declares 512 bytes of data");
}

#[test]
fn the_byte_limit_is_checked_before_a_file_is_written() {
    let limits = Limits { max_unpacked_bytes: 1000, max_entries: 100 };
    let s = Scratch::new("bytes");
    let archive = Tar::new().file("small", &[1u8; 600]).file("big", &[2u8; 401]).bytes();
    let m = assert_too_large(s.rootfs_limited(&archive, limits), "add up to more than 1000 bytes");
    assert!(m.starts_with("entry \"big\""), "{m}");
    assert!(s.path("small").exists() && !s.path("big").exists(), "nothing of the file over the limit is written");
    s.assert_contained();
    // Across layers, even when a later layer replaces the file.
    let s = Scratch::new("bytes-layers");
    let lower = Tar::new().file("f", &[1u8; 600]).bytes();
    let upper = Tar::new().file("f", &[2u8; 600]).bytes();
    let result = s.image_with(&oci(&[lower, upper]), limits, &mut |_| {});
    assert!(assert_too_large(result, "more than 1000 bytes").starts_with("layer 2 (sha256:"));
    s.assert_contained();
    // Exactly the limit is fine.
    let s = Scratch::new("bytes-exact");
    let archive = Tar::new().file("small", &[1u8; 600]).file("big", &[2u8; 400]).bytes();
    assert_eq!(s.rootfs_limited(&archive, limits).expect("fits").unpacked_bytes, 1000);
}

#[test]
fn the_entry_limit_counts_entries_and_the_parents_made_for_them() {
    let limits = Limits { max_unpacked_bytes: 1 << 20, max_entries: 4 };
    let s = Scratch::new("entries");
    let archive = Tar::new().file("a", b"").file("b", b"").file("c", b"").file("d", b"").bytes();
    assert_eq!(s.rootfs_limited(&archive, limits).expect("four").entries, 4);
    let s = Scratch::new("entries-over");
    let archive = Tar::new().file("a", b"").file("b", b"").file("c", b"").file("d", b"").file("e", b"").bytes();
    assert_too_large(s.rootfs_limited(&archive, limits), "more than 4 entries");
    assert!(!s.path("e").exists());
    s.assert_contained();
    let s = Scratch::new("entries-deep");
    assert_too_large(s.rootfs_limited(&Tar::new().file("1/2/3/4/5", b"").bytes(), limits), "more than 4 entries");
    s.assert_contained();
}

#[test]
fn a_zstd_window_above_128_mib_is_refused() {
    let s = Scratch::new("zstd-window");
    let tar = Tar::new().file("f", b"x").bytes();
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
    encoder.window_log(28).expect("window");
    std::io::Write::write_all(&mut encoder, &tar).expect("write");
    let compressed = encoder.finish().expect("finish");
    assert!(matches!(s.rootfs(&compressed), Err(Refusal::Invalid(m)) if m.contains("zstd") || m.contains("corrupt")));
    assert!(!s.path("f").exists());
    s.assert_contained();
}

#[test]
fn oversized_extended_headers_are_refused_without_being_held() {
    let s = Scratch::new("pax-bomb");
    let huge = vec![b'a'; 5 << 20];
    let archive = Tar::new().pax(&[("SCHILY.xattr.user.big", &huge)]).file("f", b"x").bytes();
    assert_invalid(s.rootfs(&common::zstd(&archive)), "take more than 4194304 bytes");
    s.assert_contained();
    let s = Scratch::new("xattr-big");
    let big = vec![b'a'; (64 << 10) + 1];
    let archive = Tar::new().pax(&[("SCHILY.xattr.user.big", &big)]).file("f", b"x").bytes();
    assert_invalid(s.rootfs(&archive), "entry \"f\": extended attribute user.big is longer than 65536 bytes");
}

#[test]
fn xz_and_bzip2_are_named_and_trailing_garbage_is_refused() {
    let s = Scratch::new("xz");
    assert_invalid(s.rootfs(b"\xfd7zXZ\x00rest"), "xz-compressed");
    let s = Scratch::new("tail");
    let mut archive = Tar::new().file("f", b"x").bytes();
    // The reader stops at the first of the two zero blocks ending the stream; the second counts.
    archive.extend(vec![0u8; (1 << 20) - 512 + 1]);
    assert_invalid(s.rootfs(&archive), "follow the end of the tar stream");
    fs::remove_dir_all(&s.root).expect("rm");
    fs::create_dir(&s.root).expect("mkdir");
    archive.truncate(archive.len() - 1);
    assert!(s.rootfs(&archive).is_ok(), "padding up to 1 MiB is fine");
}

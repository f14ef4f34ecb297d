//! The system disk: a read-only ext4 filesystem labelled `oc-system` that carries what is too
//! big for the initramfs (sandbox templates). The appliance mounts it read-only and imports
//! each template once onto the XFS data disk, where sandboxes get reflink clones of it.
//!
//! Templates are stored zstd-compressed: the three 2 GiB sparse disks hold 1.3 GiB of ext4
//! blocks but compress to 270 MiB, which keeps the system ext4 within the 512 MiB
//! system slots of the first disk images (an upgrade must fit the slot its machine was
//! installed with) and the upgrade upload small. The appliance decompresses each template once,
//! on import, into a sparse file (appliance/src/vmm_runtime/templates.rs).

use crate::cache::{self, Entry};
use crate::err;
use crate::error::{Context, Result};
use crate::ext4;
use crate::progress::{fmt_size, Outcome, Step};
use crate::template::Template;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The filesystem label init looks for.
pub const LABEL: &str = boot_disk::ext4::SYSTEM_LABEL;
/// Fixed filesystem identity, so the same inputs give the same disk.
const FS_UUID: &str = "5a1db0c5-0c0c-4e1e-9b2a-0a7c0ffee001";
const HASH_SEED: &str = "0c0ffee0-5a1d-4b0c-8e3a-5eed00000001";
/// Room for ext4's own metadata beyond the files' allocated blocks.
const SLACK_BYTES: u64 = 64 << 20;
/// zstd's level for the templates. Measured on base, python and node (2026-12-04, one core):
/// level 3 leaves 91, 102 and 137 MiB in 4-6 s each; level 9 leaves 74, 82 and 114 MiB (18% less)
/// in 7-11 s each, and decompresses as fast (~0.7 s for a 2 GiB template, mostly zeros); level
/// 12 saves under 1% more at twice the time. Its window (4 MiB) is within what the appliance
/// accepts (16 MiB).
const ZSTD_LEVEL: &str = "-9";

/// Builds (or takes from the cache) the system disk holding `templates`. Each template lands at
/// `templates/<name>.ext4.zst` (zstd, declaring the disk's length in its frame header) with
/// `templates/<name>.id` naming its content (the cache key), which the appliance uses to notice
/// a changed template after an upgrade.
pub fn build(templates: &[Template]) -> Result<PathBuf> {
    let step = Step::start("system disk");
    let mut inputs: Vec<(String, Vec<u8>)> = vec![("recipe".into(), b"system ext4 v3 (templates zstd -9)".to_vec())];
    for t in templates {
        inputs.push((format!("template {}", t.name), t.id.as_bytes().to_vec()));
    }
    let refs: Vec<(&str, &[u8])> = inputs.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let entry = Entry::new("system-disk", &cache::key(&refs));
    let outcome = if entry.is_complete() {
        Outcome::Cached
    } else {
        entry.fill(|dir| pack(templates, &dir.join("system.ext4")))?;
        Outcome::Built
    };
    let disk = entry.path("system.ext4");
    let size = std::fs::metadata(&disk).ctx(|| format!("stat {}", disk.display()))?;
    step.finish(outcome, &format!("{} ({} allocated)", fmt_size(size.len()), fmt_size(size.blocks() * 512)));
    Ok(disk)
}

fn pack(templates: &[Template], out: &Path) -> Result<()> {
    let staging = out.with_extension("staging");
    let dir = staging.join("templates");
    std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
    let mut allocated = 0;
    for t in templates {
        let target = dir.join(format!("{}.ext4.zst", t.name));
        compress(&t.disk, &target)?;
        allocated += std::fs::metadata(&target).ctx(|| format!("stat {}", target.display()))?.blocks() * 512;
        std::fs::write(dir.join(format!("{}.id", t.name)), format!("{}\n", t.id)).ctx(|| "write template id".into())?;
    }
    let size_kib = (allocated + allocated / 8 + SLACK_BYTES) / 1024;
    let identity = ext4::Identity { label: LABEL, uuid: FS_UUID, hash_seed: HASH_SEED };
    ext4::from_dir(&staging, out, &format!("{size_kib}k"), &identity, &["-m", "0"], crate::SOURCE_DATE_EPOCH)?;
    Ok(())
}

/// Compresses the template disk `disk` into `out` with the `zstd` CLI: single-threaded (the same
/// input always gives the same bytes), with a checksum and the disk's length in the frame
/// header (the appliance refuses to decompress more than that).
pub fn compress(disk: &Path, out: &Path) -> Result<()> {
    let file = std::fs::File::create(out).ctx(|| format!("create {}", out.display()))?;
    let status = Command::new("zstd")
        .args(["-q", ZSTD_LEVEL, "-T1", "--check", "--content-size", "-c"])
        .arg(disk)
        .stdout(file)
        .status()
        .ctx(|| "run zstd".into())?;
    if !status.success() {
        return Err(err!("zstd of {} failed ({status})", disk.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    /// The content size a zstd frame header declares (RFC 8878, 3.1.1.1), None if it has none.
    fn declared_size(frame: &[u8]) -> Option<u64> {
        assert_eq!(frame[..4], [0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
        let descriptor = frame[4];
        let single_segment = descriptor & 0x20 != 0;
        let fcs_bytes = match (descriptor >> 6, single_segment) {
            (0, false) => return None,
            (0, true) => 1,
            (1, _) => 2,
            (2, _) => 4,
            _ => 8,
        };
        let did_bytes = [0, 1, 2, 4][usize::from(descriptor & 3)];
        let at = 5 + usize::from(!single_segment) + did_bytes;
        let mut value = [0u8; 8];
        value[..fcs_bytes].copy_from_slice(&frame[at..at + fcs_bytes]);
        Some(u64::from_le_bytes(value) + if fcs_bytes == 2 { 256 } else { 0 })
    }

    #[test]
    fn templates_compress_reproducibly_declaring_their_length() {
        if !crate::host::have("zstd") {
            eprintln!("zstd is not installed; skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("image-system-zstd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        // A sparse 48 MiB disk with a little data, as a template's ext4 is.
        let disk = dir.join("t.ext4");
        let mut file = std::fs::File::create(&disk).expect("create");
        file.set_len(48 << 20).expect("len");
        file.seek(SeekFrom::Start(5 << 20)).expect("seek");
        file.write_all(&[0xa5; 10_000]).expect("write");
        drop(file);
        let (a, b) = (dir.join("a.zst"), dir.join("b.zst"));
        compress(&disk, &a).expect("compress");
        compress(&disk, &b).expect("compress again");
        let stream = std::fs::read(&a).expect("read");
        assert!(stream == std::fs::read(&b).expect("read"), "the same disk gives the same bytes");
        assert!(stream.len() < 64 << 10, "holes compress away: {} bytes", stream.len());
        assert_eq!(declared_size(&stream), Some(48 << 20), "the frame declares the disk's length");
        let back = crate::host::run_quiet(Command::new("zstd").args(["-q", "-t"]).arg(&a));
        assert!(back.is_ok(), "zstd checks its own stream: {back:?}");
        let out = Command::new("zstd").args(["-q", "-d", "-c"]).arg(&a).output().expect("zstd -d");
        assert!(out.status.success() && out.stdout == std::fs::read(&disk).expect("read"), "round trip");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

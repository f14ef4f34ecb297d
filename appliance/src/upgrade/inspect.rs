//! Checks an uploaded disk image before anything is installed from it: a valid GPT with this
//! appliance's partitions, an `oc-system` ext4 in system partition A, and on its ESP exactly one
//! committed boot entry for slot A that is a complete unified kernel image.

use boot_disk::entry::{self, Slot, VERSION_KEY};
use boot_disk::fat::Fat;
use boot_disk::gpt::{Gpt, SECTOR};
use boot_disk::layout;
use boot_disk::pe::Uki;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// A unified kernel image larger than this is not ours (ours is ~20 MiB).
const MAX_UKI_BYTES: u64 = 256 << 20;

/// What an upgrade installs from a checked image.
pub struct Candidate {
    /// Byte range of the system filesystem inside the image file.
    pub system_offset: u64,
    pub system_len: u64,
    /// The unified kernel image, for slot A as built.
    pub uki: Vec<u8>,
    pub version: String,
    pub entry_name: String,
}

pub fn inspect(image: &Path) -> Result<Candidate, String> {
    let mut file = File::open(image).map_err(|e| format!("cannot open the uploaded image: {e}"))?;
    let size = file.metadata().map_err(|e| format!("cannot stat the uploaded image: {e}"))?.len();
    if size == 0 || size % SECTOR != 0 {
        return Err(format!("{size} bytes is not a whole number of 512-byte sectors: not a disk image"));
    }
    let (table, _) =
        Gpt::read_from(&mut file, size / SECTOR).map_err(|e| format!("no valid GPT partition table: {e}"))?;
    let part = |name: &str| {
        table.find(name).map(|(_, p)| p.clone()).ok_or_else(|| format!("the image has no partition named {name}"))
    };
    let esp = part(layout::ESP_NAME)?;
    let system = part(layout::SYSTEM_A_NAME)?;
    part(layout::SYSTEM_B_NAME)?;
    for p in [&esp, &system] {
        if p.offset_bytes() + p.size_bytes() > size {
            return Err(format!("partition {} extends past the end of the image", p.name));
        }
    }
    let system_len = ext4_size(&mut file, system.offset_bytes())?;
    if system_len > system.size_bytes() {
        return Err(format!("the ext4 filesystem in {} is larger than its partition", system.name));
    }

    let mut fat = Fat::open(&mut file, esp.offset_bytes()).map_err(|e| format!("EFI partition: {e}"))?;
    let listing = fat.list(entry::ENTRIES_DIR).map_err(|e| format!("EFI partition: {e}"))?;
    let names: Vec<&str> = listing.iter().map(|e| e.name.as_str()).collect();
    let committed_a: Vec<_> =
        entry::from_names(names).into_iter().filter(|e| e.slot == Slot::A && !e.is_trial()).collect();
    let [found] = committed_a.as_slice() else {
        return Err(format!(
            "the EFI partition must hold exactly one committed slot A entry in {}, found {}",
            entry::ENTRIES_DIR,
            committed_a.len()
        ));
    };
    let uki = fat.read_file(&found.path(), MAX_UKI_BYTES).map_err(|e| format!("EFI partition: {e}"))?;
    let parsed =
        Uki::parse(&uki).map_err(|e| format!("{} is not a complete unified kernel image: {e}", found.file_name()))?;
    if parsed.slot() != Some(Slot::A) {
        return Err(format!("the command line of {} does not name slot A ({}=a)", found.file_name(), entry::SLOT_KEY));
    }
    let version = parsed.os_release_value(VERSION_KEY).unwrap_or_else(|| "unknown".into());
    Ok(Candidate { system_offset: system.offset_bytes(), system_len, uki, version, entry_name: found.file_name() })
}

/// The size of the ext4 filesystem (labelled `oc-system`) starting at `offset`.
fn ext4_size(file: &mut File, offset: u64) -> Result<u64, String> {
    let mut head = vec![0u8; 2048];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut head))
        .map_err(|e| format!("read the system partition: {e}"))?;
    let label = boot_disk::ext4::label(&head);
    if label.as_deref() != Some(boot_disk::ext4::SYSTEM_LABEL) {
        return Err(format!(
            "system partition A holds no ext4 filesystem labelled {} (found {label:?})",
            boot_disk::ext4::SYSTEM_LABEL
        ));
    }
    let sb = &head[1024..];
    let u32_at = |o: usize| u64::from(u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]));
    let log_block = u32_at(24);
    if log_block > 6 {
        return Err("system partition A: implausible ext4 block size".into());
    }
    // s_blocks_count_hi only counts with the 64bit feature (incompat 0x80).
    let hi = if u32_at(0x60) & 0x80 != 0 { u32_at(0x150) } else { 0 };
    Ok(((hi << 32) | u32_at(4)) * (1024 << log_block))
}

#[cfg(test)]
mod tests {
    use super::*;
    use boot_disk::gpt::{Guid, Partition, ESP_TYPE, LINUX_FS_TYPE};
    use std::io::Write;
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    /// A minimal PE32+ carrying the given sections (what Uki::parse reads).
    fn fake_uki(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let (coff, table) = (0x40usize, 0x40 + 24 + 240);
        let mut pe = vec![0u8; table + 40 * parts.len()];
        pe[..2].copy_from_slice(b"MZ");
        pe[0x3C] = coff as u8;
        pe[coff..coff + 4].copy_from_slice(b"PE\0\0");
        pe[coff + 6] = parts.len() as u8;
        pe[coff + 20] = 240;
        pe[coff + 24..coff + 26].copy_from_slice(&0x20Bu16.to_le_bytes());
        for (i, (name, data)) in parts.iter().enumerate() {
            let (s, offset) = (table + 40 * i, pe.len() as u32);
            pe[s..s + name.len()].copy_from_slice(name.as_bytes());
            pe[s + 8..s + 12].copy_from_slice(&(data.len() as u32).to_le_bytes());
            pe[s + 16..s + 20].copy_from_slice(&(data.len() as u32).to_le_bytes());
            pe[s + 20..s + 24].copy_from_slice(&offset.to_le_bytes());
            pe.extend_from_slice(data);
        }
        pe
    }

    /// A disk image laid out like `image build --disk` makes it: GPT, FAT32 ESP with `uki` as
    /// the slot A entry, an ext4 superblock labelled oc-system in A (4096 blocks of 1 KiB).
    fn disk_image(dir: &Path, uki: &[u8], with_b: bool) -> std::path::PathBuf {
        let fat = dir.join("esp.fat");
        let _ = std::fs::remove_file(&fat);
        let ok = Command::new("mkfs.fat").args(["-C", "-F", "32"]).arg(&fat).arg("40960").output().expect("mkfs.fat");
        assert!(ok.status.success(), "{ok:?}");
        std::fs::write(dir.join("uki"), uki).expect("write");
        let img = fat.display().to_string();
        for args in [
            vec!["mmd", "-i", &img, "::/EFI", "::/EFI/Linux"],
            vec!["mcopy", "-i", &img, &dir.join("uki").display().to_string(), "::/EFI/Linux/opencomputer-1-a.efi"],
        ] {
            let out = Command::new(args[0]).args(&args[1..]).env("MTOOLS_SKIP_CHECK", "1").output().expect("mtools");
            assert!(out.status.success(), "{args:?}: {out:?}");
        }
        let mut table = Gpt::new(Guid::from_random([3; 16]));
        let mut next = MIB / SECTOR;
        let mut parts = vec![(layout::ESP_NAME, ESP_TYPE, 41 * MIB), (layout::SYSTEM_A_NAME, LINUX_FS_TYPE, 8 * MIB)];
        if with_b {
            parts.push((layout::SYSTEM_B_NAME, LINUX_FS_TYPE, 8 * MIB));
        }
        for (i, (name, type_guid, size)) in parts.into_iter().enumerate() {
            let sectors = size / SECTOR;
            let p = Partition {
                type_guid,
                guid: Guid::from_random([i as u8 + 10; 16]),
                first_lba: next,
                last_lba: next + sectors - 1,
                attributes: 0,
                name: name.into(),
            };
            table.add(p).expect("add");
            next += sectors;
        }
        let sectors = next + MIB / SECTOR;
        let path = dir.join("disk.img");
        let mut file = File::create(&path).expect("create");
        file.set_len(sectors * SECTOR).expect("size");
        table.write_to(&mut file, sectors).expect("gpt");
        let at = |name: &str| table.find(name).map(|(_, p)| p.offset_bytes()).expect("partition");
        file.seek(SeekFrom::Start(at(layout::ESP_NAME))).expect("seek");
        file.write_all(&std::fs::read(&fat).expect("read fat")).expect("write fat");
        let mut sb = vec![0u8; 2048];
        sb[1024 + 4..1024 + 8].copy_from_slice(&4096u32.to_le_bytes());
        sb[1024 + 56..1024 + 58].copy_from_slice(&[0x53, 0xEF]);
        sb[1024 + 120..1024 + 129].copy_from_slice(b"oc-system");
        file.seek(SeekFrom::Start(at(layout::SYSTEM_A_NAME))).expect("seek");
        file.write_all(&sb).expect("write superblock");
        path
    }

    #[test]
    fn accepts_an_image_laid_out_like_ours_and_names_what_is_wrong_otherwise() {
        if Command::new("mkfs.fat").arg("--help").output().is_err() || Command::new("mcopy").arg("-V").output().is_err()
        {
            eprintln!("dosfstools/mtools not installed; skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("appliance-inspect-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let osrel = b"ID=opencomputer\nOPENCOMPUTER_VERSION=2.0-test\n";
        let good = fake_uki(&[
            (".osrel", osrel),
            (".cmdline", b"console=ttyS0 oc.boot=disk oc.slot=a"),
            (".linux", b"kernel"),
            (".initrd", b"initrd"),
        ]);
        let candidate = inspect(&disk_image(&dir, &good, true)).expect("accepted");
        assert_eq!((candidate.version.as_str(), candidate.entry_name.as_str()), ("2.0-test", "opencomputer-1-a.efi"));
        assert_eq!(candidate.system_len, 4096 * 1024);
        assert!(candidate.uki == good);

        let no_b = inspect(&disk_image(&dir, &good, false)).err().unwrap_or_default();
        assert!(no_b.contains("no partition named oc-system-b"), "{no_b}");
        let no_initrd = fake_uki(&[(".osrel", osrel), (".cmdline", b"oc.slot=a"), (".linux", b"kernel")]);
        let error = inspect(&disk_image(&dir, &no_initrd, true)).err().unwrap_or_default();
        assert!(error.contains("not a complete unified kernel image: no .initrd section"), "{error}");
        let slot_b = fake_uki(&[(".osrel", osrel), (".cmdline", b"oc.slot=b"), (".linux", b"k"), (".initrd", b"i")]);
        let error = inspect(&disk_image(&dir, &slot_b, true)).err().unwrap_or_default();
        assert!(error.contains("does not name slot A"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_files_that_are_not_disk_images_with_the_reason() {
        let path = std::env::temp_dir().join(format!("appliance-inspect-{}", std::process::id()));
        std::fs::write(&path, b"not an image").expect("write");
        assert!(inspect(&path).err().unwrap_or_default().contains("not a disk image"));
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("write");
        assert!(inspect(&path).err().unwrap_or_default().contains("no valid GPT"));
        let _ = std::fs::remove_file(&path);
    }
}

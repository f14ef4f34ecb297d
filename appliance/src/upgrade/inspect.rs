//! Checks an uploaded disk image before anything is installed from it: a valid GPT with this
//! appliance's partitions, an `oc-system` ext4 in system partition A, and on its ESP exactly one
//! committed boot entry for slot A that is a complete unified kernel image.

use init::boot::entry::{self, Slot, VERSION_KEY};
use init::boot::fat::Fat;
use init::boot::pe::Uki;
use init::gpt::{Gpt, SECTOR};
use init::layout;
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
    let (table, _) = Gpt::read_from(&mut file, size / SECTOR).map_err(|e| format!("no valid GPT partition table: {e}"))?;
    let part = |name: &str| table.find(name).map(|(_, p)| p.clone()).ok_or_else(|| format!("the image has no partition named {name}"));
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
    let committed_a: Vec<_> = entry::from_names(names).into_iter().filter(|e| e.slot == Slot::A && !e.is_trial()).collect();
    let [found] = committed_a.as_slice() else {
        return Err(format!("the EFI partition must hold exactly one committed slot A entry in {}, found {}", entry::ENTRIES_DIR, committed_a.len()));
    };
    let uki = fat.read_file(&found.path(), MAX_UKI_BYTES).map_err(|e| format!("EFI partition: {e}"))?;
    let parsed = Uki::parse(&uki).map_err(|e| format!("{} is not a complete unified kernel image: {e}", found.file_name()))?;
    if parsed.slot() != Some(Slot::A) {
        return Err(format!("the command line of {} does not name slot A ({}=a)", found.file_name(), entry::SLOT_KEY));
    }
    let version = parsed.os_release_value(VERSION_KEY).unwrap_or_else(|| "unknown".into());
    Ok(Candidate { system_offset: system.offset_bytes(), system_len, uki, version, entry_name: found.file_name() })
}

/// The size of the ext4 filesystem (labelled `oc-system`) starting at `offset`.
fn ext4_size(file: &mut File, offset: u64) -> Result<u64, String> {
    let mut head = vec![0u8; 2048];
    file.seek(SeekFrom::Start(offset)).and_then(|_| file.read_exact(&mut head)).map_err(|e| format!("read the system partition: {e}"))?;
    let label = init::appliance::systemdisk::ext4_label(&head);
    if label.as_deref() != Some(init::appliance::systemdisk::LABEL) {
        return Err(format!("system partition A holds no ext4 filesystem labelled {} (found {label:?})", init::appliance::systemdisk::LABEL));
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

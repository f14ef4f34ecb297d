//! Installs a checked image into the slot that is not running. Order matters for a power cut at
//! any point: first the target slot's old boot entry is removed (so a half-written slot is never
//! booted), then its system partition is written and synced, and only then the new entry appears
//! (written under a name systemd-boot ignores, synced, renamed). The running slot, its entry and
//! the data partition are never touched.

use super::inspect::Candidate;
use boot_disk::disk;
use boot_disk::entry::{self, Entry, Slot, DEFAULT_TRIES};
use boot_disk::pe::Uki;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

const ESP_MOUNT: &str = "/run/esp-upgrade";

pub struct Installed {
    pub slot: Slot,
    pub entry: String,
}

/// Why an install did not happen: the request conflicts with the machine's state, or it failed.
pub enum InstallError {
    Conflict(String),
    Failed(String),
}

pub fn install(image: &Path, candidate: &Candidate, running: Slot) -> Result<Installed, InstallError> {
    let failed = InstallError::Failed;
    let entries = boot_disk::disk::read_entries().map_err(failed)?;
    if let Some(current) = entry::current_for(&entries, running).filter(|e| e.is_trial()) {
        return Err(InstallError::Conflict(format!(
            "the running slot {running} is itself an upgrade on trial ({}); wait until it is committed",
            current.file_name()
        )));
    }
    let target = running.other();
    let device = disk::partition_path(target.partition_name()).map_err(failed)?;
    let capacity = partition_bytes(&device).map_err(failed)?;
    if candidate.system_len > capacity {
        return Err(InstallError::Conflict(format!(
            "the image's system filesystem ({} MiB) does not fit partition {} ({} MiB)",
            candidate.system_len >> 20,
            target.partition_name(),
            capacity >> 20
        )));
    }
    let mut uki = candidate.uki.clone();
    let parsed = Uki::parse(&uki).map_err(failed)?;
    parsed.retarget(&mut uki, target).map_err(failed)?;
    let new_entry = Entry::new(entry::next_generation(&entries), target, Some(DEFAULT_TRIES));

    let old: Vec<Entry> = entries.iter().filter(|e| e.slot == target).cloned().collect();
    disk::with_esp_rw(ESP_MOUNT, |root| {
        for e in &old {
            std::fs::remove_file(format!("{root}/{}", e.path()))
                .map_err(|err| format!("remove the old entry {}: {err}", e.file_name()))?;
        }
        Ok(())
    })
    .map_err(failed)?;
    copy_range(image, candidate.system_offset, candidate.system_len, &device).map_err(failed)?;
    disk::with_esp_rw(ESP_MOUNT, |root| {
        let dir = format!("{root}/{}", entry::ENTRIES_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", entry::ENTRIES_DIR))?;
        let final_path = format!("{root}/{}", new_entry.path());
        let tmp = format!("{final_path}.tmp");
        let written = File::create(&tmp).and_then(|mut f| f.write_all(&uki).and_then(|()| f.sync_all()));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("write the new boot entry (is the EFI partition full?): {e}"));
        }
        std::fs::rename(&tmp, &final_path).map_err(|e| format!("rename the new boot entry into place: {e}"))
    })
    .map_err(failed)?;
    Ok(Installed { slot: target, entry: new_entry.file_name() })
}

/// Copies `len` bytes at `offset` of `image` onto the block device `device`, then syncs it.
fn copy_range(image: &Path, offset: u64, len: u64, device: &str) -> Result<(), String> {
    let mut input = File::open(image).map_err(|e| format!("open the staged image: {e}"))?;
    input.seek(SeekFrom::Start(offset)).map_err(|e| format!("seek in the staged image: {e}"))?;
    let mut out = OpenOptions::new().write(true).open(device).map_err(|e| format!("open {device}: {e}"))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut left = len;
    while left > 0 {
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        input.read_exact(&mut buf[..n]).map_err(|e| format!("read the staged image: {e}"))?;
        out.write_all(&buf[..n]).map_err(|e| format!("write {device}: {e}"))?;
        left -= n as u64;
    }
    out.sync_all().map_err(|e| format!("sync {device}: {e}"))
}

/// The size of a partition, from sysfs (in 512-byte units whatever the sector size).
fn partition_bytes(device: &str) -> Result<u64, String> {
    let name = device.trim_start_matches("/dev/");
    let text = std::fs::read_to_string(format!("/sys/class/block/{name}/size"))
        .map_err(|e| format!("size of {device}: {e}"))?;
    text.trim().parse::<u64>().map(|s| s * 512).map_err(|e| format!("size of {device}: {e}"))
}

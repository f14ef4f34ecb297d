//! The boot disk's partitions by GPT name (from sysfs), and the ESP mounted read-write just for
//! one change: FAT has no journal, so it is mounted only while writing, then synced and
//! unmounted, keeping the window in which a power cut can hurt it short.

use crate::layout;
use crate::sys::mount::{self, Mount};
use std::fs;

/// The kernel name (e.g. `vda3`) of the partition with this GPT name.
pub fn find_partition(name: &str) -> Option<String> {
    let mut entries: Vec<_> = fs::read_dir("/sys/class/block").ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|entry| {
        let uevent = fs::read_to_string(entry.path().join("uevent")).ok()?;
        let named = uevent.lines().any(|l| l.strip_prefix("PARTNAME=") == Some(name));
        named.then(|| entry.file_name().to_string_lossy().into_owned())
    })
}

/// `/dev/...` of the partition with this GPT name.
pub fn partition_path(name: &str) -> Result<String, String> {
    find_partition(name)
        .map(|p| format!("/dev/{p}"))
        .ok_or_else(|| format!("no partition named {name} on this machine"))
}

/// The boot entries on the ESP, read without mounting it.
pub fn read_entries() -> Result<Vec<super::entry::Entry>, String> {
    let device = partition_path(layout::ESP_NAME)?;
    let file = fs::File::open(&device).map_err(|e| format!("open {device}: {e}"))?;
    let mut fat = super::fat::Fat::open(file, 0).map_err(|e| format!("{device}: {e}"))?;
    let listing = fat.list(super::entry::ENTRIES_DIR).map_err(|e| format!("{device}: {e}"))?;
    Ok(super::entry::from_names(listing.iter().map(|e| e.name.as_str())))
}

/// Mounts the ESP read-write at `target`, runs `change` on it, then syncs and unmounts.
pub fn with_esp_rw<T>(target: &str, change: impl FnOnce(&str) -> Result<T, String>) -> Result<T, String> {
    let device = partition_path(layout::ESP_NAME)?;
    fs::create_dir_all(target).map_err(|e| format!("create {target}: {e}"))?;
    mount::mount(&Mount {
        source: &device,
        target,
        fstype: "vfat",
        flags: libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_SYNCHRONOUS,
        data: "codepage=437,iocharset=ascii,shortname=mixed",
    })
    .map_err(|e| format!("mount the EFI partition read-write: {e}"))?;
    let result = change(target);
    crate::sys::fs::sync_all();
    if let Err(e) = mount::umount(target, false) {
        return Err(format!("the EFI partition stays mounted at {target}: {e}"));
    }
    result
}

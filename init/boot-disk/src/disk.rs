//! The boot disk's partitions by GPT name (from sysfs), and the ESP mounted read-write just for
//! one change: FAT has no journal, so it is mounted only while writing, then synced and
//! unmounted, keeping the window in which a power cut can hurt it short.

use crate::layout;
use std::ffi::CString;
use std::fs;
use std::io;

/// The kernel name (e.g. `vda3`) of the partition with this GPT name.
pub fn find_partition(name: &str) -> Option<String> {
    let mut entries: Vec<_> = fs::read_dir("/sys/class/block").ok()?.flatten().collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
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
    mount_esp(&device, target).map_err(|e| format!("mount the EFI partition read-write: {e}"))?;
    let result = change(target);
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    if let Err(e) = umount(target) {
        return Err(format!("the EFI partition stays mounted at {target}: {e}"));
    }
    result
}

fn c_string(text: &str) -> io::Result<CString> {
    CString::new(text).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{text:?} contains NUL")))
}

fn mount_esp(device: &str, target: &str) -> io::Result<()> {
    let (source, target, fstype) = (c_string(device)?, c_string(target)?, c_string("vfat")?);
    let data = c_string("codepage=437,iocharset=ascii,shortname=mixed")?;
    let flags = libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_SYNCHRONOUS;
    // SAFETY: every pointer comes from a live CString, which mount(2) only reads during the call.
    let ret = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn umount(target: &str) -> io::Result<()> {
    let path = c_string(target)?;
    // SAFETY: `path` is a live CString; umount2 only reads it.
    if unsafe { libc::umount2(path.as_ptr(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

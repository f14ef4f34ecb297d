//! The read-only system disk (ext4 labelled `oc-system`, built by the image pipeline) holds the
//! sandbox templates. On a disk-image boot it is the partition of the booted slot (both slots
//! carry the same label, so the slot's GPT name decides); otherwise the disk with that label. It
//! is mounted read-only; the appliance imports templates from it onto the data disk.

use crate::sys::mount::{self, Mount};
use std::fs::{self, File};
use std::io::Read;
use std::time::{Duration, Instant};

pub const MOUNT_POINT: &str = "/system";
pub const LABEL: &str = "oc-system";
/// ext4 superblock: starts at byte 1024; magic 0xEF53 at +56, volume label (16 bytes) at +120.
const SUPERBLOCK: usize = 1024;
const MAGIC_OFFSET: usize = SUPERBLOCK + 56;
const LABEL_OFFSET: usize = SUPERBLOCK + 120;
const LABEL_LEN: usize = 16;
/// Disks can appear a little after the drivers load.
const SEARCH_TIME: Duration = Duration::from_secs(5);

/// The ext4 label in a device's first bytes, if it holds an ext2/3/4 filesystem.
pub fn ext4_label(head: &[u8]) -> Option<String> {
    if head.len() < LABEL_OFFSET + LABEL_LEN || head[MAGIC_OFFSET] != 0x53 || head[MAGIC_OFFSET + 1] != 0xEF {
        return None;
    }
    let raw = &head[LABEL_OFFSET..LABEL_OFFSET + LABEL_LEN];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(LABEL_LEN);
    Some(String::from_utf8_lossy(&raw[..end]).into_owned())
}

pub fn mount_system(slot: Option<crate::boot::entry::Slot>) -> Result<String, String> {
    let device = match slot {
        Some(slot) => slot_device(slot)?,
        None => {
            find_device().ok_or_else(|| format!("no disk or partition with an ext4 filesystem labelled {LABEL}"))?
        }
    };
    fs::create_dir_all(MOUNT_POINT).map_err(|e| format!("cannot create {MOUNT_POINT}: {e}"))?;
    mount::mount(&Mount {
        source: &device,
        target: MOUNT_POINT,
        fstype: "ext4",
        flags: libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC,
        // noload: never replay a journal on a disk that must stay untouched.
        data: "noload",
    })
    .map_err(|e| e.to_string())?;
    Ok(device)
}

fn slot_device(slot: crate::boot::entry::Slot) -> Result<String, String> {
    let name = slot.partition_name();
    let device = crate::boot::disk::partition_path(name)?;
    let label = read_label(&device);
    if label.as_deref() != Some(LABEL) {
        return Err(format!(
            "partition {name} ({device}, slot {slot}) holds no ext4 filesystem labelled {LABEL} (found {label:?})"
        ));
    }
    Ok(device)
}

fn read_label(dev: &str) -> Option<String> {
    let mut head = Vec::with_capacity(LABEL_OFFSET + LABEL_LEN);
    File::open(dev).and_then(|f| f.take((LABEL_OFFSET + LABEL_LEN) as u64).read_to_end(&mut head)).ok()?;
    ext4_label(&head)
}

fn find_device() -> Option<String> {
    let deadline = Instant::now() + SEARCH_TIME;
    loop {
        if let Some(found) = scan() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scan() -> Option<String> {
    let mut names: Vec<String> = fs::read_dir("/sys/class/block")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().map(|name| format!("/dev/{name}")).find(|dev| read_label(dev).is_some_and(|label| label == LABEL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(label: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; 2048];
        head[MAGIC_OFFSET] = 0x53;
        head[MAGIC_OFFSET + 1] = 0xEF;
        head[LABEL_OFFSET..LABEL_OFFSET + label.len()].copy_from_slice(label);
        head
    }

    #[test]
    fn reads_the_label_of_an_ext4_superblock() {
        assert_eq!(ext4_label(&superblock(b"oc-system")).as_deref(), Some("oc-system"));
        assert_eq!(ext4_label(&superblock(b"sixteen-chars-xx")).as_deref(), Some("sixteen-chars-xx"));
    }

    #[test]
    fn rejects_non_ext4_and_short_input() {
        let mut head = superblock(b"oc-system");
        head[MAGIC_OFFSET] = 0;
        assert_eq!(ext4_label(&head), None);
        assert_eq!(ext4_label(&[0u8; 100]), None);
    }
}

//! The read-only system disk (ext4 labelled `oc-system`, built by the image pipeline) holds the
//! sandbox templates. On a disk-image boot it is the partition of the booted slot (both slots
//! carry the same label, so the slot's GPT name decides); otherwise the disk with that label. It
//! is mounted read-only; the appliance imports templates from it onto the data disk.

use crate::sys::mount::{self, Mount};
use boot_disk::entry::Slot;
use boot_disk::ext4;
use std::fs::{self, File};
use std::io::Read;
use std::time::{Duration, Instant};

pub const MOUNT_POINT: &str = "/system";
const LABEL: &str = ext4::SYSTEM_LABEL;
/// Disks can appear a little after the drivers load.
const SEARCH_TIME: Duration = Duration::from_secs(5);

pub fn mount_system(slot: Option<Slot>) -> Result<String, String> {
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

fn slot_device(slot: Slot) -> Result<String, String> {
    let name = slot.partition_name();
    let device = boot_disk::disk::partition_path(name)?;
    let label = read_label(&device);
    if label.as_deref() != Some(LABEL) {
        return Err(format!(
            "partition {name} ({device}, slot {slot}) holds no ext4 filesystem labelled {LABEL} (found {label:?})"
        ));
    }
    Ok(device)
}

fn read_label(dev: &str) -> Option<String> {
    let mut head = Vec::with_capacity(ext4::HEAD_LEN);
    File::open(dev).and_then(|f| f.take(ext4::HEAD_LEN as u64).read_to_end(&mut head)).ok()?;
    ext4::label(&head)
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

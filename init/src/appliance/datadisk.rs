//! The data disk: found, formatted with XFS on first boot if (and only if) it is blank, mounted
//! at /data. XFS because sandbox disks are reflink clones of their template (no byte copy).
//!
//! Which device: `oc.data=/dev/...` on the kernel command line, else the data partition that
//! bootdisk prepared on the boot disk (disk-image boots), else a partition named
//! `opencomputer-data`, else the first whole disk (virtio, NVMe, SATA) that has no partitions.
//! A data partition on the boot disk is grown with xfs_growfs after mounting, in case it grew.
//! A disk holding anything we do not recognise is never formatted.

use crate::sys::mount::{self, Mount};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;
use std::process::Command;

pub const MOUNT_POINT: &str = "/data";
pub const PARTITION_NAME: &str = "opencomputer-data";
const MKFS: &str = "/sbin/mkfs.xfs";
const GROWFS: &str = "/sbin/xfs_growfs";
/// Blank means: these first bytes are all zero (labels and signatures live here).
const BLANK_PROBE_BYTES: usize = 1 << 20;

#[derive(Debug, PartialEq, Eq)]
pub enum Content {
    Blank,
    Xfs,
    Other(&'static str),
}

/// Classifies the first bytes of a device.
pub fn classify(head: &[u8]) -> Content {
    if head.len() >= 4 && &head[..4] == b"XFSB" {
        return Content::Xfs;
    }
    if head.len() >= 520 && &head[512..520] == b"EFI PART" {
        return Content::Other("a GPT partition table");
    }
    if head.len() >= 1082 && head[1080] == 0x53 && head[1081] == 0xEF {
        return Content::Other("an ext2/3/4 filesystem");
    }
    if head.len() >= 512 && head[510] == 0x55 && head[511] == 0xAA {
        return Content::Other("an MBR partition table or boot sector");
    }
    if head.iter().all(|&b| b == 0) {
        Content::Blank
    } else {
        Content::Other("unrecognised data")
    }
}

/// Finds, prepares and mounts the data disk. Returns the device used.
pub fn mount_data(cmdline: &str, prepared: Option<&str>) -> Result<String, String> {
    let device = match crate::sys::fs::cmdline_value(cmdline, "oc.data").or(prepared) {
        Some(dev) => dev.to_string(),
        None => find_device().ok_or_else(|| {
            "no data disk found: attach a blank disk or a partition named opencomputer-data, or set oc.data=/dev/...".to_string()
        })?,
    };
    wait_for(&device)?;
    let head = read_head(&device).map_err(|e| format!("cannot read {device}: {e}"))?;
    match classify(&head) {
        Content::Xfs => {}
        Content::Blank => {
            crate::log!("{device} is blank: creating the data filesystem (first boot)");
            format(&device)?;
        }
        Content::Other(what) => {
            return Err(format!(
                "{device} holds {what}; refusing to format it. Wipe it or point oc.data= at the right disk"
            ))
        }
    }
    mount::mount(&Mount {
        source: &device,
        target: MOUNT_POINT,
        fstype: "xfs",
        flags: libc::MS_NOATIME | libc::MS_NODEV,
        data: "",
    })
    .map_err(|e| e.to_string())?;
    if prepared == Some(device.as_str()) {
        grow(&device);
    }
    Ok(device)
}

/// Grows the mounted XFS to its partition's size (a no-op when it already fills it). A failure
/// leaves the filesystem as it was, so it is reported, not fatal.
fn grow(device: &str) {
    match Command::new(GROWFS).arg(MOUNT_POINT).output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(line) = text.lines().find(|l| l.contains("data blocks changed")) {
                crate::log!("data filesystem on {device} grown: {}", line.trim());
            }
        }
        Ok(out) => crate::log!("{GROWFS} {MOUNT_POINT} failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => crate::log!("cannot run {GROWFS}: {e}"),
    }
}

fn format(device: &str) -> Result<(), String> {
    let output = Command::new(MKFS)
        .args(["-q", "-L", "ocdata", "-m", "reflink=1", device])
        .output()
        .map_err(|e| format!("cannot run {MKFS}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("{MKFS} {device} failed: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

fn read_head(device: &str) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(BLANK_PROBE_BYTES);
    File::open(device)?.take(BLANK_PROBE_BYTES as u64).read_to_end(&mut head)?;
    Ok(head)
}

/// Block devices appear asynchronously after their driver loads.
fn wait_for(device: &str) -> Result<(), String> {
    for _ in 0..100 {
        if Path::new(device).exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(format!("{device} did not appear within 10 s"))
}

fn find_device() -> Option<String> {
    for _ in 0..50 {
        if let Some(dev) = find_named_partition().or_else(find_whole_disk) {
            return Some(dev);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

fn find_named_partition() -> Option<String> {
    let entries = fs::read_dir("/sys/class/block").ok()?;
    entries.flatten().find_map(|entry| {
        let uevent = fs::read_to_string(entry.path().join("uevent")).ok()?;
        let named = uevent.lines().any(|l| l == format!("PARTNAME={PARTITION_NAME}"));
        named.then(|| format!("/dev/{}", entry.file_name().to_string_lossy()))
    })
}

fn find_whole_disk() -> Option<String> {
    let mut disks: Vec<String> = fs::read_dir("/sys/block")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| ["vd", "nvme", "sd", "xvd"].iter().any(|p| name.starts_with(p)))
        .collect();
    disks.sort();
    disks
        .into_iter()
        .find(|name| {
            let sys = Path::new("/sys/block").join(name);
            let removable = crate::sys::fs::read_trimmed(sys.join("removable")).is_ok_and(|v| v == "1");
            // A read-only disk (the system disk, a CD) can never hold the data.
            let read_only = crate::sys::fs::read_trimmed(sys.join("ro")).is_ok_and(|v| v == "1");
            let has_partitions = fs::read_dir(&sys)
                .is_ok_and(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(name.as_str())));
            !removable && !read_only && !has_partitions
        })
        .map(|name| format!("/dev/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_blank_xfs_and_foreign_content() {
        assert_eq!(classify(&vec![0u8; 4096]), Content::Blank);
        let mut xfs = vec![0u8; 4096];
        xfs[..4].copy_from_slice(b"XFSB");
        assert_eq!(classify(&xfs), Content::Xfs);
        let mut ext4 = vec![0u8; 4096];
        ext4[1080] = 0x53;
        ext4[1081] = 0xEF;
        assert!(matches!(classify(&ext4), Content::Other(w) if w.contains("ext")));
        let mut gpt = vec![0u8; 4096];
        gpt[512..520].copy_from_slice(b"EFI PART");
        gpt[510] = 0x55;
        gpt[511] = 0xAA;
        assert!(matches!(classify(&gpt), Content::Other(w) if w.contains("GPT")));
        let mut junk = vec![0u8; 4096];
        junk[4000] = 1;
        assert_eq!(classify(&junk), Content::Other("unrecognised data"));
    }
}

//! Grows the root ext4 filesystem to fill its disk. The appliance makes a sandbox's disk file
//! larger than its template when the create asks for `diskMB`; the kernel grows a mounted ext4
//! online (EXT4_IOC_RESIZE_FS), so no resize2fs is needed in the template.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// `_IOW('f', 16, __u64)` from the kernel's ext4 headers.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
const SECTOR: u64 = 512;

/// What growing did: the filesystem's size before and after, in bytes.
pub struct Grown {
    pub before: u64,
    pub after: u64,
}

/// Grows `/` to the size of the block device it lives on; a filesystem that already fills its
/// device is left alone.
pub fn grow() -> io::Result<Grown> {
    let root = std::fs::File::open("/")?;
    let dev = root.metadata()?.dev();
    let sysfs = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    let sectors: u64 = crate::sys::fs::read_trimmed(format!("{sysfs}/size"))?
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{sysfs}/size: {e}")))?;
    let uevent = crate::sys::fs::read_trimmed(format!("{sysfs}/uevent"))?;
    let name = uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{sysfs}/uevent names no device")))?;
    let device = std::fs::File::open(format!("/dev/{name}"))?;
    let (block_size, blocks_before) = superblock_size(&device)?;
    let mut blocks = sectors * SECTOR / block_size;
    let before = blocks_before * block_size;
    if blocks <= blocks_before {
        return Ok(Grown { before, after: before });
    }
    // SAFETY: `root` is an open descriptor for the rest of the call and the kernel reads one
    // u64 through the pointer, which points at `blocks`, alive on this stack frame.
    let ret = unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_RESIZE_FS, &raw mut blocks) };
    crate::sys::check(ret, || format!("grow the root filesystem to {blocks} blocks"))?;
    Ok(Grown { before, after: superblock_size(&device)?.1 * block_size })
}

/// Block size and block count from the ext4 superblock (1024 bytes into the device).
fn superblock_size(device: &std::fs::File) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 1024];
    device.read_exact_at(&mut sb, 1024)?;
    let u32_at = |o: usize| u64::from(u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]));
    if sb[0x38..0x3a] != [0x53, 0xef] {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "the root device holds no ext4 filesystem"));
    }
    let log_block_size = u32_at(0x18);
    if log_block_size > 6 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "ext4 superblock: block size out of range"));
    }
    let is_64bit = u32_at(0x60) & 0x80 != 0;
    let high = if is_64bit { u32_at(0x150) } else { 0 };
    Ok((1024 << log_block_size, high << 32 | u32_at(0x04)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn superblock_size_reads_what_mkfs_made() {
        let path = std::env::temp_dir().join(format!("oc-grow-root-{}.ext4", std::process::id()));
        let file = std::fs::File::create(&path).expect("create");
        file.set_len(64 << 20).expect("size");
        let made = Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096"]).arg(&path).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("mkfs.ext4 is not available here; skipping");
            let _ = std::fs::remove_file(&path);
            return;
        }
        let device = std::fs::File::open(&path).expect("open");
        assert_eq!(superblock_size(&device).expect("superblock"), (4096, (64 << 20) / 4096));
        let _ = std::fs::remove_file(&path);

        let not_ext4 = std::env::temp_dir().join(format!("oc-grow-root-{}.zero", std::process::id()));
        std::fs::write(&not_ext4, vec![0u8; 4096]).expect("write");
        let err = superblock_size(&std::fs::File::open(&not_ext4).expect("open")).expect_err("no ext4");
        assert!(err.to_string().contains("no ext4"), "{err}");
        let _ = std::fs::remove_file(&not_ext4);
    }
}

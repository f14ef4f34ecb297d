//! The GPT boot disk (booted with `oc.boot=disk`): on every boot, make sure the data partition
//! fills the free space at the end of the disk. First boot creates it; after the disk grew
//! (`qemu-img resize`, a bigger disk the image was copied to) it is grown and the backup GPT
//! moved to the new end. The table editing is pure (`plan`) and tested on files; the rest finds
//! the disk and tells the kernel.

use boot_disk::gpt::{self, Gpt, Guid, Partition, SECTOR};
use boot_disk::layout;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// XFS needs ~300 MiB; below 1 GiB a data partition is not worth creating.
pub const MIN_DATA_BYTES: u64 = 1 << 30;
/// What datadisk reads to decide that a partition is blank.
const WIPE_BYTES: u64 = 1 << 20;
/// The firmware loaded us from this disk, so it exists; NVMe and SATA probe asynchronously.
const SEARCH_TIME: Duration = Duration::from_secs(10);

/// What `plan` decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Unchanged { slot: usize },
    Created { slot: usize },
    Grown { slot: usize, old_last: u64 },
}

impl Change {
    pub fn slot(&self) -> usize {
        match self {
            Change::Unchanged { slot } | Change::Created { slot } | Change::Grown { slot, .. } => *slot,
        }
    }
}

/// Adds the data partition in the free space after the last partition, or extends it to the
/// last usable sector. The data partition must be the last one; it never shrinks or moves.
pub fn plan(table: &mut Gpt, disk_sectors: u64, new_guid: Guid) -> Result<Change, String> {
    let last_usable = gpt::last_usable(disk_sectors);
    if let Some((slot, data)) = table.find(layout::DATA_NAME) {
        let old_last = data.last_lba;
        if table.partitions().any(|(_, p)| p.first_lba > old_last) {
            return Err(format!(
                "the {} partition is not the last one on the disk; not resizing it",
                layout::DATA_NAME
            ));
        }
        if last_usable < old_last {
            return Err(format!(
                "the disk ({} MiB) is smaller than its {} partition; was it copied to a smaller disk?",
                (disk_sectors * SECTOR) >> 20,
                layout::DATA_NAME
            ));
        }
        if last_usable == old_last {
            return Ok(Change::Unchanged { slot });
        }
        if let Some(Some(p)) = table.slots.get_mut(slot) {
            p.last_lba = last_usable;
        }
        return Ok(Change::Grown { slot, old_last });
    }
    let first = gpt::align_up(table.end_of_partitions());
    let free = (last_usable + 1).saturating_sub(first) * SECTOR;
    if free < MIN_DATA_BYTES {
        return Err(format!(
            "only {} MiB are free at the end of the boot disk; the {} partition needs at least {} MiB. \
             Grow the disk (e.g. qemu-img resize, or copy the image to a bigger disk) and reboot",
            free >> 20,
            layout::DATA_NAME,
            MIN_DATA_BYTES >> 20
        ));
    }
    let slot = table.add(Partition {
        type_guid: gpt::LINUX_FS_TYPE,
        guid: new_guid,
        first_lba: first,
        last_lba: last_usable,
        attributes: 0,
        name: layout::DATA_NAME.into(),
    })?;
    Ok(Change::Created { slot })
}

/// Creates or grows the data partition on `disk` (a file or block device of `disk_sectors`) and
/// returns what changed; the table is rewritten (both copies) whenever anything changed or the
/// backup header is not at the end of the disk yet.
pub fn apply<F: Read + std::io::Write + std::io::Seek>(
    disk: &mut F,
    disk_sectors: u64,
    new_guid: Guid,
) -> Result<(Change, Gpt), String> {
    let (mut table, info) = Gpt::read_from(disk, disk_sectors)?;
    let change = plan(&mut table, disk_sectors, new_guid)?;
    if let (Change::Created { slot }, Some(Some(data))) = (&change, table.slots.get(change.slot())) {
        // The free space may hold stale bytes, e.g. the image's old backup GPT, which sits at the
        // start of the new partition after the disk grew. Zeroing the head makes the partition
        // blank, so datadisk formats it; nothing of ours can be there (it was not a partition).
        let head = WIPE_BYTES.min(data.size_bytes());
        let io = |e: std::io::Error| format!("clear the head of new partition {}: {e}", slot + 1);
        disk.seek(std::io::SeekFrom::Start(data.offset_bytes())).map_err(io)?;
        disk.write_all(&vec![0u8; head as usize]).map_err(io)?;
    }
    let backup_misplaced = info.alternate_lba != disk_sectors - 1 || info.my_lba != 1;
    if change != (Change::Unchanged { slot: change.slot() }) || backup_misplaced {
        table.write_to(disk, disk_sectors)?;
    }
    Ok((change, table))
}

/// The data partition prepared on the boot disk.
pub struct Prepared {
    pub device: String,
    pub change: Change,
    pub size_bytes: u64,
}

/// Finds the boot disk by its system partition and prepares the data partition on it.
pub fn prepare() -> Result<Prepared, String> {
    let disk = find_boot_disk()?;
    let path = format!("/dev/{disk}");
    let mut file =
        OpenOptions::new().read(true).write(true).open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
    let sector_size = ioctl_int(&file, BLKSSZGET).map_err(|e| format!("{path}: sector size: {e}"))?;
    if sector_size != SECTOR as i64 {
        return Err(format!(
            "{path} has {sector_size}-byte sectors; the image's partition table is for 512-byte sectors"
        ));
    }
    let bytes = ioctl_u64(&file, BLKGETSIZE64).map_err(|e| format!("{path}: size: {e}"))?;
    let (change, table) = apply(&mut file, bytes / SECTOR, random_guid()?).map_err(|e| format!("{path}: {e}"))?;
    file.sync_all().map_err(|e| format!("{path}: sync: {e}"))?;
    let slot = change.slot();
    let Some(Some(data)) = table.slots.get(slot) else {
        return Err(format!("{path}: the data partition vanished from the table"));
    };
    match change {
        Change::Created { .. } => tell_kernel(&file, BLKPG_ADD_PARTITION, slot, data),
        Change::Grown { .. } => tell_kernel(&file, BLKPG_RESIZE_PARTITION, slot, data),
        Change::Unchanged { .. } => Ok(()),
    }
    .map_err(|e| {
        format!(
            "{path}: the partition table is written, but the kernel was not told ({e}); it will see it after a reboot"
        )
    })?;
    Ok(Prepared { device: partition_device(&disk, slot + 1), change, size_bytes: data.size_bytes() })
}

/// The whole disk holding the partition named like system partition A.
fn find_boot_disk() -> Result<String, String> {
    let deadline = Instant::now() + SEARCH_TIME;
    loop {
        if let Some(part) = find_partition(layout::SYSTEM_A_NAME) {
            // /sys/class/block/vda2 -> .../block/vda/vda2: the parent directory is the disk.
            let real = fs::canonicalize(format!("/sys/class/block/{part}"))
                .map_err(|e| format!("resolve {part} in sysfs: {e}"))?;
            let disk = real.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
            return disk.ok_or_else(|| format!("cannot tell which disk holds {part}"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "booted from a disk image (oc.boot=disk), but no partition named {} appeared",
                layout::SYSTEM_A_NAME
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub use boot_disk::disk::find_partition;

/// `vda` + 4 -> `vda4`; `nvme0n1` + 4 -> `nvme0n1p4` (a name ending in a digit takes a `p`).
pub fn partition_device(disk: &str, number: usize) -> String {
    let sep = if disk.ends_with(|c: char| c.is_ascii_digit()) { "p" } else { "" };
    format!("/dev/{disk}{sep}{number}")
}

fn random_guid() -> Result<Guid, String> {
    let mut raw = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(|e| format!("read /dev/urandom: {e}"))?;
    Ok(Guid::from_random(raw))
}

// <linux/fs.h> and <linux/blkpg.h>.
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKPG: libc::c_ulong = 0x1269;
const BLKPG_ADD_PARTITION: libc::c_int = 1;
const BLKPG_RESIZE_PARTITION: libc::c_int = 3;

#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [libc::c_char; 64],
    volname: [libc::c_char; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

/// Adds or resizes one partition in the kernel's view of the disk, leaving the others alone.
///
/// Why this is safe: we only ever add the data partition in space no other partition uses (the
/// kernel refuses overlaps with EBUSY), or extend the data partition's end while its start stays
/// put, before anything has mounted it. BLKRRPART (re-read the whole table) would instead drop
/// and re-create every partition and fails while any of them is open.
fn tell_kernel(disk: &File, op: libc::c_int, slot: usize, p: &Partition) -> std::io::Result<()> {
    let too_big = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "partition beyond 8 EiB");
    let mut part = BlkpgPartition {
        start: i64::try_from(p.offset_bytes()).map_err(|_| too_big())?,
        length: i64::try_from(p.size_bytes()).map_err(|_| too_big())?,
        pno: i32::try_from(slot + 1).map_err(|_| too_big())?,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&raw mut part).cast(),
    };
    // SAFETY: `arg` and the `part` it points to are live, correctly laid out (#[repr(C)] as in
    // <linux/blkpg.h>) and outlive the call; the kernel only reads them.
    let ret = unsafe { libc::ioctl(disk.as_raw_fd(), BLKPG, &raw mut arg) };
    if ret == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_u64(file: &File, request: libc::c_ulong) -> std::io::Result<u64> {
    let mut value: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points at `value`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), request, &raw mut value) };
    if ret == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

fn ioctl_int(file: &File, request: libc::c_ulong) -> std::io::Result<i64> {
    let mut value: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the pointer, which points at `value`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), request, &raw mut value) };
    if ret == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(i64::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use boot_disk::gpt::{ALIGN, ESP_TYPE};
    use std::io::{Seek, SeekFrom, Write};

    const MIB_SECTORS: u64 = ALIGN;

    fn image_table() -> Gpt {
        let mut t = Gpt::new(Guid::from_random([1; 16]));
        for (i, (name, ty)) in [
            (layout::ESP_NAME, ESP_TYPE),
            (layout::SYSTEM_A_NAME, gpt::LINUX_FS_TYPE),
            (layout::SYSTEM_B_NAME, gpt::LINUX_FS_TYPE),
        ]
        .into_iter()
        .enumerate()
        {
            let first = MIB_SECTORS * (1 + 64 * i as u64);
            t.add(Partition {
                type_guid: ty,
                guid: Guid::from_random([i as u8; 16]),
                first_lba: first,
                last_lba: first + 64 * MIB_SECTORS - 1,
                attributes: 0,
                name: name.into(),
            })
            .expect("slot");
        }
        t
    }

    /// A sparse file holding the built image's table on a disk of `mib` MiB.
    fn image_file(name: &str, mib: u64) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("init-bootdisk-{}-{name}", std::process::id()));
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("create");
        let built_sectors = 194 * MIB_SECTORS;
        file.set_len(built_sectors * SECTOR).expect("size");
        image_table().write_to(&mut file, built_sectors).expect("write");
        file.set_len(mib * MIB_SECTORS * SECTOR).expect("grow");
        (path, file)
    }

    #[test]
    fn first_boot_creates_the_data_partition_and_moves_the_backup_header() {
        let (path, mut file) = image_file("create", 2048);
        let sectors = 2048 * MIB_SECTORS;
        let (change, _) = apply(&mut file, sectors, Guid::from_random([9; 16])).expect("apply");
        assert_eq!(change, Change::Created { slot: 3 });
        let (table, info) = Gpt::read_from(&mut file, sectors).expect("valid table");
        assert_eq!(info.alternate_lba, sectors - 1);
        let (_, data) = table.find(layout::DATA_NAME).expect("data partition");
        assert_eq!(data.first_lba, 193 * MIB_SECTORS);
        assert_eq!(data.last_lba, gpt::last_usable(sectors));
        // The image's old backup GPT was in what is now the partition's first MiB: wiped.
        let mut head = vec![1u8; WIPE_BYTES as usize];
        file.seek(SeekFrom::Start(data.offset_bytes())).expect("seek");
        file.read_exact(&mut head).expect("read");
        assert!(head.iter().all(|&b| b == 0), "the new partition starts blank");
        // The backup header really is in the last sector now.
        let mut last = [0u8; 8];
        file.seek(SeekFrom::Start((sectors - 1) * SECTOR)).expect("seek");
        file.read_exact(&mut last).expect("read");
        assert_eq!(&last, b"EFI PART");
        // The next boot changes nothing.
        let (again, _) = apply(&mut file, sectors, Guid::from_random([8; 16])).expect("apply");
        assert_eq!(again, Change::Unchanged { slot: 3 });
        let _ = fs::remove_file(path);
    }

    #[test]
    fn a_grown_disk_grows_the_data_partition_in_place() {
        let (path, mut file) = image_file("grow", 2048);
        apply(&mut file, 2048 * MIB_SECTORS, Guid::from_random([9; 16])).expect("create");
        file.set_len(3072 * MIB_SECTORS * SECTOR).expect("grow");
        let sectors = 3072 * MIB_SECTORS;
        let (change, table) = apply(&mut file, sectors, Guid::from_random([7; 16])).expect("grow");
        assert_eq!(change, Change::Grown { slot: 3, old_last: gpt::last_usable(2048 * MIB_SECTORS) });
        let (_, data) = table.find(layout::DATA_NAME).expect("data");
        assert_eq!((data.first_lba, data.last_lba), (193 * MIB_SECTORS, gpt::last_usable(sectors)));
        assert_eq!(Gpt::read_from(&mut file, sectors).expect("valid").0, table);
        let _ = fs::remove_file(path);
    }

    #[test]
    fn a_disk_without_room_is_refused_with_a_reason_and_left_alone() {
        let (path, mut file) = image_file("small", 194);
        let before = {
            let mut all = Vec::new();
            file.seek(SeekFrom::Start(0)).expect("seek");
            file.read_to_end(&mut all).expect("read");
            all
        };
        let error = apply(&mut file, 194 * MIB_SECTORS, Guid::from_random([9; 16])).unwrap_err();
        assert!(error.contains("Grow the disk"), "{error}");
        let mut after = Vec::new();
        file.seek(SeekFrom::Start(0)).expect("seek");
        file.read_to_end(&mut after).expect("read");
        assert!(before == after, "nothing written");
        file.flush().expect("flush");
        let _ = fs::remove_file(path);
    }

    #[test]
    fn partition_device_names() {
        assert_eq!(partition_device("vda", 4), "/dev/vda4");
        assert_eq!(partition_device("nvme0n1", 4), "/dev/nvme0n1p4");
        assert_eq!(partition_device("mmcblk0", 1), "/dev/mmcblk0p1");
    }
}

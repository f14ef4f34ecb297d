//! GUID partition tables (UEFI spec, chapter 5): encode and decode the protective MBR, the
//! primary and backup headers and their entry arrays, with CRC-32 checks. Pure data in and out
//! plus read/write on any seekable file, so the image build (writing a whole disk image) and
//! PID 1 (adding or growing the data partition at first boot) share one implementation and it
//! can be tested on plain files. 512-byte logical sectors only.

use crc32fast::hash as crc32;
use std::fmt;
use std::io::{Read, Seek, SeekFrom, Write};

pub const SECTOR: u64 = 512;
/// Entry slots in the array (the spec's minimum array size, what every tool writes).
pub const ENTRIES: usize = 128;
pub const ENTRY_SIZE: usize = 128;
/// Sectors the entry array occupies: 128 * 128 bytes = 16 KiB = 32 sectors.
pub const ENTRY_SECTORS: u64 = (ENTRIES * ENTRY_SIZE) as u64 / SECTOR;
/// Partitions start on 1 MiB boundaries, as partitioning tools do (good for any erase block).
pub const ALIGN: u64 = (1 << 20) / SECTOR;
const HEADER_SIZE: usize = 92;
const SIGNATURE: &[u8; 8] = b"EFI PART";
const REVISION_1_0: u32 = 0x0001_0000;
/// A name is 36 UTF-16 code units.
const NAME_UNITS: usize = 36;

/// A GUID in its on-disk byte order (first three fields little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    pub const fn from_fields(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
        let a = a.to_le_bytes();
        let b = b.to_le_bytes();
        let c = c.to_le_bytes();
        Guid([a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }

    /// A version-4 (random) GUID from 16 bytes of entropy or of a hash.
    pub fn from_random(mut raw: [u8; 16]) -> Guid {
        // Field c is stored little-endian: its high nibble (the version) is in byte 7.
        raw[7] = (raw[7] & 0x0F) | 0x40;
        raw[8] = (raw[8] & 0x3F) | 0x80;
        Guid(raw)
    }

    /// Parses the canonical text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub fn parse(text: &str) -> Result<Guid, String> {
        let bad = || format!("{text:?} is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)");
        let groups: Vec<&str> = text.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lens != [8, 4, 4, 4, 12] || !text.chars().all(|c| c == '-' || c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let hex: String = groups.concat();
        let mut big = [0u8; 16];
        for (i, byte) in big.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let a = u32::from_be_bytes([big[0], big[1], big[2], big[3]]);
        let b = u16::from_be_bytes([big[4], big[5]]);
        let c = u16::from_be_bytes([big[6], big[7]]);
        let mut d = [0u8; 8];
        d.copy_from_slice(&big[8..]);
        Ok(Guid::from_fields(a, b, c, d))
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
            u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
            u16::from_le_bytes([g[4], g[5]]),
            u16::from_le_bytes([g[6], g[7]]),
            g[8],
            g[9],
            g[10],
            g[11],
            g[12],
            g[13],
            g[14],
            g[15]
        )
    }
}

/// EFI system partition.
pub const ESP_TYPE: Guid =
    Guid::from_fields(0xC12A_7328, 0xF81F, 0x11D2, [0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B]);
/// Linux filesystem data.
pub const LINUX_FS_TYPE: Guid =
    Guid::from_fields(0x0FC6_3DAF, 0x8483, 0x4772, [0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4]);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub type_guid: Guid,
    pub guid: Guid,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

impl Partition {
    pub fn sectors(&self) -> u64 {
        self.last_lba + 1 - self.first_lba
    }

    pub fn size_bytes(&self) -> u64 {
        self.sectors() * SECTOR
    }

    pub fn offset_bytes(&self) -> u64 {
        self.first_lba * SECTOR
    }
}

/// The first sector a partition may use: after the MBR, the header and the entry array.
pub const fn first_usable() -> u64 {
    2 + ENTRY_SECTORS
}

/// The last sector a partition may use: before the backup entry array and backup header.
pub fn last_usable(disk_sectors: u64) -> u64 {
    disk_sectors.saturating_sub(2 + ENTRY_SECTORS)
}

/// `lba` rounded up to the partition alignment.
pub fn align_up(lba: u64) -> u64 {
    lba.div_ceil(ALIGN) * ALIGN
}

/// The table: a disk GUID and 128 slots (slot i is partition number i + 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpt {
    pub disk_guid: Guid,
    pub slots: Vec<Option<Partition>>,
}

/// What a read found besides the table, to tell whether it needs rewriting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderInfo {
    pub my_lba: u64,
    pub alternate_lba: u64,
    pub last_usable_lba: u64,
}

impl Gpt {
    pub fn new(disk_guid: Guid) -> Gpt {
        Gpt { disk_guid, slots: vec![None; ENTRIES] }
    }

    /// Puts `partition` in the first free slot; returns the slot.
    pub fn add(&mut self, partition: Partition) -> Result<usize, String> {
        let slot = self.slots.iter().position(Option::is_none).ok_or("all 128 partition slots are in use")?;
        self.slots[slot] = Some(partition);
        Ok(slot)
    }

    pub fn partitions(&self) -> impl Iterator<Item = (usize, &Partition)> {
        self.slots.iter().enumerate().filter_map(|(i, p)| p.as_ref().map(|p| (i, p)))
    }

    pub fn find(&self, name: &str) -> Option<(usize, &Partition)> {
        self.partitions().find(|(_, p)| p.name == name)
    }

    /// The sector after the last partition's end (first_usable() on an empty table).
    pub fn end_of_partitions(&self) -> u64 {
        self.partitions().map(|(_, p)| p.last_lba + 1).max().unwrap_or(first_usable())
    }

    /// Every partition inside the usable area of a `disk_sectors` disk, none overlapping.
    pub fn validate(&self, disk_sectors: u64) -> Result<(), String> {
        if disk_sectors < 2 * (2 + ENTRY_SECTORS) + 1 {
            return Err(format!("a disk of {disk_sectors} sectors is too small for a GPT"));
        }
        let (low, high) = (first_usable(), last_usable(disk_sectors));
        let mut spans: Vec<(u64, u64, &str)> = Vec::new();
        for (slot, p) in self.partitions() {
            let what = format!("partition {} ({:?})", slot + 1, p.name);
            if p.type_guid.is_zero() {
                return Err(format!("{what} has no type GUID"));
            }
            if p.first_lba > p.last_lba || p.first_lba < low || p.last_lba > high {
                return Err(format!(
                    "{what} spans sectors {}..={}, outside the usable {low}..={high}",
                    p.first_lba, p.last_lba
                ));
            }
            if p.name.encode_utf16().count() > NAME_UNITS {
                return Err(format!("{what}: the name is longer than {NAME_UNITS} UTF-16 units"));
            }
            spans.push((p.first_lba, p.last_lba, &p.name));
        }
        spans.sort_unstable();
        for pair in spans.windows(2) {
            if pair[1].0 <= pair[0].1 {
                return Err(format!("partitions {:?} and {:?} overlap", pair[0].2, pair[1].2));
            }
        }
        Ok(())
    }

    /// The entry array as stored on disk.
    pub fn entry_array(&self) -> Vec<u8> {
        let mut array = vec![0u8; ENTRIES * ENTRY_SIZE];
        for (slot, p) in self.partitions() {
            let e = &mut array[slot * ENTRY_SIZE..(slot + 1) * ENTRY_SIZE];
            e[0..16].copy_from_slice(&p.type_guid.0);
            e[16..32].copy_from_slice(&p.guid.0);
            e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
            e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
            e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
            for (i, unit) in p.name.encode_utf16().take(NAME_UNITS).enumerate() {
                e[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
            }
        }
        array
    }

    fn header(
        &self,
        disk_sectors: u64,
        my_lba: u64,
        alternate_lba: u64,
        entries_lba: u64,
        entries_crc: u32,
    ) -> Vec<u8> {
        let mut h = vec![0u8; SECTOR as usize];
        h[0..8].copy_from_slice(SIGNATURE);
        h[8..12].copy_from_slice(&REVISION_1_0.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
        h[40..48].copy_from_slice(&first_usable().to_le_bytes());
        h[48..56].copy_from_slice(&last_usable(disk_sectors).to_le_bytes());
        h[56..72].copy_from_slice(&self.disk_guid.0);
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
        h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32(&h[..HEADER_SIZE]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// (bytes for sector 0 onwards, bytes for the backup area, the backup area's byte offset).
    pub fn encode(&self, disk_sectors: u64) -> Result<(Vec<u8>, Vec<u8>, u64), String> {
        self.validate(disk_sectors)?;
        let last = disk_sectors - 1;
        let array = self.entry_array();
        let entries_crc = crc32(&array);
        let mut primary = protective_mbr(disk_sectors);
        primary.extend(self.header(disk_sectors, 1, last, 2, entries_crc));
        primary.extend_from_slice(&array);
        let backup_entries_lba = last - ENTRY_SECTORS;
        let mut backup = array;
        backup.extend(self.header(disk_sectors, last, 1, backup_entries_lba, entries_crc));
        Ok((primary, backup, backup_entries_lba * SECTOR))
    }

    /// Writes the protective MBR, both headers and both arrays (nothing else on the disk).
    pub fn write_to<W: Write + Seek>(&self, disk: &mut W, disk_sectors: u64) -> Result<(), String> {
        let (primary, backup, backup_offset) = self.encode(disk_sectors)?;
        let io = |e: std::io::Error| format!("writing the partition table: {e}");
        // Backup first: if we are cut off half-way, the primary still describes the old layout
        // consistently and readers prefer it.
        disk.seek(SeekFrom::Start(backup_offset)).map_err(io)?;
        disk.write_all(&backup).map_err(io)?;
        disk.seek(SeekFrom::Start(0)).map_err(io)?;
        disk.write_all(&primary).map_err(io)?;
        disk.flush().map_err(io)
    }

    /// Reads the table of a `disk_sectors` disk: the primary if its CRCs check, else the backup
    /// in the last sector.
    pub fn read_from<R: Read + Seek>(disk: &mut R, disk_sectors: u64) -> Result<(Gpt, HeaderInfo), String> {
        let primary =
            read_at(disk, SECTOR, SECTOR as usize).and_then(|h| decode_header(&h, 1)).and_then(|h| read_table(disk, h));
        match primary {
            Ok(found) => Ok(found),
            Err(primary_error) => {
                let last = disk_sectors.checked_sub(1).ok_or("empty disk")?;
                read_at(disk, last * SECTOR, SECTOR as usize)
                    .and_then(|h| decode_header(&h, last))
                    .and_then(|h| read_table(disk, h))
                    .map_err(|backup_error| format!("no valid GPT: primary: {primary_error}; backup: {backup_error}"))
            }
        }
    }
}

struct Header {
    info: HeaderInfo,
    disk_guid: Guid,
    entries_lba: u64,
    count: usize,
    entries_crc: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn decode_header(sector: &[u8], expected_lba: u64) -> Result<Header, String> {
    if sector.len() < HEADER_SIZE || &sector[0..8] != SIGNATURE {
        return Err(format!("no GPT signature in sector {expected_lba}"));
    }
    let size = le32(sector, 12) as usize;
    if !(HEADER_SIZE..=sector.len()).contains(&size) {
        return Err(format!("GPT header size {size} is invalid"));
    }
    let mut copy = sector[..size].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != le32(sector, 16) {
        return Err(format!("GPT header in sector {expected_lba} fails its CRC check"));
    }
    let my_lba = le64(sector, 24);
    if my_lba != expected_lba {
        return Err(format!("GPT header in sector {expected_lba} says it is in sector {my_lba}"));
    }
    let count = le32(sector, 80) as usize;
    let entry_size = le32(sector, 84) as usize;
    if count != ENTRIES || entry_size != ENTRY_SIZE {
        return Err(format!(
            "unsupported GPT layout: {count} entries of {entry_size} bytes (expected {ENTRIES} of {ENTRY_SIZE})"
        ));
    }
    let mut disk_guid = Guid::ZERO;
    disk_guid.0.copy_from_slice(&sector[56..72]);
    Ok(Header {
        info: HeaderInfo { my_lba, alternate_lba: le64(sector, 32), last_usable_lba: le64(sector, 48) },
        disk_guid,
        entries_lba: le64(sector, 72),
        count,
        entries_crc: le32(sector, 88),
    })
}

fn read_table<R: Read + Seek>(disk: &mut R, header: Header) -> Result<(Gpt, HeaderInfo), String> {
    let array = read_at(disk, header.entries_lba.saturating_mul(SECTOR), header.count * ENTRY_SIZE)?;
    if crc32(&array) != header.entries_crc {
        return Err(format!("the GPT entry array at sector {} fails its CRC check", header.entries_lba));
    }
    let mut gpt = Gpt::new(header.disk_guid);
    for (slot, e) in array.chunks_exact(ENTRY_SIZE).enumerate() {
        let mut type_guid = Guid::ZERO;
        type_guid.0.copy_from_slice(&e[0..16]);
        if type_guid.is_zero() {
            continue;
        }
        let mut guid = Guid::ZERO;
        guid.0.copy_from_slice(&e[16..32]);
        let (first_lba, last_lba) = (le64(e, 32), le64(e, 40));
        // Readers size and place partitions in bytes before validating them against a disk
        // (`offset_bytes() + size_bytes()`), so a reversed range or one ending beyond 2^64 bytes
        // is a malformed table, not a partition.
        if first_lba > last_lba || last_lba >= u64::MAX / SECTOR {
            return Err(format!("GPT entry {} spans the invalid sector range {first_lba}..={last_lba}", slot + 1));
        }
        let units: Vec<u16> =
            e[56..128].chunks_exact(2).map(|u| u16::from_le_bytes([u[0], u[1]])).take_while(|&u| u != 0).collect();
        gpt.slots[slot] = Some(Partition {
            type_guid,
            guid,
            first_lba,
            last_lba,
            attributes: le64(e, 48),
            name: String::from_utf16_lossy(&units),
        });
    }
    Ok((gpt, header.info))
}

fn read_at<R: Read + Seek>(disk: &mut R, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    disk.seek(SeekFrom::Start(offset)).map_err(|e| format!("seek to byte {offset}: {e}"))?;
    disk.read_exact(&mut buf).map_err(|e| format!("read {len} bytes at byte {offset}: {e}"))?;
    Ok(buf)
}

/// Sector 0: one partition of type 0xEE covering the disk, so MBR-only tools see it as in use.
fn protective_mbr(disk_sectors: u64) -> Vec<u8> {
    let mut mbr = vec![0u8; SECTOR as usize];
    let record = &mut mbr[446..462];
    record[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of sector 1
    record[4] = 0xEE;
    record[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]); // CHS "beyond addressable"
    record[8..12].copy_from_slice(&1u32.to_le_bytes());
    let size = u32::try_from(disk_sectors - 1).unwrap_or(u32::MAX);
    record[12..16].copy_from_slice(&size.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    mbr
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const DISK: u64 = 64 * ALIGN; // 64 MiB

    fn part(name: &str, first: u64, last: u64) -> Partition {
        Partition {
            type_guid: LINUX_FS_TYPE,
            guid: Guid::from_random([7; 16]),
            first_lba: first,
            last_lba: last,
            attributes: 0,
            name: name.into(),
        }
    }

    fn sample() -> Gpt {
        let mut gpt = Gpt::new(Guid::parse("5A1DB0C5-0C0C-4E1E-9B2A-0A7C0FFEE0AA").expect("guid"));
        let mut esp = part("esp", ALIGN, 9 * ALIGN - 1);
        esp.type_guid = ESP_TYPE;
        gpt.add(esp).expect("add");
        gpt.add(part("oc-system-a", 9 * ALIGN, 20 * ALIGN - 1)).expect("add");
        gpt
    }

    fn disk_with(gpt: &Gpt, sectors: u64) -> Cursor<Vec<u8>> {
        let mut disk = Cursor::new(vec![0u8; (sectors * SECTOR) as usize]);
        gpt.write_to(&mut disk, sectors).expect("write");
        disk
    }

    #[test]
    fn guid_text_round_trips_in_mixed_endian_order() {
        assert_eq!(ESP_TYPE.to_string(), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(&ESP_TYPE.0[..4], &[0x28, 0x73, 0x2A, 0xC1]);
        assert_eq!(Guid::parse("0fc63daf-8483-4772-8e79-3d69d8477de4"), Ok(LINUX_FS_TYPE));
        assert!(Guid::parse("0fc63daf-8483-4772-8e79-3d69d8477de").is_err());
        assert!(Guid::parse("0fc63daf-8483-4772-8e79-3d69d8477dez").is_err());
        let random = Guid::from_random([0xFF; 16]).to_string();
        assert_eq!(&random[14..15], "4", "version 4: {random}");
    }

    #[test]
    fn headers_and_entry_array_carry_valid_crcs() {
        let disk = disk_with(&sample(), DISK).into_inner();
        let header = &disk[512..1024];
        assert_eq!(&header[..8], b"EFI PART");
        let mut zeroed = header[..92].to_vec();
        zeroed[16..20].fill(0);
        assert_eq!(crc32(&zeroed), le32(header, 16));
        assert_eq!(crc32(&disk[1024..1024 + 16384]), le32(header, 88));
        assert_eq!(&disk[510..512], &[0x55, 0xAA]);
        assert_eq!(disk[446 + 4], 0xEE);
    }

    #[test]
    fn backup_header_is_in_the_last_sector_and_points_back() {
        let disk = disk_with(&sample(), DISK).into_inner();
        let last = DISK - 1;
        let backup = &disk[(last * SECTOR) as usize..];
        assert_eq!(&backup[..8], b"EFI PART");
        assert_eq!(le64(backup, 24), last);
        assert_eq!(le64(backup, 32), 1);
        assert_eq!(le64(backup, 72), last - ENTRY_SECTORS);
        assert_eq!(le64(&disk[512..], 32), last, "primary's alternate LBA");
        assert_eq!(le64(&disk[512..], 48), last_usable(DISK));
        let array_at = ((last - ENTRY_SECTORS) * SECTOR) as usize;
        assert_eq!(&disk[array_at..array_at + 16384], &disk[1024..1024 + 16384]);
    }

    #[test]
    fn round_trips_and_falls_back_to_the_backup() {
        let gpt = sample();
        let mut disk = disk_with(&gpt, DISK);
        let (read, info) = Gpt::read_from(&mut disk, DISK).expect("read");
        assert_eq!(read, gpt);
        assert_eq!(info, HeaderInfo { my_lba: 1, alternate_lba: DISK - 1, last_usable_lba: last_usable(DISK) });
        disk.get_mut()[600] ^= 0xFF; // corrupt the primary header
        let (from_backup, info) = Gpt::read_from(&mut disk, DISK).expect("backup");
        assert_eq!(from_backup, gpt);
        assert_eq!(info.my_lba, DISK - 1);
        disk.get_mut()[((DISK - 1) * SECTOR + 40) as usize] ^= 0xFF; // and the backup header
        let error = Gpt::read_from(&mut disk, DISK).unwrap_err();
        assert!(error.contains("CRC"), "{error}");
    }

    #[test]
    fn a_corrupt_entry_array_is_detected() {
        let mut disk = disk_with(&sample(), DISK);
        disk.get_mut()[1024 + 130] ^= 1;
        let primary_only =
            Gpt::read_from(&mut Cursor::new(disk.get_ref()[..(DISK * SECTOR / 2) as usize].to_vec()), DISK / 2);
        assert!(primary_only.is_err());
    }

    /// Sets the sector range of slot 0 in both entry arrays and fixes every CRC, as a forged
    /// image would.
    fn forge_first_entry(disk: &mut [u8], first: u64, last: u64) {
        for header_at in [SECTOR as usize, ((DISK - 1) * SECTOR) as usize] {
            let array_at = (le64(&disk[header_at..], 72) * SECTOR) as usize;
            disk[array_at + 32..array_at + 40].copy_from_slice(&first.to_le_bytes());
            disk[array_at + 40..array_at + 48].copy_from_slice(&last.to_le_bytes());
            let entries_crc = crc32(&disk[array_at..array_at + ENTRIES * ENTRY_SIZE]);
            disk[header_at + 88..header_at + 92].copy_from_slice(&entries_crc.to_le_bytes());
            disk[header_at + 16..header_at + 20].fill(0);
            let header_crc = crc32(&disk[header_at..header_at + HEADER_SIZE]);
            disk[header_at + 16..header_at + 20].copy_from_slice(&header_crc.to_le_bytes());
        }
    }

    /// Found by the `gpt` fuzz target: an entry whose sectors lie beyond 2^64 bytes (here the
    /// fuzzer's own values) or end before they start was returned as a partition, and sizing it
    /// (`offset_bytes() + size_bytes()`, as the upgrade check does) overflowed.
    #[test]
    fn entries_with_impossible_sector_ranges_are_refused() {
        for (first, last) in [(3_242_700_585_220_177_920, 8_358_807_354_266_907_392), (40, 39), (0, u64::MAX)] {
            let mut disk = disk_with(&sample(), DISK);
            forge_first_entry(disk.get_mut(), first, last);
            let error = Gpt::read_from(&mut disk, DISK).unwrap_err();
            assert!(error.contains("invalid sector range"), "{error}");
        }
        // The forging itself keeps a sane range readable.
        let mut disk = disk_with(&sample(), DISK);
        forge_first_entry(disk.get_mut(), ALIGN, 2 * ALIGN);
        let (table, _) = Gpt::read_from(&mut disk, DISK).expect("valid");
        let esp = table.slots[0].as_ref().expect("slot 0");
        assert_eq!((esp.first_lba, esp.last_lba), (ALIGN, 2 * ALIGN));
    }

    #[test]
    fn overlapping_or_out_of_range_partitions_are_refused() {
        let mut gpt = sample();
        gpt.add(part("overlap", 19 * ALIGN, 21 * ALIGN)).expect("slot");
        assert!(gpt.validate(DISK).unwrap_err().contains("overlap"));
        let mut gpt = sample();
        gpt.add(part("too-far", 21 * ALIGN, DISK - 1)).expect("slot");
        assert!(gpt.validate(DISK).unwrap_err().contains("outside"));
        assert!(Gpt::new(Guid::ZERO).validate(10).is_err());
    }
}

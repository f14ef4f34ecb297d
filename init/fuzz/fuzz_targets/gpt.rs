//! GUID partition tables read from an uploaded disk image (`Gpt::read_from`): the primary
//! header and entry array, falling back to the backup header in the last sector. Nothing may
//! panic; every partition of a table that reads can be sized and located without overflow (the
//! appliance does `offset_bytes() + size_bytes()` on them before validating), and a table that
//! validates writes out and reads back unchanged.
//! Input: byte 0 holds flags, byte 1 extra disk sectors, the rest is laid over the image from
//! sector 1 (the primary header, then the entry array). Flags: bit 0 also copies the header
//! sector into the last sector (the backup), bit 1 breaks the primary's signature, bit 2 fixes
//! each header's entry-array CRC and bit 3 its header CRC, so the fuzzer gets past them.
#![no_main]

use boot_disk::gpt::{Gpt, ENTRIES, ENTRY_SIZE, SECTOR};
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;

/// Enough sectors for both headers and both entry arrays.
const MIN_SECTORS: u64 = 2 * (2 + (ENTRIES * ENTRY_SIZE) as u64 / SECTOR) + 1;

/// The `N` bytes of a header field at `at`, for `from_le_bytes`.
fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut v = [0u8; N];
    v.copy_from_slice(&b[at..at + N]);
    v
}

/// Recomputes the CRCs of the header at sector `lba` as the flags ask.
fn fix_crcs(image: &mut [u8], lba: u64, flags: u8) {
    let at = (lba * SECTOR) as usize;
    if flags & 4 != 0 {
        let array_at = u64::from_le_bytes(field(&image[at..], 72)).saturating_mul(SECTOR);
        let array_len = (ENTRIES * ENTRY_SIZE) as u64;
        if array_at.saturating_add(array_len) <= image.len() as u64 {
            let start = array_at as usize;
            let crc = crc32(&image[start..start + array_len as usize]);
            image[at + 88..at + 92].copy_from_slice(&crc.to_le_bytes());
        }
    }
    if flags & 8 != 0 {
        let size = u32::from_le_bytes(field(&image[at..], 12)) as usize;
        if (92..=SECTOR as usize).contains(&size) {
            let mut header = image[at..at + size].to_vec();
            header[16..20].fill(0);
            let crc = crc32(&header);
            image[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (flags, extra, body) = (data[0], u64::from(data[1]), &data[2..]);
    let body_sectors = (body.len() as u64).div_ceil(SECTOR) + 1;
    let sectors = MIN_SECTORS.max(body_sectors) + extra;
    let mut image = vec![0u8; (sectors * SECTOR) as usize];
    let last = sectors - 1;
    image[SECTOR as usize..SECTOR as usize + body.len()].copy_from_slice(body);
    if flags & 1 != 0 {
        let header = body.len().min(SECTOR as usize);
        let at = (last * SECTOR) as usize;
        image[at..at + header].copy_from_slice(&body[..header]);
        fix_crcs(&mut image, last, flags);
    }
    fix_crcs(&mut image, 1, flags);
    if flags & 2 != 0 {
        image[SECTOR as usize] ^= 0xFF;
    }

    let Ok((table, info)) = Gpt::read_from(&mut Cursor::new(&image), sectors) else { return };
    assert!(info.my_lba == 1 || info.my_lba == last);
    assert_eq!(table.slots.len(), ENTRIES);
    for (_, p) in table.partitions() {
        // What the upgrade check does before anything else.
        let end = p.offset_bytes().checked_add(p.size_bytes()).expect("partition end overflows");
        assert!(end > p.offset_bytes());
        assert_eq!(p.sectors() * SECTOR, p.size_bytes());
    }
    let _ = table.end_of_partitions();
    if table.validate(sectors).is_ok() {
        let mut disk = Cursor::new(vec![0u8; image.len()]);
        table.write_to(&mut disk, sectors).expect("a valid table writes");
        let (again, _) = Gpt::read_from(&mut disk, sectors).expect("a written table reads");
        assert_eq!(again, table);
    }
});

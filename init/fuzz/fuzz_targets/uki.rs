//! The PE32+ section table of a unified kernel image from an uploaded disk (`pe::sections`,
//! `Uki::parse`), its os-release and slot, re-pointing its command line at the other slot
//! (`Uki::retarget`) and the PE checksum. Nothing may panic; a retargeted image must still
//! parse, name the new slot and carry a checksum that verifies.
//! Input: the PE file.
#![no_main]

use boot_disk::entry::VERSION_KEY;
use boot_disk::pe::{checksum, sections, set_checksum, Uki};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(list) = sections(data) {
        for s in &list {
            assert!(s.offset + s.len <= data.len());
        }
    }
    let mut copy = data.to_vec();
    if set_checksum(&mut copy).is_ok() {
        let field = u32::from_le_bytes([copy[0x3C], copy[0x3D], copy[0x3E], copy[0x3F]]) as usize + 24 + 64;
        let stored = u32::from_le_bytes([copy[field], copy[field + 1], copy[field + 2], copy[field + 3]]);
        assert_eq!(stored, checksum(&copy, field));
    }

    let Ok(uki) = Uki::parse(data) else { return };
    let _ = uki.os_release_value(VERSION_KEY);
    let Some(slot) = uki.slot() else { return };
    let mut pe = data.to_vec();
    if uki.retarget(&mut pe, slot.other()).is_ok() {
        let again = Uki::parse(&pe).expect("a retargeted image still parses");
        assert_eq!(again.slot(), Some(slot.other()), "retargeted {:?}", uki.cmdline);
        assert_eq!(pe.len(), data.len());
    }
});

//! The FAT32 reader on an arbitrary filesystem image (`Fat::open`, `list`, `lookup`,
//! `read_file`), walked the way the upgrade check does: the root, `EFI/Linux`, every file
//! there read with a size limit. Nothing may panic, loop forever or allocate beyond a bound
//! (cluster chains that loop, directories without end, sizes that lie).
//! Input: the filesystem image (it starts at byte 0).
#![no_main]

use boot_disk::entry;
use boot_disk::fat::Fat;
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;

const LIMIT: u64 = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Ok(mut fat) = Fat::open(Cursor::new(data), 0) else { return };
    for dir in ["", "EFI", entry::ENTRIES_DIR] {
        let Ok(listing) = fat.list(dir) else { continue };
        let names: Vec<&str> = listing.iter().map(|e| e.name.as_str()).collect();
        let _ = entry::from_names(names);
        for e in listing.iter().take(16) {
            let path = format!("{dir}/{}", e.name);
            if e.is_dir {
                let _ = fat.list(&path);
                continue;
            }
            let found = fat.lookup(&path);
            if let Ok(content) = fat.read_file(&path, LIMIT) {
                // Names may repeat in a damaged directory (or contain '/'): the file read is
                // the one lookup finds, not necessarily `e`.
                let found = found.ok().flatten().expect("read_file read what lookup did not find");
                assert!(!found.is_dir);
                assert!(content.len() as u64 <= LIMIT);
                assert_eq!(content.len(), found.size as usize);
            }
        }
    }
    let _ = fat.lookup("EFI/BOOT/BOOTX64.EFI");
    let _ = fat.read_file("opencomputer.conf", LIMIT);
});

//! Boot entry names as listed in `EFI/Linux` of an uploaded or the live ESP (`entry::from_names`,
//! `Entry::parse`) and what is derived from them (boot order, next generation, current entry),
//! plus the kernel command line's slot (`Slot::from_cmdline`). Nothing may panic; a parsed
//! entry's canonical file name parses back to the same entry.
//! Input: newline-separated file names (lossy UTF-8).
#![no_main]

use boot_disk::entry::{self, Entry, Slot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = Slot::from_cmdline(&text);
    let entries = entry::from_names(text.lines());
    for e in &entries {
        let name = e.file_name();
        assert_eq!(Entry::parse(&name).as_ref(), Some(e), "{name}");
        assert_eq!(Entry::parse(&e.path()), None, "a path is not a file name");
        let blessed = e.blessed();
        assert!(!blessed.is_trial());
        assert_eq!(Entry::parse(&blessed.file_name()), Some(blessed));
    }
    let order = entry::boot_order(&entries);
    assert_eq!(order.len(), entries.len());
    for pair in order.windows(2) {
        assert!(pair[0].is_bad() <= pair[1].is_bad());
    }
    let next = entry::next_generation(&entries);
    assert!(entries.iter().all(|e| e.generation < next || next == u32::MAX));
    for slot in [Slot::A, Slot::B] {
        if let Some(current) = entry::current_for(&entries, slot) {
            assert_eq!(current.slot, slot);
        }
    }
});

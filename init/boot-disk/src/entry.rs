//! Boot entries: one unified kernel image per system slot in `EFI/Linux/` on the ESP, named
//! `opencomputer-<generation>-<slot>.efi`. A staged upgrade carries systemd-boot's boot counter
//! (`...+<left>.efi`, then `+<left>-<done>.efi` as systemd-boot counts attempts); committing
//! drops the counter. systemd-boot 252 sorts entries with no tries left last, the rest (same
//! os-release ID, no version) by file name, descending version-wise: so the highest generation
//! that still has tries boots first, and an upgrade that used up its tries falls back to the
//! previous generation with no NVRAM writes.

use std::fmt;

/// Where systemd-boot looks for Type #2 entries (unified kernel images).
pub const ENTRIES_DIR: &str = "EFI/Linux";
pub const PREFIX: &str = "opencomputer-";
/// Attempts a freshly staged upgrade gets before systemd-boot falls back.
pub const DEFAULT_TRIES: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn parse(text: &str) -> Option<Slot> {
        match text {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }

    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The GPT name of this slot's system partition.
    pub fn partition_name(self) -> &'static str {
        match self {
            Slot::A => crate::layout::SYSTEM_A_NAME,
            Slot::B => crate::layout::SYSTEM_B_NAME,
        }
    }

    /// The slot a kernel command line names (`oc.slot=`; the last one wins, as in the kernel).
    pub fn from_cmdline(cmdline: &str) -> Option<Slot> {
        let value =
            cmdline.split_whitespace().filter_map(|word| word.strip_prefix(SLOT_KEY)?.strip_prefix('=')).next_back();
        value.and_then(Slot::parse)
    }

    /// On the unified kernel image's command line: which system partition init mounts.
    pub fn cmdline_arg(self) -> String {
        format!("{}={}", SLOT_KEY, self.letter())
    }
}

pub const SLOT_KEY: &str = "oc.slot";
/// The os-release key carrying an image's version (see image/src/uki.rs for why not VERSION_ID).
pub const VERSION_KEY: &str = "OPENCOMPUTER_VERSION";

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.letter())
    }
}

/// systemd-boot's counter: tries left and (once counted) tries done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tries {
    pub left: u32,
    pub done: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub generation: u32,
    pub slot: Slot,
    /// None: committed (blessed); Some: a trial boot still being counted.
    pub tries: Option<Tries>,
}

impl Entry {
    pub fn new(generation: u32, slot: Slot, tries: Option<u32>) -> Entry {
        Entry { generation, slot, tries: tries.map(|left| Tries { left, done: None }) }
    }

    /// Parses `opencomputer-7-b+2-1.efi`; None for any other file.
    pub fn parse(file_name: &str) -> Option<Entry> {
        let lower = file_name.to_ascii_lowercase();
        let stem = lower.strip_suffix(".efi")?.strip_prefix(PREFIX)?;
        let (base, counter) = match stem.split_once('+') {
            Some((base, counter)) => (base, Some(counter)),
            None => (stem, None),
        };
        let (generation, slot) = base.split_once('-')?;
        if generation.is_empty() || !generation.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let generation = generation.parse().ok()?;
        let slot = Slot::parse(slot)?;
        let tries = match counter {
            None => None,
            Some(counter) => {
                let (left, done) = match counter.split_once('-') {
                    Some((left, done)) => (left, Some(done.parse().ok()?)),
                    None => (counter, None),
                };
                Some(Tries { left: left.parse().ok()?, done })
            }
        };
        Some(Entry { generation, slot, tries })
    }

    pub fn file_name(&self) -> String {
        let counter = match self.tries {
            None => String::new(),
            Some(Tries { left, done: None }) => format!("+{left}"),
            Some(Tries { left, done: Some(done) }) => format!("+{left}-{done}"),
        };
        format!("{PREFIX}{}-{}{counter}.efi", self.generation, self.slot)
    }

    /// Path on the ESP.
    pub fn path(&self) -> String {
        format!("{ENTRIES_DIR}/{}", self.file_name())
    }

    /// The committed form of this entry (counter dropped).
    pub fn blessed(&self) -> Entry {
        Entry { tries: None, ..self.clone() }
    }

    /// A trial entry whose tries are used up: systemd-boot boots it only if nothing else is left.
    pub fn is_bad(&self) -> bool {
        self.tries.is_some_and(|t| t.left == 0)
    }

    pub fn is_trial(&self) -> bool {
        self.tries.is_some()
    }
}

/// The entries in the order systemd-boot tries them (its default is the first).
pub fn boot_order(entries: &[Entry]) -> Vec<&Entry> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    // Bad entries last; otherwise newest generation first (its file names compare that way).
    sorted.sort_by(|a, b| a.is_bad().cmp(&b.is_bad()).then(b.generation.cmp(&a.generation)));
    sorted
}

/// The generation for a newly staged entry: above every existing one.
pub fn next_generation(entries: &[Entry]) -> u32 {
    entries.iter().map(|e| e.generation).max().unwrap_or(0).saturating_add(1)
}

/// The entry a slot booted from: the newest one for that slot (staging removes older ones).
pub fn current_for(entries: &[Entry], slot: Slot) -> Option<&Entry> {
    entries.iter().filter(|e| e.slot == slot).max_by_key(|e| e.generation)
}

/// Entries parsed from a directory listing; other files are ignored.
pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<Entry> {
    names.into_iter().filter_map(Entry::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_with_and_without_counters() {
        for name in
            ["opencomputer-1-a.efi", "opencomputer-2-b+3.efi", "opencomputer-12-a+0-3.efi", "opencomputer-2-b+2-1.efi"]
        {
            let entry = Entry::parse(name).unwrap_or_else(|| panic!("{name} parses"));
            assert_eq!(entry.file_name(), name);
        }
        let e = Entry::parse("opencomputer-2-b+2-1.efi").expect("parses");
        assert_eq!(e, Entry { generation: 2, slot: Slot::B, tries: Some(Tries { left: 2, done: Some(1) }) });
        assert_eq!(e.blessed().file_name(), "opencomputer-2-b.efi");
        assert_eq!(
            Entry::parse("OPENCOMPUTER-3-A.EFI"),
            Some(Entry::new(3, Slot::A, None)),
            "FAT names are case-insensitive"
        );
    }

    #[test]
    fn other_files_are_not_entries() {
        for name in [
            "BOOTX64.EFI",
            "opencomputer-a.efi",
            "opencomputer-1-c.efi",
            "opencomputer-1-a.efi.tmp",
            "opencomputer--a.efi",
            "opencomputer-1-a+x.efi",
            "opencomputer-+1-a.efi",
            "opencomputer-1-a+1-.efi",
        ] {
            assert_eq!(Entry::parse(name), None, "{name}");
        }
    }

    #[test]
    fn a_staged_upgrade_boots_first_until_its_tries_are_used_up() {
        let committed = Entry::new(1, Slot::A, None);
        let mut staged = Entry::new(2, Slot::B, Some(DEFAULT_TRIES));
        assert_eq!(boot_order(&[committed.clone(), staged.clone()])[0], &staged);
        staged.tries = Some(Tries { left: 1, done: Some(2) });
        assert_eq!(boot_order(&[committed.clone(), staged.clone()])[0], &staged);
        staged.tries = Some(Tries { left: 0, done: Some(3) });
        assert!(staged.is_bad());
        assert_eq!(boot_order(&[staged.clone(), committed.clone()])[0], &committed, "falls back");
        // Once blessed, the new generation stays first.
        assert_eq!(boot_order(&[committed, staged.blessed()])[0].generation, 2);
    }

    #[test]
    fn generations_and_current_entries() {
        let entries = from_names(["opencomputer-1-a.efi", "BOOTX64.EFI", "opencomputer-2-b+0-3.efi"]);
        assert_eq!(next_generation(&entries), 3);
        assert_eq!(next_generation(&[]), 1);
        assert_eq!(current_for(&entries, Slot::A).map(|e| e.generation), Some(1));
        assert_eq!(current_for(&entries, Slot::B).map(Entry::is_bad), Some(true));
        assert_eq!(Slot::B.partition_name(), crate::layout::SYSTEM_B_NAME);
        assert_eq!(Slot::A.cmdline_arg(), "oc.slot=a");
    }

    #[test]
    fn the_last_exact_slot_word_on_a_command_line_counts() {
        assert_eq!(Slot::from_cmdline("console=ttyS0 oc.slot=a quiet"), Some(Slot::A));
        assert_eq!(Slot::from_cmdline("oc.slot=a oc.slot=b"), Some(Slot::B));
        assert_eq!(Slot::from_cmdline("oc.slotx=b oc.slot=a xoc.slot=b"), Some(Slot::A));
        assert_eq!(Slot::from_cmdline("oc.slot=c"), None);
        assert_eq!(Slot::from_cmdline("quiet"), None);
    }
}

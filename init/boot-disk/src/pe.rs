//! The PE sections of a unified kernel image: checking that an uploaded one is complete, reading
//! its command line and os-release, and pointing its command line at the other system slot.

use super::entry::{Slot, SLOT_KEY};

/// Sections a unified kernel image built by the image pipeline must carry.
pub const REQUIRED: [&str; 4] = [".osrel", ".cmdline", ".linux", ".initrd"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    /// File offset and length of the section's content.
    pub offset: usize,
    pub len: usize,
}

/// The section table of a PE32+ image; every section's content lies inside `pe`.
pub fn sections(pe: &[u8]) -> Result<Vec<Section>, String> {
    let truncated = || "truncated PE headers".to_string();
    let u16_at = |o: usize| pe.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize).ok_or_else(truncated);
    let u32_at = |o: usize| {
        pe.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize).ok_or_else(truncated)
    };
    if pe.get(..2) != Some(b"MZ") {
        return Err("not a PE file (no MZ header)".into());
    }
    let coff = u32_at(0x3C)?;
    if pe.get(coff..coff + 4) != Some(b"PE\0\0") {
        return Err("no PE signature".into());
    }
    let count = u16_at(coff + 6)?;
    let optional = coff + 24;
    if u16_at(optional)? != 0x20B {
        return Err("not a PE32+ (64-bit) image".into());
    }
    let table = optional + u16_at(coff + 20)?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let s = table + 40 * i;
        let name = pe.get(s..s + 8).ok_or_else(truncated)?;
        let name = String::from_utf8_lossy(name).trim_end_matches('\0').to_string();
        let virtual_size = u32_at(s + 8)?;
        let raw_size = u32_at(s + 16)?;
        let offset = u32_at(s + 20)?;
        // The raw data is padded to the file alignment; the virtual size is the content's.
        let len = if virtual_size == 0 { raw_size } else { virtual_size.min(raw_size) };
        if offset.checked_add(len).is_none_or(|end| end > pe.len()) {
            return Err(format!("section {name} extends past the end of the file"));
        }
        out.push(Section { name, offset, len });
    }
    Ok(out)
}

/// A unified kernel image as far as staging needs it.
#[derive(Debug)]
pub struct Uki {
    pub cmdline: String,
    pub os_release: String,
    cmdline_section: Section,
}

impl Uki {
    /// Checks that `pe` is a PE32+ image with every required section.
    pub fn parse(pe: &[u8]) -> Result<Uki, String> {
        let all = sections(pe)?;
        let find =
            |name: &str| all.iter().find(|s| s.name == name).cloned().ok_or_else(|| format!("no {name} section"));
        for name in REQUIRED {
            find(name)?;
        }
        let text = |s: &Section| section_text(&pe[s.offset..s.offset + s.len]);
        let cmdline_section = find(".cmdline")?;
        Ok(Uki { cmdline: text(&cmdline_section), os_release: text(&find(".osrel")?), cmdline_section })
    }

    /// A value from the os-release section (quotes removed).
    pub fn os_release_value(&self, key: &str) -> Option<String> {
        self.os_release
            .lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().trim_matches('"').to_string())
    }

    /// The slot its command line names.
    pub fn slot(&self) -> Option<Slot> {
        Slot::from_cmdline(&self.cmdline)
    }

    /// Rewrites `oc.slot=` on the command line of `pe` (this image's bytes) to `slot`, in place
    /// (same length), and fixes the PE checksum. The word rewritten is the one [`Slot::from_cmdline`]
    /// reads (the last `oc.slot=` word), so the image then names `slot`.
    pub fn retarget(&self, pe: &mut [u8], slot: Slot) -> Result<(), String> {
        let from = self.slot().ok_or_else(|| format!("its command line names no {SLOT_KEY}"))?.cmdline_arg();
        let s = &self.cmdline_section;
        let changed = || "command line changed under us".to_string();
        let section = pe.get_mut(s.offset..s.offset + s.len).ok_or_else(changed)?;
        let word = slot_word(section).ok_or_else(changed)?;
        if section[word.clone()] != *from.as_bytes() {
            return Err(changed());
        }
        let original = section[word.clone()].to_vec();
        section[word.clone()].copy_from_slice(slot.cmdline_arg().as_bytes());
        if Slot::from_cmdline(&section_text(section)) != Some(slot) {
            section[word].copy_from_slice(&original);
            return Err(format!("cannot point the command line at slot {slot}"));
        }
        set_checksum(pe)
    }
}

/// A text section's content as the image's users read it (NUL padding at the end dropped).
fn section_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end_matches('\0').to_string()
}

/// Where in a command line section the word lies that [`Slot::from_cmdline`] reads: the last
/// whitespace-separated word starting with `oc.slot=`, found on the bytes with the same rules
/// (Unicode whitespace; invalid UTF-8 is part of a word; NUL padding at the end is not).
fn slot_word(section: &[u8]) -> Option<std::ops::Range<usize>> {
    let prefix = format!("{SLOT_KEY}=");
    let end = section.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
    let mut found = None;
    let mut start = None;
    let mut at = 0;
    let mut close = |start: &mut Option<usize>, at: usize| {
        if let Some(s) = start.take() {
            if section[s..at].starts_with(prefix.as_bytes()) {
                found = Some(s..at);
            }
        }
    };
    for chunk in section[..end].utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_whitespace() {
                close(&mut start, at);
            } else if start.is_none() {
                start = Some(at);
            }
            at += c.len_utf8();
        }
        if !chunk.invalid().is_empty() {
            start.get_or_insert(at);
            at += chunk.invalid().len();
        }
    }
    close(&mut start, at);
    found
}

/// Recomputes the optional header's CheckSum field.
pub fn set_checksum(pe: &mut [u8]) -> Result<(), String> {
    let coff =
        pe.get(0x3C..0x40).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize).ok_or("truncated PE")?;
    let field = coff + 24 + 64;
    if pe.len() < field + 4 {
        return Err("truncated PE headers".into());
    }
    pe[field..field + 4].fill(0);
    let value = checksum(pe, field);
    pe[field..field + 4].copy_from_slice(&value.to_le_bytes());
    Ok(())
}

/// The PE image checksum: a 16-bit folded sum of the file's words (the four bytes of the
/// checksum field at `skip` counted as zero) plus the file length. Masking bytes rather than
/// skipping words keeps the result right when the field is not 2-aligned (a PE header at an odd
/// offset): the words that straddle it then still count their other byte.
pub fn checksum(pe: &[u8], skip: usize) -> u32 {
    let byte = |at: usize| if at.wrapping_sub(skip) < 4 { 0 } else { pe.get(at).copied().unwrap_or(0) };
    let mut sum: u64 = 0;
    for at in (0..pe.len()).step_by(2) {
        sum += u64::from(byte(at)) | u64::from(byte(at + 1)) << 8;
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum = (sum & 0xFFFF) + (sum >> 16);
    (sum as u32).wrapping_add(pe.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PE32+ with the given sections (name, content), laid out one after another.
    pub fn fake_pe(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let coff = 0x40;
        let optional_size = 240;
        let table = coff + 24 + optional_size;
        let mut pe = vec![0u8; table + 40 * parts.len()];
        pe[..2].copy_from_slice(b"MZ");
        pe[0x3C..0x40].copy_from_slice(&(coff as u32).to_le_bytes());
        pe[coff..coff + 4].copy_from_slice(b"PE\0\0");
        pe[coff + 6..coff + 8].copy_from_slice(&(parts.len() as u16).to_le_bytes());
        pe[coff + 20..coff + 22].copy_from_slice(&(optional_size as u16).to_le_bytes());
        pe[coff + 24..coff + 26].copy_from_slice(&0x20Bu16.to_le_bytes());
        for (i, (name, data)) in parts.iter().enumerate() {
            let s = table + 40 * i;
            let offset = pe.len();
            pe[s..s + name.len()].copy_from_slice(name.as_bytes());
            pe[s + 8..s + 12].copy_from_slice(&(data.len() as u32).to_le_bytes());
            pe[s + 16..s + 20].copy_from_slice(&(data.len().div_ceil(512) as u32 * 512).to_le_bytes());
            pe[s + 20..s + 24].copy_from_slice(&(offset as u32).to_le_bytes());
            pe.extend_from_slice(data);
            pe.resize(offset + data.len().div_ceil(512) * 512, 0);
        }
        pe
    }

    fn uki(cmdline: &[u8]) -> Vec<u8> {
        fake_pe(&[
            (".osrel", b"ID=opencomputer\nOPENCOMPUTER_VERSION=\"1.2\"\n"),
            (".cmdline", cmdline),
            (".linux", b"k"),
            (".initrd", b"i"),
        ])
    }

    #[test]
    fn reads_and_retargets_the_command_line() {
        let mut pe = uki(b"console=ttyS0 oc.slot=a oc.boot=disk");
        let parsed = Uki::parse(&pe).expect("valid");
        assert_eq!(parsed.slot(), Some(Slot::A));
        assert_eq!(parsed.os_release_value("OPENCOMPUTER_VERSION").as_deref(), Some("1.2"));
        parsed.retarget(&mut pe, Slot::B).expect("retarget");
        let again = Uki::parse(&pe).expect("still valid");
        assert_eq!(again.cmdline, "console=ttyS0 oc.slot=b oc.boot=disk");
        let coff = 0x40;
        let stored = u32::from_le_bytes(pe[coff + 88..coff + 92].try_into().expect("4 bytes"));
        assert_eq!(stored, checksum(&pe, coff + 88));
    }

    /// Found while writing the `uki` fuzz target (its retarget check fails on these command
    /// lines): retargeting must change the word the slot is read from, the last `oc.slot=` word.
    /// Before, the first occurrence of the text was replaced, even inside another word or in an
    /// earlier `oc.slot=` that the last-one-wins rule ignores, and the image still named the old
    /// slot.
    #[test]
    fn retargeting_changes_the_slot_word_that_counts() {
        for cmdline in [
            &b"oc.slot=a oc.slot=a"[..],
            b"foo=xoc.slot=a oc.slot=a quiet",
            b"oc.slot=b\toc.slot=a\0\0",
            b"x=\xC3oc.slot=a\xE3\x80\x80oc.slot=a",
        ] {
            let mut pe = uki(cmdline);
            let parsed = Uki::parse(&pe).expect("valid");
            assert_eq!(parsed.slot(), Some(Slot::A), "{cmdline:?}");
            parsed.retarget(&mut pe, Slot::B).expect("retarget");
            assert_eq!(Uki::parse(&pe).expect("valid").slot(), Some(Slot::B), "{cmdline:?}");
        }
        let mut pe = uki(b"oc.slot=a");
        let parsed = Uki::parse(&pe).expect("valid");
        assert!(parsed.retarget(&mut pe[..100], Slot::B).is_err(), "another image's bytes");
    }

    /// Found by the `uki` fuzz target: with the PE header at an odd offset the checksum field
    /// is not 2-aligned, and skipping whole words around it left one of its bytes in the sum, so
    /// the checksum `set_checksum` stored did not verify.
    #[test]
    fn the_checksum_verifies_when_the_pe_header_is_at_an_odd_offset() {
        let mut pe = vec![0u8; 0x200];
        pe[..2].copy_from_slice(b"MZ");
        let coff = 0xFB;
        pe[0x3C..0x40].copy_from_slice(&(coff as u32).to_le_bytes());
        pe[coff..coff + 4].copy_from_slice(b"PE\0\0");
        for (i, b) in pe.iter_mut().enumerate().skip(coff + 4) {
            *b = (i * 7) as u8;
        }
        set_checksum(&mut pe).expect("long enough");
        let field = coff + 24 + 64;
        let stored = u32::from_le_bytes(pe[field..field + 4].try_into().expect("4 bytes"));
        assert_eq!(stored, checksum(&pe, field));
        // An aligned field gives what skipping its two words gave before.
        let aligned = uki(b"oc.slot=a");
        let skipped: u64 = aligned
            .chunks(2)
            .enumerate()
            .filter(|(i, _)| !(0x40 + 88..0x40 + 92).contains(&(2 * i)))
            .map(|(_, w)| u64::from(w[0]) | u64::from(w.get(1).copied().unwrap_or(0)) << 8)
            .sum();
        let folded = (skipped & 0xFFFF) + (skipped >> 16);
        let folded = ((folded & 0xFFFF) + (folded >> 16)) as u32;
        assert_eq!(checksum(&aligned, 0x40 + 88), folded.wrapping_add(aligned.len() as u32));
    }

    #[test]
    fn incomplete_or_foreign_files_are_refused_with_the_reason() {
        assert!(Uki::parse(b"\x7fELF....").unwrap_err().contains("not a PE"));
        let no_initrd = fake_pe(&[(".osrel", b"ID=x"), (".cmdline", b"oc.slot=a"), (".linux", b"k")]);
        assert_eq!(Uki::parse(&no_initrd).err().as_deref(), Some("no .initrd section"));
        let mut cut = uki(b"oc.slot=a");
        cut.truncate(cut.len() - 600);
        assert!(Uki::parse(&cut).is_err());
        let mut no_slot = uki(b"console=ttyS0");
        let parsed = Uki::parse(&no_slot).expect("valid PE");
        assert!(parsed.retarget(&mut no_slot, Slot::B).is_err());
    }
}

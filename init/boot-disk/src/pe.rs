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
        let text =
            |s: &Section| String::from_utf8_lossy(&pe[s.offset..s.offset + s.len]).trim_end_matches('\0').to_string();
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
    /// (same length), and fixes the PE checksum.
    pub fn retarget(&self, pe: &mut [u8], slot: Slot) -> Result<(), String> {
        let from = self.slot().ok_or_else(|| format!("its command line names no {SLOT_KEY}"))?.cmdline_arg();
        let s = &self.cmdline_section;
        let section = &mut pe[s.offset..s.offset + s.len];
        let at =
            section.windows(from.len()).position(|w| w == from.as_bytes()).ok_or("command line changed under us")?;
        section[at..at + from.len()].copy_from_slice(slot.cmdline_arg().as_bytes());
        set_checksum(pe)
    }
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

/// The PE image checksum: a 16-bit folded sum of the file's words (skipping the checksum field
/// at `skip`) plus the file length.
pub fn checksum(pe: &[u8], skip: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, pair) in pe.chunks(2).enumerate() {
        let at = 2 * i;
        if at >= skip && at < skip + 4 {
            continue;
        }
        sum += u64::from(pair[0]) | u64::from(pair.get(1).copied().unwrap_or(0)) << 8;
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

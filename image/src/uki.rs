//! The unified kernel image: systemd's EFI stub (Debian package systemd-boot-efi) with the
//! kernel, initramfs, command line and an os-release added as PE sections: one file that
//! systemd-boot (or UEFI firmware directly) boots. The new sections are placed after the
//! stub's own, at addresses computed from its section table so nothing overlaps.

use crate::err;
use crate::error::{Context, Result};
use crate::host::{self, run_quiet, tool};
use std::path::Path;
use std::process::Command;

pub const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
pub const STUB_PACKAGE: &str = "systemd-boot-efi";

/// What the PE headers of the stub tell us about where free address space starts.
#[derive(Debug, PartialEq, Eq)]
pub struct PeLayout {
    pub image_base: u64,
    pub section_alignment: u64,
    /// First relative virtual address after every existing section.
    pub end_rva: u64,
    pub sections: Vec<String>,
}

/// Reads the PE32+ optional header and section table.
pub fn pe_layout(pe: &[u8]) -> Result<PeLayout> {
    let truncated = || err!("EFI stub: truncated PE headers");
    let u16_at = |o: usize| pe.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]])).ok_or_else(truncated);
    let u32_at =
        |o: usize| pe.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok_or_else(truncated);
    let u64_at =
        |o: usize| pe.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).ok_or_else(truncated);
    if pe.get(..2) != Some(b"MZ") {
        return Err(err!("EFI stub: not a PE file (no MZ header)"));
    }
    let coff = u32_at(0x3C)? as usize;
    if pe.get(coff..coff + 4) != Some(b"PE\0\0") {
        return Err(err!("EFI stub: no PE signature"));
    }
    let sections = u16_at(coff + 6)? as usize;
    let optional_size = u16_at(coff + 20)? as usize;
    let optional = coff + 24;
    if u16_at(optional)? != 0x20B {
        return Err(err!("EFI stub: not a PE32+ (64-bit) image"));
    }
    let image_base = u64_at(optional + 24)?;
    let section_alignment = u64::from(u32_at(optional + 32)?);
    if section_alignment == 0 || !section_alignment.is_power_of_two() {
        return Err(err!("EFI stub: bad section alignment {section_alignment}"));
    }
    let table = optional + optional_size;
    let mut end_rva = 0;
    let mut names = Vec::new();
    for i in 0..sections {
        let s = table + 40 * i;
        let raw_name = pe.get(s..s + 8).ok_or_else(truncated)?;
        names.push(String::from_utf8_lossy(raw_name).trim_end_matches('\0').to_string());
        let virtual_size = u64::from(u32_at(s + 8)?);
        let rva = u64::from(u32_at(s + 12)?);
        let raw_size = u64::from(u32_at(s + 16)?);
        end_rva = end_rva.max(rva + virtual_size.max(raw_size));
    }
    Ok(PeLayout { image_base, section_alignment, end_rva, sections: names })
}

/// (section name, file) in the order they are placed.
pub struct Section<'a> {
    pub name: &'static str,
    pub file: &'a Path,
}

/// Absolute VMAs (what objcopy takes) for each section, one after the other from the stub's end.
pub fn place(layout: &PeLayout, sizes: &[u64]) -> Vec<u64> {
    let align = |x: u64| x.div_ceil(layout.section_alignment) * layout.section_alignment;
    let mut next = align(layout.end_rva);
    sizes
        .iter()
        .map(|size| {
            let here = next;
            next = align(here + size.max(&1));
            layout.image_base + here
        })
        .collect()
}

/// Builds `out` from the stub and the sections.
pub fn build(sections: &[Section], out: &Path) -> Result<()> {
    host::ensure(&[tool(STUB, STUB_PACKAGE), tool("objcopy", "binutils")])?;
    let stub = std::fs::read(STUB).ctx(|| format!("read {STUB}"))?;
    let layout = pe_layout(&stub)?;
    for s in sections {
        if layout.sections.iter().any(|n| n == s.name) {
            return Err(err!("the EFI stub already has a {} section", s.name));
        }
    }
    let mut sizes = Vec::new();
    for s in sections {
        sizes.push(std::fs::metadata(s.file).ctx(|| format!("stat {}", s.file.display()))?.len());
    }
    let vmas = place(&layout, &sizes);
    let mut cmd = Command::new("objcopy");
    for (s, vma) in sections.iter().zip(&vmas) {
        cmd.arg("--add-section").arg(format!("{}={}", s.name, s.file.display()));
        cmd.arg("--change-section-vma").arg(format!("{}={vma:#x}", s.name));
    }
    cmd.arg(STUB).arg(out);
    run_quiet(&mut cmd)?;
    let mut built = std::fs::read(out).ctx(|| format!("read {}", out.display()))?;
    // objcopy (binutils 2.40) stamps the build time into the PE header, ignoring
    // SOURCE_DATE_EPOCH: zero it, so the same inputs give the same file.
    normalize(&mut built)?;
    std::fs::write(out, &built).ctx(|| format!("write {}", out.display()))?;
    let result = pe_layout(&built)?;
    for s in sections {
        if !result.sections.iter().any(|n| n == s.name) {
            return Err(err!("objcopy did not add {} to {}", s.name, out.display()));
        }
    }
    Ok(())
}

/// Sets the COFF header's TimeDateStamp to 0 and recomputes the optional header's CheckSum.
pub fn normalize(pe: &mut [u8]) -> Result<()> {
    let coff = pe
        .get(0x3C..0x40)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| err!("truncated PE"))?;
    let stamp = coff + 8;
    let checksum = coff + 24 + 64;
    if pe.len() < checksum + 4 {
        return Err(err!("truncated PE headers"));
    }
    pe[stamp..stamp + 4].fill(0);
    pe[checksum..checksum + 4].fill(0);
    let value = boot_disk::pe::checksum(pe, checksum);
    pe[checksum..checksum + 4].copy_from_slice(&value.to_le_bytes());
    Ok(())
}

/// The os-release text of an image (in its initramfs and the unified kernel image's .osrel).
/// No VERSION_ID: systemd-boot would order entries by it before their file names, and the
/// A/B scheme needs the order of the names alone (init/boot-disk/src/entry.rs).
pub fn os_release(version: &str) -> String {
    format!(
        "NAME=\"OpenComputer appliance\"\nID=opencomputer\n{}={version}\nPRETTY_NAME=\"OpenComputer appliance {version}\"\n",
        boot_disk::entry::VERSION_KEY
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_follow_the_stub_aligned_and_without_overlap() {
        let layout =
            PeLayout { image_base: 0x1_0000_0000, section_alignment: 0x1000, end_rva: 0x19300, sections: vec![] };
        let vmas = place(&layout, &[10, 0x2000, 1]);
        assert_eq!(vmas, vec![0x1_0001_A000, 0x1_0001_B000, 0x1_0001_D000]);
    }

    #[test]
    fn reads_the_debian_stub_when_installed() {
        let Ok(stub) = std::fs::read(STUB) else {
            eprintln!("{STUB} not installed; skipped");
            return;
        };
        let layout = pe_layout(&stub).expect("stub parses");
        assert!(layout.sections.iter().any(|s| s == ".text"), "{:?}", layout.sections);
        assert!(layout.end_rva > 0x1000);
    }

    #[test]
    fn normalizing_reproduces_the_stubs_own_checksum() {
        let Ok(stub) = std::fs::read(STUB) else {
            eprintln!("{STUB} not installed; skipped");
            return;
        };
        // Debian's stub carries timestamp 0 and a valid checksum: normalizing must not change it.
        let mut copy = stub.clone();
        normalize(&mut copy).expect("normalize");
        assert!(copy == stub, "checksum algorithm disagrees with the linker's");
        let coff = u32::from_le_bytes([stub[0x3C], stub[0x3D], stub[0x3E], stub[0x3F]]) as usize;
        copy[coff + 8] = 0x55;
        normalize(&mut copy).expect("normalize");
        assert!(copy == stub, "a timestamp is zeroed again");
    }

    #[test]
    fn rejects_non_pe_input() {
        assert!(pe_layout(b"\x7fELF").is_err());
        assert!(pe_layout(b"MZ").is_err());
    }
}

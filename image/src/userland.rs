//! Host programs the appliance borrows (e.g. mkfs.xfs), copied into the image with exactly the
//! shared libraries they load, found with ldd.

use crate::err;
use crate::error::{Context, Result};
use crate::host::run_quiet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A file to place in the image: (host source, absolute path inside the image).
pub type Placement = (PathBuf, String);

/// The program itself plus every library ldd reports, at the paths the loader will look for.
pub fn with_libraries(program: &Path, image_path: &str) -> Result<Vec<Placement>> {
    let mut files = vec![(program.to_path_buf(), image_path.to_string())];
    let elf = std::fs::read(program).ctx(|| format!("read {}", program.display()))?;
    if elf_interpreter(&elf)?.is_none() {
        return Ok(files);
    }
    let out = run_quiet(Command::new("ldd").arg(program))?;
    for line in out.lines() {
        let line = line.trim();
        if line.starts_with("linux-vdso") {
            continue;
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let (name, resolved) = match line.split_once(" => ") {
            Some((name, rest)) => (name.trim(), rest.split_whitespace().next().unwrap_or("")),
            None => (line.split_whitespace().next().unwrap_or(""), line.split_whitespace().next().unwrap_or("")),
        };
        if resolved == "not" || resolved.is_empty() {
            return Err(err!("{}: library {name} not found on this host", program.display()));
        }
        let source = std::fs::canonicalize(resolved).ctx(|| format!("resolve {resolved}"))?;
        files.push((source, resolved.to_string()));
    }
    Ok(files)
}

/// The PT_INTERP of a 64-bit little-endian ELF file, None for a static executable.
pub fn elf_interpreter(elf: &[u8]) -> Result<Option<String>> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| elf.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(err!("not a 64-bit little-endian ELF file"));
    }
    let truncated = || err!("truncated ELF header");
    let phoff = u64_at(0x20).ok_or_else(truncated)? as usize;
    let phentsize = u16_at(0x36).ok_or_else(truncated)? as usize;
    let phnum = u16_at(0x38).ok_or_else(truncated)? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph).ok_or_else(truncated)? == 3 {
            let offset = u64_at(ph + 8).ok_or_else(truncated)? as usize;
            let size = u64_at(ph + 32).ok_or_else(truncated)? as usize;
            let bytes = elf.get(offset..offset + size).ok_or_else(truncated)?;
            let text = String::from_utf8_lossy(bytes).trim_end_matches('\0').to_string();
            return Ok(Some(text));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_interpreter_of_a_dynamic_host_binary() {
        let ls = std::fs::read("/bin/ls").expect("/bin/ls exists on Debian");
        let interp = elf_interpreter(&ls).expect("valid ELF").expect("dynamic");
        assert!(interp.contains("ld-linux"), "{interp}");
    }

    #[test]
    fn rejects_non_elf_and_truncated_input() {
        assert!(elf_interpreter(b"#!/bin/sh\n").is_err());
        assert!(elf_interpreter(b"\x7fELF\x02\x01\x01").is_err());
    }

    #[test]
    fn our_test_binary_is_static() {
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read self");
        assert_eq!(elf_interpreter(&me).expect("elf"), None, "workspace builds with crt-static");
    }
}

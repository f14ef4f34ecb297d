//! The EFI system partition: a FAT32 filesystem made with Debian's dosfstools and filled with
//! mtools, reproducibly: `mkfs.fat --invariant` fixes the volume id and the other generated
//! fields, and SOURCE_DATE_EPOCH fixes the timestamps mtools writes for files and directories.
//! Also edits files on an ESP inside a disk image (the tests put an operator config there).

use crate::err;
use crate::error::{Context, Result};
use crate::host::{self, run_quiet, tool};
use std::path::Path;
use std::process::Command;

pub const VOLUME_LABEL: &str = "OC-ESP";

pub fn ensure_tools() -> Result<()> {
    host::ensure(&[tool("mkfs.fat", "dosfstools"), tool("mcopy", "mtools"), tool("mmd", "mtools")])
}

/// Makes a FAT32 image of `size_bytes` at `out` holding `files` (path on the ESP, host file).
pub fn build(out: &Path, size_bytes: u64, files: &[(&str, &Path)]) -> Result<()> {
    ensure_tools()?;
    let _ = std::fs::remove_file(out);
    let kib = size_bytes / 1024;
    run_quiet(
        Command::new("mkfs.fat")
            .args(["-C", "-F", "32", "-S", "512", "-n", VOLUME_LABEL, "--invariant"])
            .arg(out)
            .arg(kib.to_string())
            .env("SOURCE_DATE_EPOCH", crate::SOURCE_DATE_EPOCH.to_string()),
    )?;
    let mut dirs: Vec<String> = Vec::new();
    for (path, _) in files {
        let mut parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        parts.pop();
        for depth in 1..=parts.len() {
            let dir = format!("::/{}", parts[..depth].join("/"));
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    if !dirs.is_empty() {
        run_quiet(mtools("mmd", out).args(&dirs))?;
    }
    for (path, source) in files {
        copy_in(out, "", path, source)?;
    }
    Ok(())
}

/// Copies `source` to `path` on the FAT filesystem in `image` (at byte `offset_spec`, e.g.
/// `@@1048576`, or "" for a bare filesystem image), replacing an existing file.
pub fn copy_in(image: &Path, offset_spec: &str, path: &str, source: &Path) -> Result<()> {
    if !source.is_file() {
        return Err(err!("{} (for {path} on the EFI partition) does not exist", source.display()));
    }
    let target = format!("::/{}", path.trim_start_matches('/'));
    let mut cmd = Command::new("mcopy");
    // -o: overwrite without asking. File and directory times come from SOURCE_DATE_EPOCH.
    cmd.arg("-o").arg("-i").arg(format!("{}{offset_spec}", image.display())).arg(source).arg(&target);
    cmd.env("SOURCE_DATE_EPOCH", crate::SOURCE_DATE_EPOCH.to_string()).env("MTOOLS_SKIP_CHECK", "1");
    run_quiet(&mut cmd).map(|_| ()).ctx(|| format!("copy {} to {target}", source.display()))
}

/// Reads `path` from the FAT filesystem at `offset_spec` in `image`.
pub fn read_file(image: &Path, offset_spec: &str, path: &str) -> Result<String> {
    let source = format!("::/{}", path.trim_start_matches('/'));
    run_quiet(
        Command::new("mtype")
            .arg("-i")
            .arg(format!("{}{offset_spec}", image.display()))
            .arg(&source)
            .env("MTOOLS_SKIP_CHECK", "1"),
    )
}

fn mtools(command: &str, image: &Path) -> Command {
    let mut cmd = Command::new(command);
    cmd.arg("-i")
        .arg(image)
        .env("SOURCE_DATE_EPOCH", crate::SOURCE_DATE_EPOCH.to_string())
        .env("MTOOLS_SKIP_CHECK", "1");
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_builds_of_the_same_files_are_byte_identical() {
        if !host::have("mkfs.fat") || !host::have("mcopy") {
            eprintln!("dosfstools/mtools not installed; skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("image-esp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("payload");
        std::fs::write(&file, b"payload").expect("write");
        let mut images = Vec::new();
        for n in 0..2 {
            let out = dir.join(format!("esp{n}.img"));
            build(&out, 40 << 20, &[("EFI/BOOT/BOOTX64.EFI", &file), ("opencomputer.conf", &file)]).expect("build");
            images.push(std::fs::read(&out).expect("read"));
            // A later wall-clock second must not change anything.
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        assert!(images[0] == images[1], "same inputs give the same ESP");
        let text = read_file(&dir.join("esp0.img"), "", "EFI/BOOT/BOOTX64.EFI").expect("mtype");
        assert_eq!(text, "payload");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

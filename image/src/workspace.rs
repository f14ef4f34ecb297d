//! The appliance's own binaries, built from this workspace as static executables.

use crate::err;
use crate::error::{Context, Result};
use crate::progress::{Outcome, Step};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The workspace root (the image crate lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Cargo's target directory for this workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// A binary to build: (package, binary name).
pub type Bin = (&'static str, &'static str);

/// Builds the given binaries in release mode and returns their paths, in the same order.
pub fn build(bins: &[Bin]) -> Result<Vec<PathBuf>> {
    let step = Step::start("workspace binaries");
    crate::host::ensure(&[crate::host::tool("objcopy", "binutils")])?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root()).args(["build", "--release", "--target", TARGET]);
    for (package, bin) in bins {
        cmd.args(["-p", package, "--bin", bin]);
    }
    let status = cmd.status().ctx(|| "run cargo build".into())?;
    if !status.success() {
        return Err(err!("cargo build of the appliance binaries failed ({status})"));
    }
    let dir = target_dir().join(TARGET).join("release");
    let mut paths = Vec::new();
    for (_, bin) in bins {
        let path = dir.join(bin);
        let elf = std::fs::read(&path).ctx(|| format!("read {}", path.display()))?;
        if crate::userland::elf_interpreter(&elf)?.is_some() {
            return Err(err!(
                "{} is dynamically linked; the workspace must build with crt-static (.cargo/config.toml)",
                path.display()
            ));
        }
        paths.push(stripped(&path)?);
    }
    let names: Vec<&str> = bins.iter().map(|(_, b)| *b).collect();
    step.finish(Outcome::Done, &names.join(", "));
    Ok(paths)
}

/// A copy of `binary` without symbols or build ID, beside it in `image-bins/`. The image carries
/// these: they are smaller, and two builds of the same sources in different checkouts can differ
/// in an LLVM-internal symbol name (and so in the build ID) while their code is identical.
fn stripped(binary: &Path) -> Result<PathBuf> {
    let name = binary.file_name().ok_or_else(|| err!("{} has no file name", binary.display()))?;
    let dir = binary.with_file_name("image-bins");
    std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
    let out = dir.join(name);
    crate::host::run_quiet(
        Command::new("objcopy").args(["--strip-all", "--remove-section=.note.gnu.build-id"]).arg(binary).arg(&out),
    )?;
    Ok(out)
}

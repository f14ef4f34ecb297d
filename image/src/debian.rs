//! Debian packages as build inputs: resolve versions, download .deb files (never install them)
//! and unpack them into a directory.

use crate::err;
use crate::error::{Context, Result};
use crate::host::run_quiet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The version apt would download for `package`, updating the package lists once if unknown.
pub fn candidate_version(package: &str) -> Result<String> {
    if let Some(version) = policy_candidate(package)? {
        return Ok(version);
    }
    run_quiet(Command::new("apt-get").args(["update", "-qq"]))?;
    policy_candidate(package)?
        .ok_or_else(|| err!("Debian package {package} is not available from the configured apt sources"))
}

fn policy_candidate(package: &str) -> Result<Option<String>> {
    let out = run_quiet(Command::new("apt-cache").args(["policy", package]))?;
    Ok(out.lines().find_map(|l| l.trim().strip_prefix("Candidate: ")).filter(|v| *v != "(none)").map(str::to_string))
}

/// The first `Depends:` of a metapackage, e.g. linux-image-amd64 -> linux-image-6.1.0-NN-amd64.
pub fn metapackage_target(meta: &str, prefix: &str) -> Result<String> {
    let mut out = run_quiet(Command::new("apt-cache").args(["depends", meta]))?;
    if !out.contains("Depends:") {
        run_quiet(Command::new("apt-get").args(["update", "-qq"]))?;
        out = run_quiet(Command::new("apt-cache").args(["depends", meta]))?;
    }
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|dep| dep.starts_with(prefix))
        .map(str::to_string)
        .ok_or_else(|| err!("{meta} has no dependency starting with {prefix}"))
}

/// Downloads `package`=`version` into `dir` and returns the .deb path.
pub fn download(package: &str, version: &str, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
    run_quiet(Command::new("apt-get").current_dir(dir).args(["download", "-qq", &format!("{package}={version}")]))?;
    let deb = std::fs::read_dir(dir)
        .ctx(|| format!("list {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.starts_with(&format!("{package}_")) && Path::new(&name).extension().is_some_and(|e| e == "deb")
        })
        .ok_or_else(|| err!("apt-get download {package} produced no .deb in {}", dir.display()))?;
    Ok(deb)
}

/// Unpacks a .deb's file tree (dpkg-deb -x) into `dir`.
pub fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    run_quiet(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir)).map(|_| ())
}

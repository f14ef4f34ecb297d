//! End-to-end scenarios, grouped by the capability they prove.

pub mod control_plane;
pub mod disk_image;
pub mod documented;
pub mod foundation;
pub mod power_loss;
pub mod sandboxes;
pub mod sealing;

use image::err;
use image::error::{Context, Result};
use std::path::Path;
use std::process::Command;

/// A scenario's assertion: `Ok` when `ok`, else an error saying what was seen.
pub fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(err!("{}", what()))
    }
}

/// `xfs_repair -n`: the XFS filesystem in `disk` (an image file) has no inconsistency.
pub fn xfs_check(disk: &Path) -> Result<()> {
    run(Command::new("xfs_repair").args(["-n", "-f"]).arg(disk))
}

/// Runs a host command; a failure carries its output.
pub fn run(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let out = cmd.output().ctx(|| format!("run {what}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err!("{what} failed ({}):\n{}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

//! End-to-end scenarios, grouped by the capability they prove.

pub mod checkpoints;
pub mod control_plane;
pub mod control_plane_load;
pub mod data_copy;
pub mod disk_image;
pub mod documented;
pub mod file_streams;
pub mod foundation;
pub mod power_loss;
pub mod published_clients;
pub mod sandboxes;
pub mod sealing;
pub mod sealing_attacks;
pub mod service_restart;
pub mod snapshots;
pub mod templates;

use image::error::Result;
use std::path::Path;
use std::process::Command;

/// `xfs_repair -n`: the XFS filesystem in `disk` (an image file or a block device such as a
/// loop device) has no inconsistency.
pub fn xfs_check(disk: &Path) -> Result<()> {
    let mut cmd = Command::new("xfs_repair");
    cmd.arg("-n");
    // -f: the filesystem is in a regular file, not on a device.
    if std::fs::metadata(disk).is_ok_and(|m| m.is_file()) {
        cmd.arg("-f");
    }
    image::host::run_quiet(cmd.arg(disk)).map(|_| ())
}

//! End-to-end scenarios, grouped by the capability they prove.

pub mod control_plane;
pub mod disk_image;
pub mod foundation;
pub mod sandboxes;
pub mod sealing;

use image::err;
use image::error::Result;

/// A scenario's assertion: `Ok` when `ok`, else an error saying what was seen.
pub fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(err!("{}", what()))
    }
}

//! A scenario's assertion, shared by the scenarios and the test upstream.

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

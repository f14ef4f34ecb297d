//! Loading kernel modules with finit_module(2), in an order computed at image build time.

use super::cstr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// How a module load ended.
pub enum Loaded {
    Fresh,
    /// Built in or loaded before: EEXIST.
    AlreadyThere,
}

/// Loads one `.ko` file with no parameters.
pub fn load(path: &str) -> io::Result<Loaded> {
    let file = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("open {path}: {e}")))?;
    let params = cstr("")?;
    // SAFETY: the fd is open for the duration of the call and `params` is a live, empty C string;
    // finit_module reads both and keeps neither.
    let ret = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if ret == 0 {
        return Ok(Loaded::Fresh);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        Ok(Loaded::AlreadyThere)
    } else {
        Err(err)
    }
}

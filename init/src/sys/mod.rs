//! Thin, checked wrappers around the Linux system calls PID 1 needs. Each wrapper turns an
//! errno into an error message that names the operation and its argument.

pub mod console;
pub mod fs;
pub mod hostname;
pub mod kmod;
pub mod mount;
pub mod net;
pub mod power;
pub mod process;

use std::ffi::CString;
use std::io;

/// A C string for a syscall argument; an interior NUL is an error naming the value.
pub fn cstr(value: &str) -> io::Result<CString> {
    CString::new(value)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{value:?} contains a NUL byte")))
}

/// Turns a -1 return into the errno, with context.
pub fn check(ret: libc::c_int, what: impl FnOnce() -> String) -> io::Result<libc::c_int> {
    if ret == -1 {
        let err = io::Error::last_os_error();
        Err(io::Error::new(err.kind(), format!("{}: {err}", what())))
    } else {
        Ok(ret)
    }
}

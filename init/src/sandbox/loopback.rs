//! Bringing up `lo`, the sandbox's only network interface: programs reach the egress forwarder
//! on 127.0.0.1, and the kernel assigns that address when the interface goes up.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub fn bring_up() -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments; it has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    crate::sys::check(fd, || "socket(AF_INET) for interface control".into())?;
    // SAFETY: socket returned a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value (an empty name, no flags).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a live ifreq with a NUL-terminated name; SIOCGIFFLAGS fills its flags.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    crate::sys::check(ret, || "SIOCGIFFLAGS lo".into())?;
    // SAFETY: SIOCGIFFLAGS just initialised the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: `req` is a live ifreq naming lo with the new flags; the kernel only reads it.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    crate::sys::check(ret, || "SIOCSIFFLAGS lo up".into()).map(|_| ())
}

//! AF_VSOCK stream sockets: the agent's listener inside the sandbox, the appliance's
//! connection to a sandbox's CID, and the egress path from the sandbox to the host (CID 2).

use super::transport::{Connection, Listener, TimedRead};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The host's CID as seen from a guest.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

fn check(ret: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if ret < 0 {
        let err = io::Error::last_os_error();
        Err(io::Error::new(err.kind(), format!("{what}: {err}")))
    } else {
        Ok(ret)
    }
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value (and svm_zero must be 0).
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = cid;
    addr
}

fn new_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: socket(2) with constant arguments; it has no memory arguments.
    let fd = check(unsafe { libc::socket(libc::AF_VSOCK, flags, 0) }, "socket(AF_VSOCK)")?;
    // SAFETY: socket returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_timeout(fd: RawFd, option: libc::c_int, timeout: Option<Duration>) -> io::Result<()> {
    let tv = match timeout {
        None => libc::timeval { tv_sec: 0, tv_usec: 0 },
        Some(d) if d.is_zero() => {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a zero socket timeout is not allowed"))
        }
        Some(d) => libc::timeval {
            tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        },
    };
    // SAFETY: `tv` is a live timeval and the length passed is its exact size.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    check(ret, "setsockopt(timeout)").map(|_| ())
}

fn set_blocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments on a descriptor this module owns.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) }, "fcntl(F_GETFL)")?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) }, "fcntl(F_SETFL)").map(|_| ())
}

/// A connected vsock stream.
#[derive(Debug)]
pub struct VsockStream {
    fd: OwnedFd,
}

impl VsockStream {
    /// Connects to `cid:port`; with a timeout the attempt is abandoned when it expires.
    pub fn connect(cid: u32, port: u32, timeout: Option<Duration>) -> io::Result<VsockStream> {
        let fd = new_socket(timeout.is_some())?;
        let addr = address(cid, port);
        let what = format!("connect to vsock {cid}:{port}");
        // SAFETY: `addr` is a live sockaddr_vm and the length passed is its exact size.
        let ret = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if let Some(timeout) = timeout {
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EINPROGRESS) {
                    return Err(io::Error::new(err.kind(), format!("{what}: {err}")));
                }
                wait_connected(fd.as_raw_fd(), timeout, &what)?;
            }
            set_blocking(fd.as_raw_fd())?;
        } else {
            check(ret, &what)?;
        }
        Ok(VsockStream { fd })
    }
}

/// Waits for a non-blocking connect to finish and returns its outcome.
fn wait_connected(fd: RawFd, timeout: Duration, what: &str) -> io::Result<()> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    loop {
        // SAFETY: `pfd` is one live pollfd, matching the count of 1.
        let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io::Error::new(err.kind(), format!("{what}: {err}")));
        }
        if ret == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("{what}: timed out after {timeout:?}")));
        }
        break;
    }
    let mut so_error: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `so_error` and `len` are live and sized for an int option.
    let ret = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut so_error as *mut libc::c_int).cast(), &mut len)
    };
    check(ret, "getsockopt(SO_ERROR)")?;
    if so_error != 0 {
        let err = io::Error::from_raw_os_error(so_error);
        return Err(io::Error::new(err.kind(), format!("{what}: {err}")));
    }
    Ok(())
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a live, writable buffer of exactly `buf.len()` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a live buffer of exactly `buf.len()` bytes; MSG_NOSIGNAL turns a
        // closed peer into EPIPE instead of a signal.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TimedRead for VsockStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        set_timeout(self.fd.as_raw_fd(), libc::SO_RCVTIMEO, timeout)
    }
}

impl Connection for VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(VsockStream { fd: self.fd.try_clone()? })
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        set_timeout(self.fd.as_raw_fd(), libc::SO_SNDTIMEO, timeout)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown(2) with integer arguments on a descriptor this value owns.
        check(unsafe { libc::shutdown(self.fd.as_raw_fd(), how) }, "shutdown").map(|_| ())
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A listening vsock socket bound to a port on every local CID.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        let fd = new_socket(false)?;
        let addr = address(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a live sockaddr_vm and the length passed is its exact size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        check(ret, &format!("bind vsock port {port}"))?;
        // SAFETY: listen(2) with integer arguments on the descriptor just bound.
        check(unsafe { libc::listen(fd.as_raw_fd(), 128) }, &format!("listen on vsock port {port}"))?;
        Ok(VsockListener { fd, port })
    }

    pub fn port(&self) -> u32 {
        self.port
    }

    /// Accepts one connection and returns it with the peer's CID.
    pub fn accept_with_peer(&self) -> io::Result<(VsockStream, u32)> {
        let mut addr = address(0, 0);
        let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        loop {
            // SAFETY: `addr`/`len` are live and describe a sockaddr_vm-sized buffer that accept4
            // fills in; the returned descriptor is new and owned by nobody else.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    (&mut addr as *mut libc::sockaddr_vm).cast(),
                    &mut len,
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
                let stream = VsockStream { fd: unsafe { OwnedFd::from_raw_fd(fd) } };
                return Ok((stream, addr.svm_cid));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(io::Error::new(err.kind(), format!("accept on vsock port {}: {err}", self.port)));
            }
        }
    }
}

impl Listener for VsockListener {
    type Conn = VsockStream;
    fn accept(&self) -> io::Result<VsockStream> {
        self.accept_with_peer().map(|(stream, _)| stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_layout_matches_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<libc::sockaddr_vm>(), 16);
        let addr = address(42, 1024);
        assert_eq!(addr.svm_family as i32, libc::AF_VSOCK);
        assert_eq!((addr.svm_cid, addr.svm_port), (42, 1024));
        assert_eq!(addr.svm_zero, [0; 4]);
    }

    #[test]
    fn listener_binds_where_vsock_exists() {
        // Hosts without a vsock transport refuse the address family; that is the only
        // acceptable failure.
        match VsockListener::bind(49_000 + std::process::id() % 10_000) {
            Ok(listener) => assert!(listener.port() >= 49_000),
            Err(e) => assert!(e.to_string().contains("socket(AF_VSOCK)"), "unexpected bind failure: {e}"),
        }
    }
}

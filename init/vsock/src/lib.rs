//! AF_VSOCK stream sockets, the one wrapper of these system calls in the tree: the agent's
//! listener inside the sandbox, the appliance's connection to a sandbox's CID, the egress path
//! from the sandbox to the host (CID 2), and the sealing proxy's listener (which drives the
//! non-blocking calls below from its async runtime).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The host's CID as seen from a guest.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;
/// Binds on every local CID.
pub const ANY_CID: u32 = libc::VMADDR_CID_ANY;
/// Lets the kernel pick the port.
pub const ANY_PORT: u32 = libc::VMADDR_PORT_ANY;

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

/// A new AF_VSOCK stream socket (close-on-exec).
pub fn socket(nonblocking: bool) -> io::Result<OwnedFd> {
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
            tv_usec: libc::suseconds_t::from(d.subsec_micros()),
        },
    };
    // SAFETY: `tv` is a live timeval and the length passed is its exact size.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw const tv).cast(),
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
        let what = || format!("connect to vsock {cid}:{port}");
        let (fd, in_progress) = start_connect(cid, port, timeout.is_some())?;
        if let Some(timeout) = timeout {
            if in_progress {
                wait_writable(fd.as_raw_fd(), timeout, &what())?;
                take_error(fd.as_fd()).map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", what())))?;
            }
            set_blocking(fd.as_raw_fd())?;
        }
        Ok(VsockStream { fd })
    }
}

/// Starts connecting a new socket to `cid:port`. A non-blocking socket may answer "in
/// progress" (`true`): wait until it is writable, then read the outcome with [`take_error`].
pub fn start_connect(cid: u32, port: u32, nonblocking: bool) -> io::Result<(OwnedFd, bool)> {
    let fd = socket(nonblocking)?;
    let addr = address(cid, port);
    // SAFETY: `addr` is a live sockaddr_vm and the length passed is its exact size.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        return Ok((fd, false));
    }
    let err = io::Error::last_os_error();
    if nonblocking && err.raw_os_error() == Some(libc::EINPROGRESS) {
        return Ok((fd, true));
    }
    Err(io::Error::new(err.kind(), format!("connect to vsock {cid}:{port}: {err}")))
}

/// The pending error of a socket (SO_ERROR): how a non-blocking connect ended.
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut so_error: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `so_error` and `len` are live and sized for an int option.
    let ret = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut so_error).cast(), &raw mut len)
    };
    check(ret, "getsockopt(SO_ERROR)")?;
    if so_error != 0 {
        return Err(io::Error::from_raw_os_error(so_error));
    }
    Ok(())
}

/// Waits until a connecting socket is writable (its connect has finished, either way).
fn wait_writable(fd: RawFd, timeout: Duration, what: &str) -> io::Result<()> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    loop {
        // SAFETY: `pfd` is one live pollfd, matching the count of 1.
        let ret = unsafe { libc::poll(&raw mut pfd, 1, ms) };
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
        return Ok(());
    }
}

/// One read(2) on a socket (blocking or not, as the socket is).
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable buffer of exactly `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One send(2); a closed peer is EPIPE, never SIGPIPE.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live buffer of exactly `buf.len()` bytes; MSG_NOSIGNAL turns a
    // closed peer into EPIPE instead of a signal.
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// shutdown(2) of one or both directions.
pub fn shutdown(fd: BorrowedFd<'_>, how: Shutdown) -> io::Result<()> {
    let how = match how {
        Shutdown::Read => libc::SHUT_RD,
        Shutdown::Write => libc::SHUT_WR,
        Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown(2) with integer arguments on a descriptor the caller holds.
    check(unsafe { libc::shutdown(fd.as_raw_fd(), how) }, "shutdown").map(|_| ())
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read(self.fd.as_fd(), buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send(self.fd.as_fd(), buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl VsockStream {
    /// A second handle on the same connection, for a reader and a writer thread.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(VsockStream { fd: self.fd.try_clone()? })
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        set_timeout(self.fd.as_raw_fd(), libc::SO_RCVTIMEO, timeout)
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        set_timeout(self.fd.as_raw_fd(), libc::SO_SNDTIMEO, timeout)
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        shutdown(self.fd.as_fd(), how)
    }
}

impl AsFd for VsockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
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
    /// A blocking listener on `port` of every local CID.
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        let fd = bind_listen(ANY_CID, port, false, 128)?;
        Ok(VsockListener { fd, port })
    }

    pub fn port(&self) -> u32 {
        self.port
    }

    /// Accepts one connection and returns it with the peer's CID.
    pub fn accept_with_peer(&self) -> io::Result<(VsockStream, u32)> {
        let (fd, cid) = accept(self.fd.as_fd(), false)
            .map_err(|err| io::Error::new(err.kind(), format!("accept on vsock port {}: {err}", self.port)))?;
        Ok((VsockStream { fd }, cid))
    }
}

/// A new socket bound to `cid:port` and listening.
pub fn bind_listen(cid: u32, port: u32, nonblocking: bool, backlog: i32) -> io::Result<OwnedFd> {
    let fd = socket(nonblocking)?;
    let addr = address(cid, port);
    // SAFETY: `addr` is a live sockaddr_vm and the length passed is its exact size.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    check(ret, &format!("bind vsock port {port}"))?;
    // SAFETY: listen(2) with integer arguments on the descriptor just bound.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) }, &format!("listen on vsock port {port}"))?;
    Ok(fd)
}

/// The port a socket is bound to (useful after binding [`ANY_PORT`]).
pub fn local_port(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut addr = address(0, 0);
    let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into the live `addr`.
    let ret = unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut addr).cast(), &raw mut len) };
    check(ret, "getsockname(AF_VSOCK)")?;
    Ok(addr.svm_port)
}

/// Accepts one connection (retrying on EINTR); returns it with the peer's CID, which the
/// hypervisor assigned and the guest cannot forge. A non-blocking listener answers
/// `WouldBlock` when nothing is pending.
pub fn accept(listener: BorrowedFd<'_>, nonblocking: bool) -> io::Result<(OwnedFd, u32)> {
    let mut addr = address(0, 0);
    let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    let flags = libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    loop {
        // SAFETY: `addr`/`len` are live and describe a sockaddr_vm-sized buffer that accept4
        // fills in; the returned descriptor is new and owned by nobody else.
        let fd = unsafe { libc::accept4(listener.as_raw_fd(), (&raw mut addr).cast(), &raw mut len, flags) };
        if fd >= 0 {
            // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
            return Ok((unsafe { OwnedFd::from_raw_fd(fd) }, addr.svm_cid));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_layout_matches_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<libc::sockaddr_vm>(), 16);
        let addr = address(42, 1024);
        assert_eq!(i32::from(addr.svm_family), libc::AF_VSOCK);
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

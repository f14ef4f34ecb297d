//! AF_VSOCK listener for tokio: the appliance side of the sandboxes' only way out.
//! The peer CID returned by accept is assigned by the VMM, so it identifies the sandbox.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::listener::ConnectionSource;
use crate::registry::SandboxId;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Registers a descriptor with the current tokio reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other("vsock sockets must be created inside a tokio runtime"));
    }
    // SAFETY: an OwnedFd keeps its descriptor open until dropped and always returns
    // the same raw fd, which is what AsyncFd requires for its whole lifetime.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Listens on a vsock port for connections from any CID.
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<Self> {
        Self::bind_cid(libc::VMADDR_CID_ANY, port)
    }

    pub fn bind_cid(cid: u32, port: u32) -> io::Result<Self> {
        let fd = vsock_socket()?;
        let addr = sockaddr(cid, port);
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes for the duration of the call.
        cvt(unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), len) })?;
        // SAFETY: listen(2) on a descriptor we own.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 1024) })?;
        Ok(Self { fd: register(fd)? })
    }

    /// The bound port (useful after binding `VMADDR_PORT_ANY`).
    pub fn local_port(&self) -> io::Result<u32> {
        let mut addr = sockaddr(0, 0);
        let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: getsockname writes at most `len` bytes into `addr`.
        cvt(unsafe { libc::getsockname(self.fd.as_raw_fd(), (&mut addr as *mut libc::sockaddr_vm).cast(), &mut len) })?;
        Ok(addr.svm_port)
    }

    /// Accepts one connection; returns it with the peer's CID.
    pub async fn accept(&self) -> io::Result<(VsockStream, u32)> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|fd| {
                let mut addr = sockaddr(0, 0);
                let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
                // SAFETY: accept4 writes at most `len` bytes into `addr`; the returned
                // descriptor is checked and then owned by us.
                let conn = cvt(unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        (&mut addr as *mut libc::sockaddr_vm).cast(),
                        &mut len,
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                })?;
                // SAFETY: `conn` is a fresh descriptor from accept4.
                Ok((unsafe { OwnedFd::from_raw_fd(conn) }, addr.svm_cid))
            });
            match res {
                Ok(Ok((fd, cid))) => return Ok((VsockStream { fd: register(fd)? }, cid)),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

impl ConnectionSource for VsockListener {
    type Stream = VsockStream;

    async fn accept(&mut self) -> io::Result<(VsockStream, SandboxId)> {
        VsockListener::accept(self).await
    }
}

/// A connected vsock stream.
pub struct VsockStream {
    fd: AsyncFd<OwnedFd>,
}

impl VsockStream {
    /// Connects to `cid:port` (used by tests over the loopback transport).
    pub async fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = vsock_socket()?;
        let addr = sockaddr(cid, port);
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
        let ret = unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), len) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err);
            }
        }
        let fd = register(fd)?;
        let _ = fd.writable().await?;
        let mut so_error: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one c_int into `so_error`.
        cvt(unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut so_error as *mut libc::c_int).cast(),
                &mut len,
            )
        })?;
        if so_error != 0 {
            return Err(io::Error::from_raw_os_error(so_error));
        }
        Ok(Self { fd })
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let res = guard.try_io(|fd| {
                // SAFETY: reads at most `unfilled.len()` bytes into initialised memory we borrow.
                let n = unsafe { libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let res = guard.try_io(|fd| {
                // SAFETY: writes at most `data.len()` bytes from a slice we borrow;
                // MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
                let n = unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown(2) on a descriptor we own.
        Poll::Ready(cvt(unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) }).map(|_| ()))
    }
}

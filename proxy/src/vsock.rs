//! AF_VSOCK for tokio: the appliance side of the sandboxes' only way out. The system calls are
//! the shared `vsock` crate's; this module only registers the non-blocking sockets with the
//! reactor and implements tokio's I/O traits on them.
//! The peer CID returned by accept is assigned by the VMM, so it identifies the sandbox.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::listener::ConnectionSource;
use crate::registry::SandboxId;

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
        Self::bind_cid(vsock::ANY_CID, port)
    }

    pub fn bind_cid(cid: u32, port: u32) -> io::Result<Self> {
        Ok(Self { fd: register(vsock::bind_listen(cid, port, true, 1024)?)? })
    }

    /// The bound port (useful after binding `vsock::ANY_PORT`).
    pub fn local_port(&self) -> io::Result<u32> {
        vsock::local_port(self.fd.get_ref().as_fd())
    }

    /// Accepts one connection; returns it with the peer's CID.
    pub async fn accept(&self) -> io::Result<(VsockStream, u32)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| vsock::accept(fd.get_ref().as_fd(), true)) {
                Ok(Ok((fd, cid))) => return Ok((VsockStream { fd: register(fd)? }, cid)),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
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
        let (fd, in_progress) = vsock::start_connect(cid, port, true)?;
        let fd = register(fd)?;
        if in_progress {
            let _ = fd.writable().await?;
            vsock::take_error(fd.get_ref().as_fd())?;
        }
        Ok(Self { fd })
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| vsock::read(fd.get_ref().as_fd(), unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| vsock::send(fd.get_ref().as_fd(), data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(vsock::shutdown(self.fd.get_ref().as_fd(), Shutdown::Write))
    }
}

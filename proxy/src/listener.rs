//! Where connections come from, each with the identity of the sandbox behind it.
//! The identity always comes from the transport (vsock peer CID, or the listener a
//! sandbox was given), never from bytes the sandbox sends.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::registry::SandboxId;

/// A stream of accepted connections tagged with their sandbox.
pub trait ConnectionSource: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, SandboxId)>> + Send;
}

/// A TCP listener dedicated to one sandbox: every connection on it is that sandbox.
pub struct TcpSource {
    listener: TcpListener,
    sandbox: SandboxId,
}

impl TcpSource {
    pub fn new(listener: TcpListener, sandbox: SandboxId) -> Self {
        Self { listener, sandbox }
    }
}

impl ConnectionSource for TcpSource {
    type Stream = TcpStream;

    async fn accept(&mut self) -> io::Result<(TcpStream, SandboxId)> {
        let (stream, _) = self.listener.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, self.sandbox))
    }
}

/// A Unix-socket listener dedicated to one sandbox (the userspace-vsock fallback:
/// one socket per VM).
pub struct UnixSource {
    listener: UnixListener,
    sandbox: SandboxId,
}

impl UnixSource {
    pub fn new(listener: UnixListener, sandbox: SandboxId) -> Self {
        Self { listener, sandbox }
    }
}

impl ConnectionSource for UnixSource {
    type Stream = UnixStream;

    async fn accept(&mut self) -> io::Result<(UnixStream, SandboxId)> {
        let (stream, _) = self.listener.accept().await?;
        Ok((stream, self.sandbox))
    }
}

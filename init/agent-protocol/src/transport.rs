//! What the agent protocol runs over: any connected byte stream with read/write timeouts and
//! half-close. AF_VSOCK in production; Unix and TCP sockets implement the same traits so the
//! server and client are tested on the host unchanged.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// A byte stream whose blocking reads can be bounded in time.
pub trait TimedRead: Read {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

/// A connected stream the agent protocol can run over.
pub trait Connection: TimedRead + Write + Send + Sized + 'static {
    /// A second handle on the same connection, for a reader and a writer thread.
    fn try_clone(&self) -> io::Result<Self>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

/// A source of incoming connections.
pub trait Listener: Send + Sync + 'static {
    type Conn: Connection;
    fn accept(&self) -> io::Result<Self::Conn>;
}

impl TimedRead for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl Connection for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

impl Listener for UnixListener {
    type Conn = UnixStream;
    fn accept(&self) -> io::Result<UnixStream> {
        UnixListener::accept(self).map(|(stream, _)| stream)
    }
}

impl TimedRead for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

impl Connection for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
}

impl Listener for TcpListener {
    type Conn = TcpStream;
    fn accept(&self) -> io::Result<TcpStream> {
        let (stream, _) = TcpListener::accept(self)?;
        // Small request/reply frames: send each at once rather than waiting to coalesce.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl TimedRead for vsock::VsockStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        vsock::VsockStream::set_read_timeout(self, timeout)
    }
}

impl Connection for vsock::VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        vsock::VsockStream::try_clone(self)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        vsock::VsockStream::set_write_timeout(self, timeout)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        vsock::VsockStream::shutdown(self, how)
    }
}

impl Listener for vsock::VsockListener {
    type Conn = vsock::VsockStream;
    fn accept(&self) -> io::Result<vsock::VsockStream> {
        self.accept_with_peer().map(|(stream, _)| stream)
    }
}

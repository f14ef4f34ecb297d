//! Stream plumbing: a buffered reader that understands request heads, a stream
//! that replays already-read bytes, and an activity clock for idle timeouts.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const READ_CHUNK: usize = 128 * 1024;

/// Last time any byte moved on a connection, shared by both directions.
pub struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { base: Instant::now(), last_ms: AtomicU64::new(0) })
    }

    pub fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Completes once nothing has moved for `limit`.
    pub async fn idle_timeout(&self, limit: Duration) {
        loop {
            let idle = self.idle_for();
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit.checked_sub(idle).unwrap() + Duration::from_millis(5)).await;
        }
    }
}

#[derive(Debug)]
pub enum HeadReadError {
    TooLarge,
    Timeout,
    /// The peer closed in the middle of a head.
    Truncated,
    Io(io::Error),
}

impl std::fmt::Display for HeadReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge => f.write_str("request head too large"),
            Self::Timeout => f.write_str("timed out waiting for the request head"),
            Self::Truncated => f.write_str("connection closed in the middle of a request head"),
            Self::Io(e) => write!(f, "read failed: {e}"),
        }
    }
}

/// Buffered reader over one direction of a connection.
pub struct Inbound<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    activity: Arc<Activity>,
    bytes_read: u64,
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    pub fn new(inner: R, activity: Arc<Activity>) -> Self {
        Self { inner, buf: vec![0; READ_CHUNK], start: 0, end: 0, activity, bytes_read: 0 }
    }

    /// Bytes read from the stream so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes into the buffer; returns how many (0 at end of stream).
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.inner.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        self.bytes_read += n as u64;
        if n > 0 {
            self.activity.touch();
        }
        Ok(n)
    }

    /// Reads more bytes only if the stream has them right now (never waits);
    /// used to batch several TLS records into one chunk. `Ok(0)`: nothing ready.
    pub async fn fill_ready(&mut self, max_buffered: usize) -> io::Result<usize> {
        if self.end - self.start >= max_buffered {
            return Ok(0);
        }
        if self.end == self.buf.len() {
            if self.start == 0 {
                return Ok(0);
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let inner = &mut self.inner;
        let spare = &mut self.buf[self.end..];
        let n = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(spare);
            match Pin::new(&mut *inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                // Reads are cancel-safe: nothing was consumed.
                Poll::Pending => Poll::Ready(Ok(0)),
            }
        })
        .await?;
        self.end += n;
        self.bytes_read += n as u64;
        if n > 0 {
            self.activity.touch();
        }
        Ok(n)
    }

    /// Reads one request head. `Ok(None)`: the peer closed cleanly between requests.
    /// The wait for the first byte is unbounded here (callers bound it); once a
    /// head has started it must complete within `header_timeout`.
    pub async fn read_head(&mut self, max: usize, header_timeout: Duration) -> Result<Option<Vec<u8>>, HeadReadError> {
        let mut deadline = None;
        let mut scanned = 0;
        loop {
            // Blank lines between keep-alive requests are ignored (RFC 9112 2.2).
            while self.buffered().starts_with(b"\r\n") {
                self.consume(2);
                scanned = 0;
            }
            let data = self.buffered();
            if let Some(i) = memchr::memmem::find(&data[scanned..], b"\r\n\r\n") {
                let end = scanned + i + 4;
                if end > max {
                    return Err(HeadReadError::TooLarge);
                }
                let head = data[..end].to_vec();
                self.consume(end);
                return Ok(Some(head));
            }
            if data.len() > max {
                return Err(HeadReadError::TooLarge);
            }
            scanned = data.len().saturating_sub(3);
            let started = !data.is_empty();
            if started && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + header_timeout);
            }
            let n = match deadline {
                Some(d) => tokio::time::timeout_at(d, self.fill()).await.map_err(|_| HeadReadError::Timeout)?,
                None => self.fill().await,
            }
            .map_err(HeadReadError::Io)?;
            if n == 0 {
                return if self.buffered().is_empty() || self.buffered() == b"\r" {
                    Ok(None)
                } else {
                    Err(HeadReadError::Truncated)
                };
            }
        }
    }

    /// The underlying stream and the bytes read ahead of the caller.
    pub fn into_parts(self) -> (R, Vec<u8>) {
        let rest = self.buf[self.start..self.end].to_vec();
        (self.inner, rest)
    }
}

/// A stream whose first reads return `prefix` (bytes read ahead while parsing).
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self { prefix, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_heads_across_keep_alive_and_reports_truncation() {
        let data: &[u8] = b"\r\nGET / HTTP/1.1\r\nA: b\r\n\r\nBODYGET /2 HTTP/1.1\r\n\r\nPART";
        let mut r = Inbound::new(data, Activity::new());
        let h1 = r.read_head(1024, Duration::from_secs(1)).await.unwrap().unwrap();
        assert_eq!(h1, b"GET / HTTP/1.1\r\nA: b\r\n\r\n");
        assert_eq!(r.buffered(), b"BODYGET /2 HTTP/1.1\r\n\r\nPART");
        r.consume(4);
        let h2 = r.read_head(1024, Duration::from_secs(1)).await.unwrap().unwrap();
        assert_eq!(h2, b"GET /2 HTTP/1.1\r\n\r\n");
        assert!(matches!(r.read_head(1024, Duration::from_secs(1)).await, Err(HeadReadError::Truncated)));
    }

    #[tokio::test]
    async fn limits_head_size() {
        let big = vec![b'a'; 5000];
        let mut r = Inbound::new(&big[..], Activity::new());
        assert!(matches!(r.read_head(1024, Duration::from_secs(1)).await, Err(HeadReadError::TooLarge)));
        let mut empty = Inbound::new(&b""[..], Activity::new());
        assert!(matches!(empty.read_head(1024, Duration::from_secs(1)).await, Ok(None)));
    }
}

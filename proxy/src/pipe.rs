//! A writer that hands its bytes to a task of their own. Forwarding a request body is two
//! CPU-heavy halves: decrypting and rewriting what the sandbox sends, and encrypting it again
//! for the upstream. In one task they take turns on one core; with the upstream half in its own
//! task they run on two, which roughly halves the time a large upload spends in the proxy.
//!
//! Memory stays bounded: at most [`DEPTH`] writes wait in the queue, and the writer applies
//! back-pressure when it is full. Buffers may hold substituted secrets, so they are wiped when
//! dropped. Flushing is the writer task's job: it flushes whenever its queue runs empty, so a
//! request head is on the wire while the sandbox waits for `100 Continue`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{self, error::SendError, OwnedPermit};
use zeroize::Zeroizing;

/// Writes that may wait in the queue (each is one write call, at most a body chunk).
const DEPTH: usize = 4;

type Chunk = Zeroizing<Vec<u8>>;
type Reserve = Pin<Box<dyn Future<Output = Result<OwnedPermit<Chunk>, SendError<()>>> + Send>>;

pub struct PipeWriter {
    tx: Option<mpsc::Sender<Chunk>>,
    reserving: Option<Reserve>,
}

/// Starts the writer task for `upstream` and returns the handle that feeds it. When the handle
/// is shut down (or dropped) the task writes what is queued, then shuts `upstream` down. A
/// write error ends the task; the handle's next write reports a broken pipe.
pub fn spawn<W>(mut upstream: W) -> PipeWriter
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Chunk>(DEPTH);
    tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if upstream.write_all(&chunk).await.is_err() {
                return;
            }
            if rx.is_empty() && upstream.flush().await.is_err() {
                return;
            }
        }
        let _ = upstream.shutdown().await;
    });
    PipeWriter { tx: Some(tx), reserving: None }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the upstream writer has stopped")
}

impl AsyncWrite for PipeWriter {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        let Some(tx) = this.tx.as_ref() else { return Poll::Ready(Err(closed())) };
        let reserving = this.reserving.get_or_insert_with(|| Box::pin(tx.clone().reserve_owned()));
        match reserving.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                this.reserving = None;
                match result {
                    Ok(permit) => {
                        permit.send(Zeroizing::new(buf.to_vec()));
                        Poll::Ready(Ok(buf.len()))
                    }
                    Err(_) => Poll::Ready(Err(closed())),
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued bytes are flushed by the writer task as soon as it catches up.
        match self.tx {
            Some(ref tx) if !tx.is_closed() => Poll::Ready(Ok(())),
            _ => Poll::Ready(Err(closed())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closing the queue lets the task finish the queued writes and shut the upstream down.
        self.reserving = None;
        self.tx = None;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn bytes_arrive_in_order_and_shutdown_reaches_the_upstream() {
        let (near, mut far) = tokio::io::duplex(1024);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.map(|_| got)
        });
        let mut pipe = spawn(near);
        let mut expected = Vec::new();
        for i in 0..200u32 {
            let chunk = vec![(i % 251) as u8; 1 + (i as usize * 37) % 3000];
            expected.extend_from_slice(&chunk);
            pipe.write_all(&chunk).await.unwrap();
        }
        pipe.flush().await.unwrap();
        pipe.shutdown().await.unwrap();
        // read_to_end only returns once the writer task has shut the upstream down.
        let got = reader.await.unwrap().unwrap();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_flush_puts_queued_bytes_on_the_wire_without_more_writes() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut pipe = spawn(near);
        pipe.write_all(b"HEAD\r\n\r\n").await.unwrap();
        pipe.flush().await.unwrap();
        let mut got = [0u8; 8];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HEAD\r\n\r\n");
    }

    #[tokio::test]
    async fn a_dead_upstream_becomes_a_broken_pipe() {
        let (near, far) = tokio::io::duplex(16);
        drop(far);
        let mut pipe = spawn(near);
        let mut result = Ok(());
        // The first writes may still be queued; the failure shows once the task has stopped.
        for _ in 0..100 {
            result = pipe.write_all(&[0u8; 64]).await;
            if result.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}

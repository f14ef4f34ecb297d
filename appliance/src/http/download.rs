//! A download streamed to the client through a bounded pipe: a thread produces the bytes (a
//! file read from a sandbox) into the pipe while the request's thread writes them out in
//! HTTP/1.1 chunks. At most `PIPE_DEPTH` pieces of at most `PIPE_CHUNK` bytes wait in
//! between, so a slow client holds the producer back instead of filling the appliance's
//! memory, whatever the size of the file.
//!
//! The status is chosen from the first piece: a failure before any data is an ordinary JSON
//! error. Once the `200` head is out, a failure cuts the body with a line that is not a chunk
//! size (`CUT_LINE`), never the final zero-length chunk, so every HTTP client reports a
//! broken transfer instead of taking part of a file for all of it (and closes the connection).
//! tiny_http's own chunk encoder cannot do this: it ends the body on drop, even after an error.

use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::Duration;

use tiny_http::{HTTPVersion, Request};

use crate::error::AppError;
use crate::http::reply::{Answered, Reply};

/// The largest piece the pipe carries.
pub const PIPE_CHUNK: usize = 64 << 10;
/// Pieces waiting in the pipe: with `PIPE_CHUNK`, at most 512 KiB per download.
pub const PIPE_DEPTH: usize = 8;
/// How long the producer may go without handing over a piece before the download is cut.
/// The producer has deadlines of its own (the agent client's reply timeout and pace); this
/// only makes sure no download waits forever on one that has none.
pub const STALL_LIMIT: Duration = Duration::from_secs(120);
/// Written instead of a chunk-size line when a body must end unfinished: `t` is not a hex digit.
pub const CUT_LINE: &[u8] = b"transfer-aborted\r\n";

enum Piece {
    Data(Vec<u8>),
    End(Result<u64, AppError>),
}

/// The producer's end of the pipe. A write blocks while the pipe is full and fails once the
/// download is over (the client left or the body was cut), which ends the producer's work.
pub struct PipeSink {
    tx: SyncSender<Piece>,
    /// Bytes handed over so far.
    sent: u64,
}

impl Write for PipeSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(PIPE_CHUNK);
        if n == 0 {
            return Ok(0);
        }
        self.tx
            .send(Piece::Data(buf[..n].to_vec()))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the download ended on the client's side"))?;
        self.sent += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs `produce` on a thread of its own, writing into the pipe, and answers `request` with
/// what it produces: `200 application/octet-stream`, chunked. `produce` returns the size it
/// produced, or the error to answer with.
pub fn stream(
    request: Request,
    produce: impl FnOnce(&mut PipeSink) -> Result<u64, AppError> + Send + 'static,
) -> Answered {
    // HTTP/1.0 has no chunks, and without them a cut body would look complete.
    if request.http_version() != &HTTPVersion(1, 1) {
        let e = AppError::new(505, "file downloads are streamed in chunks, which needs HTTP/1.1");
        return Answered::Reply(Reply::error(&e), Box::new(request));
    }
    let (tx, rx) = mpsc::sync_channel(PIPE_DEPTH);
    let started = std::thread::Builder::new().name("download".into()).spawn(move || {
        let mut sink = PipeSink { tx, sent: 0 };
        let result = produce(&mut sink);
        // The produced size must match what went through the pipe; anything else is a cut.
        let result = result.and_then(|size| {
            if size == sink.sent {
                Ok(size)
            } else {
                Err(AppError::bad_gateway(format!("the file's size was given as {size} bytes but {} came", sink.sent)))
            }
        });
        let _ = sink.tx.send(Piece::End(result));
    });
    if let Err(e) = started {
        let e = AppError::internal(format!("cannot start a thread for the download: {e}"));
        return Answered::Reply(Reply::error(&e), Box::new(request));
    }
    let first = match rx.recv_timeout(STALL_LIMIT) {
        Ok(Piece::Data(data)) => data,
        Ok(Piece::End(Ok(_))) => return Answered::Reply(Reply::bytes(Vec::new()), Box::new(request)),
        Ok(Piece::End(Err(e))) => return Answered::Reply(Reply::error(&e), Box::new(request)),
        Err(RecvTimeoutError::Timeout) => {
            let e = AppError::bad_gateway(format!("the download produced nothing within {}s", STALL_LIMIT.as_secs()));
            return Answered::Reply(Reply::error(&e), Box::new(request));
        }
        Err(RecvTimeoutError::Disconnected) => {
            let e = AppError::internal("the download's thread ended without a result");
            return Answered::Reply(Reply::error(&e), Box::new(request));
        }
    };
    let mut out = request.into_writer();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    if out.write_all(head.as_bytes()).is_err() {
        return Answered::Streamed(0);
    }
    Answered::Streamed(relay(&mut out, &first, &rx))
}

/// Writes `first` and then every piece from `rx` as chunks; returns the status to account.
fn relay(out: &mut dyn Write, first: &[u8], rx: &Receiver<Piece>) -> u16 {
    if write_chunk(out, first).is_err() {
        return 0;
    }
    loop {
        // Flush only when the pipe is empty: full pipes are written in big strides.
        let piece = match rx.try_recv() {
            Ok(piece) => piece,
            Err(TryRecvError::Empty) => {
                if out.flush().is_err() {
                    return 0;
                }
                match rx.recv_timeout(STALL_LIMIT) {
                    Ok(piece) => piece,
                    Err(RecvTimeoutError::Timeout) => {
                        let e = AppError::bad_gateway("the download stalled");
                        return cut(out, &e);
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return cut(out, &AppError::internal("the download's thread ended without a result"));
                    }
                }
            }
            Err(TryRecvError::Disconnected) => {
                return cut(out, &AppError::internal("the download's thread ended without a result"));
            }
        };
        match piece {
            Piece::Data(data) => {
                if write_chunk(out, &data).is_err() {
                    return 0;
                }
            }
            Piece::End(Ok(_)) => {
                let ended = out.write_all(b"0\r\n\r\n").and_then(|()| out.flush());
                return if ended.is_ok() { 200 } else { 0 };
            }
            Piece::End(Err(e)) => return cut(out, &e),
        }
    }
}

/// Ends a body unfinished; returns the failure's status for the accounts. The reason cannot
/// reach the client any more, so it goes to the log (without the query: only the status).
fn cut(out: &mut dyn Write, e: &AppError) -> u16 {
    eprintln!("appliance: a download was cut short after its head: {}", e.status);
    let _ = out.write_all(CUT_LINE).and_then(|()| out.flush());
    e.status
}

fn write_chunk(out: &mut dyn Write, data: &[u8]) -> io::Result<()> {
    out.write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
    out.write_all(data)?;
    out.write_all(b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: Vec<Piece>) -> (u16, Vec<u8>) {
        let (tx, rx) = mpsc::sync_channel(PIPE_DEPTH + pieces.len());
        for p in pieces {
            tx.send(p).expect("send");
        }
        drop(tx);
        let mut out = Vec::new();
        let status = relay(&mut out, b"ab", &rx);
        (status, out)
    }

    #[test]
    fn a_complete_body_ends_with_the_zero_chunk() {
        let (status, out) = run(vec![Piece::Data(vec![b'c'; 17]), Piece::End(Ok(19))]);
        assert_eq!(status, 200);
        let mut expected = b"2\r\nab\r\n11\r\n".to_vec();
        expected.extend_from_slice(&[b'c'; 17]);
        expected.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(out, expected);
    }

    #[test]
    fn a_failure_after_the_head_cuts_the_body_without_the_zero_chunk() {
        let (status, out) = run(vec![Piece::Data(b"cd".to_vec()), Piece::End(Err(AppError::bad_gateway("x")))]);
        assert_eq!(status, 502);
        assert!(out.ends_with(CUT_LINE), "{out:?}");
        assert!(!out.windows(5).any(|w| w == b"0\r\n\r\n"), "{out:?}");
        // A producer that vanishes is a cut too.
        let (status, out) = run(vec![Piece::Data(b"cd".to_vec())]);
        assert_eq!(status, 500);
        assert!(out.ends_with(CUT_LINE));
    }

    #[test]
    fn the_sink_hands_over_bounded_pieces_and_fails_once_the_reader_is_gone() {
        let (tx, rx) = mpsc::sync_channel(PIPE_DEPTH);
        let mut sink = PipeSink { tx, sent: 0 };
        assert_eq!(sink.write(&vec![0u8; 3 * PIPE_CHUNK]).expect("write"), PIPE_CHUNK);
        let Ok(Piece::Data(piece)) = rx.recv() else { panic!("no piece") };
        assert_eq!(piece.len(), PIPE_CHUNK);
        drop(rx);
        assert_eq!(sink.write(b"x").expect_err("reader gone").kind(), io::ErrorKind::BrokenPipe);
    }
}

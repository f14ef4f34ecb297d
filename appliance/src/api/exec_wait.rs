//! A synchronous command that may outlast its client's read timeout. The Python SDK gives every
//! read 30 s, and `exec.run` waits on `POST /exec/run` for as long as the command runs (its
//! default limit is 60 s). So a command still running after `FIRST_WAIT` gets its `200` head
//! at once and then a chunk holding one space every `KEEPALIVE`, and finally its JSON, which
//! JSON parsers read past the leading whitespace, as the OpenComputer API does. Anything that
//! ends sooner is answered as usual, with its real status.

use std::io::Write;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tiny_http::Request;

use crate::error::AppError;
use crate::http::reply::Reply;
use crate::lifecycle::runtime_error;
use crate::runtime::{ExecRequest, SandboxRuntime};

/// How long the answer waits as a whole before its head is sent without it.
pub const FIRST_WAIT: Duration = Duration::from_secs(15);
/// Time between whitespace chunks once the head is out (half the Python SDK's read timeout).
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// How the command's answer went out.
pub enum Answered {
    /// Not yet: the command ended within `FIRST_WAIT` (or failed); the caller sends this reply.
    Reply(Reply, Box<Request>),
    /// Streamed, head first; the status that was sent (200) or 0 if the client left.
    Streamed(u16),
}

/// Runs `exec` and answers `request` with its result, keeping the connection alive while it
/// runs. `to_json` turns the output into the answer's body.
pub fn run(
    runtime: Arc<dyn SandboxRuntime>,
    sandbox_id: &str,
    exec: ExecRequest,
    request: Request,
    to_json: fn(&crate::runtime::ExecOutput) -> Value,
) -> Answered {
    let (tx, rx) = mpsc::sync_channel(1);
    let id = sandbox_id.to_string();
    let started = std::thread::Builder::new().name("exec-run".into()).spawn(move || {
        let _ = tx.send(runtime.exec_run(&id, &exec));
    });
    if let Err(e) = started {
        let e = AppError::internal(format!("cannot start a thread for the command: {e}"));
        return Answered::Reply(Reply::error(&e), Box::new(request));
    }
    let reply_of = |result: Result<_, _>| match result {
        Ok(out) => Reply::json(200, &to_json(&out)),
        Err(e) => Reply::error(&runtime_error(e)),
    };
    let lost = || Reply::error(&AppError::internal("the command's thread ended without a result"));
    match rx.recv_timeout(FIRST_WAIT) {
        Ok(result) => return Answered::Reply(reply_of(result), Box::new(request)),
        Err(RecvTimeoutError::Disconnected) => return Answered::Reply(lost(), Box::new(request)),
        Err(RecvTimeoutError::Timeout) => {}
    }
    // HTTP/1.0 has no chunks: such a client waits for the whole answer.
    if request.http_version() != &tiny_http::HTTPVersion(1, 1) {
        let reply = rx.recv().map_or_else(|_| lost(), reply_of);
        return Answered::Reply(reply, Box::new(request));
    }
    let mut out = request.into_writer();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if write_flushed(&mut out, head.as_bytes()).is_err() {
        return Answered::Streamed(0);
    }
    let body = loop {
        if write_chunk(&mut out, b" ").is_err() {
            // The client left; the command still runs to its own limit.
            return Answered::Streamed(0);
        }
        match rx.recv_timeout(KEEPALIVE) {
            Ok(Ok(output)) => break to_json(&output),
            // Too late for a status: the error goes in the body, as the OpenComputer API sends it.
            Ok(Err(e)) => break serde_json::json!({ "error": runtime_error(e).message }),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                break serde_json::json!({ "error": "the command's thread ended without a result" })
            }
        }
    };
    let sent = write_chunk(&mut out, body.to_string().as_bytes()).and_then(|()| write_flushed(&mut out, b"0\r\n\r\n"));
    Answered::Streamed(if sent.is_ok() { 200 } else { 0 })
}

fn write_chunk(out: &mut dyn Write, data: &[u8]) -> std::io::Result<()> {
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    write_flushed(out, &chunk)
}

fn write_flushed(out: &mut dyn Write, data: &[u8]) -> std::io::Result<()> {
    out.write_all(data)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_carry_their_length_in_hex() {
        let mut out = Vec::new();
        write_chunk(&mut out, &[b'x'; 26]).expect("write");
        assert_eq!(&out[..4], b"1a\r\n");
        assert_eq!(&out[out.len() - 2..], b"\r\n");
        assert_eq!(out.len(), 4 + 26 + 2);
    }
}

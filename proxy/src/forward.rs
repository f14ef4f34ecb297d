//! Forwarding of one request (head and body) from the sandbox to the upstream,
//! replacing tokens on the way and re-framing the body when its length changes.

use std::fmt;
use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use zeroize::{Zeroize, Zeroizing};

use crate::body::{request_coding, BodyRewriter, Coding};
use crate::http::chunked::{encode_chunk, encode_last, ChunkError, ChunkedDecoder};
use crate::http::head::{BodyFraming, HeadError, RequestHead, Version};
use crate::io::Inbound;
use crate::subst::Replacements;

#[derive(Debug)]
pub enum ForwardError {
    Head(HeadError),
    Chunk(ChunkError),
    /// The sandbox closed the connection in the middle of a body.
    ClientClosed,
    /// A gzip/deflate body could not be decoded while streaming.
    Coding(String),
    /// HTTP/1.0 cannot carry a re-chunked body, and this one is too large to buffer.
    Http10BodyTooLarge,
    Io(io::Error),
}

impl fmt::Display for ForwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Head(e) => write!(f, "bad request head: {e}"),
            Self::Chunk(e) => write!(f, "bad chunked body: {e}"),
            Self::ClientClosed => f.write_str("client closed the connection mid-body"),
            Self::Coding(e) => write!(f, "cannot decode compressed body: {e}"),
            Self::Http10BodyTooLarge => f.write_str("HTTP/1.0 request body too large to rewrite; use HTTP/1.1"),
            Self::Io(e) => write!(f, "i/o error: {}", e.kind()),
        }
    }
}

impl From<io::Error> for ForwardError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Body bytes collected (when already readable) before one chunk is written.
const GATHER: usize = 128 * 1024;

/// Size and framing rules checked before anything is sent upstream.
pub fn precheck(head: &RequestHead, max_buffered: usize, may_rewrite: bool) -> Result<BodyFraming, ForwardError> {
    let framing = head.framing().map_err(ForwardError::Head)?;
    if head.method.eq_ignore_ascii_case("CONNECT") {
        return Err(ForwardError::Head(HeadError::BadRequestLine));
    }
    if head.version == Version::Http10 && may_rewrite {
        // HTTP/1.0 has no chunked coding, so a rewritten body must fit in memory.
        if let BodyFraming::Length(n) = framing {
            if n > max_buffered as u64 {
                return Err(ForwardError::Http10BodyTooLarge);
            }
        }
    }
    Ok(framing)
}

/// True for a request that switches protocols (e.g. WebSocket): after its head
/// the connection carries opaque bytes.
pub fn is_upgrade(head: &RequestHead) -> bool {
    head.header("upgrade").is_some() && head.has_token("connection", "upgrade")
}

fn substitute_head(head: &mut RequestHead, repl: &Replacements) -> u64 {
    if repl.is_empty() {
        return 0;
    }
    let mut n = 0;
    let mut scratch = Vec::new();
    n += repl.replace_all(&head.target, &mut scratch);
    std::mem::swap(&mut head.target, &mut scratch);
    scratch.zeroize();
    for h in &mut head.headers {
        scratch.clear();
        n += repl.replace_all(&h.value, &mut scratch);
        std::mem::swap(&mut h.value, &mut scratch);
        scratch.zeroize();
    }
    n
}

fn wipe_head(head: &mut RequestHead) {
    head.target.zeroize();
    for h in &mut head.headers {
        h.value.zeroize();
    }
}

async fn ensure_buffered<R: AsyncRead + Unpin>(inbound: &mut Inbound<R>) -> Result<(), ForwardError> {
    if inbound.buffered().is_empty() && inbound.fill().await? == 0 {
        return Err(ForwardError::ClientClosed);
    }
    Ok(())
}

/// Like `ensure_buffered`, then also takes whatever else is already readable, up
/// to `want` bytes, so large bodies move in few big chunks and writes.
async fn gather<R: AsyncRead + Unpin>(inbound: &mut Inbound<R>, want: usize) -> Result<(), ForwardError> {
    ensure_buffered(inbound).await?;
    while inbound.buffered().len() < want && inbound.fill_ready(want).await? > 0 {}
    Ok(())
}

/// Sends `head` and its body to `upstream`. Returns the number of tokens replaced.
pub async fn forward_request<R, W>(
    mut head: RequestHead,
    framing: BodyFraming,
    inbound: &mut Inbound<R>,
    upstream: &mut W,
    repl: &Arc<Replacements>,
    max_buffered: usize,
    max_trailer_bytes: usize,
) -> Result<u64, ForwardError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut replaced = substitute_head(&mut head, repl);
    head.remove_header("proxy-connection");
    head.remove_header("proxy-authorization");
    let coding = request_coding(&head);
    let expect_continue = head.version == Version::Http11 && head.has_token("expect", "100-continue");
    let mut wire = Zeroizing::new(Vec::with_capacity(64 * 1024));

    match framing {
        BodyFraming::None => {
            head.write_to(&mut wire);
            upstream.write_all(&wire).await?;
        }
        _ if repl.is_empty() || coding == Coding::Opaque => {
            head.write_to(&mut wire);
            upstream.write_all(&wire).await?;
            copy_body_unchanged(framing, inbound, upstream, max_trailer_bytes).await?;
        }
        BodyFraming::Length(n) if n <= max_buffered as u64 && (!expect_continue || head.version == Version::Http10) => {
            replaced += forward_buffered(&mut head, n, coding, inbound, upstream, repl, &mut wire).await?;
        }
        BodyFraming::Length(_) | BodyFraming::Chunked => {
            head.remove_header("content-length");
            head.set_header("Transfer-Encoding", b"chunked");
            head.write_to(&mut wire);
            upstream.write_all(&wire).await?;
            // The sandbox may wait for `100 Continue` before sending the body.
            upstream.flush().await?;
            wire.clear();
            replaced += stream_body(framing, coding, inbound, upstream, repl, max_trailer_bytes).await?;
        }
    }
    wipe_head(&mut head);
    upstream.flush().await?;
    Ok(replaced)
}

/// Whole body in memory (bounded by `max_buffered`), so Content-Length can be corrected.
async fn forward_buffered<R, W>(
    head: &mut RequestHead,
    len: u64,
    coding: Coding,
    inbound: &mut Inbound<R>,
    upstream: &mut W,
    repl: &Arc<Replacements>,
    wire: &mut Vec<u8>,
) -> Result<u64, ForwardError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let len = usize::try_from(len).map_err(|_| ForwardError::Head(HeadError::BadContentLength))?;
    let mut body = Zeroizing::new(Vec::with_capacity(len));
    while body.len() < len {
        ensure_buffered(inbound).await?;
        let take = inbound.buffered().len().min(len - body.len());
        body.extend_from_slice(&inbound.buffered()[..take]);
        inbound.consume(take);
    }
    let mut rewritten = Zeroizing::new(Vec::with_capacity(len + 256));
    let mut rewriter = BodyRewriter::new(coding, repl.clone());
    let outcome = rewriter.push(&body, &mut rewritten).and_then(|()| rewriter.finish(&mut rewritten));
    let (payload, replaced): (&[u8], u64) = match outcome {
        Ok(n) if n > 0 => (&rewritten, n),
        // No token inside, or a body that does not decode: send it exactly as received.
        _ => (&body, 0),
    };
    head.set_header("Content-Length", payload.len().to_string().as_bytes());
    head.write_to(wire);
    wire.extend_from_slice(payload);
    upstream.write_all(wire).await?;
    Ok(replaced)
}

/// Body streamed through the rewriter and sent re-chunked. Output is written
/// straight after a fixed-width chunk-size placeholder (leading zeros are valid),
/// so each chunk is assembled with one copy.
async fn stream_body<R, W>(
    framing: BodyFraming,
    coding: Coding,
    inbound: &mut Inbound<R>,
    upstream: &mut W,
    repl: &Arc<Replacements>,
    max_trailer_bytes: usize,
) -> Result<u64, ForwardError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut rewriter = BodyRewriter::new(coding, repl.clone());
    // Buffers are reused chunk after chunk and wiped when dropped.
    let mut decoded = Zeroizing::new(Vec::with_capacity(GATHER));
    let mut wire = Zeroizing::new(Vec::with_capacity(GATHER + 1024));
    let coding_err = |e: io::Error| ForwardError::Coding(e.kind().to_string());
    let mut trailers = Zeroizing::new(Vec::new());
    match framing {
        BodyFraming::Length(mut remaining) => {
            while remaining > 0 {
                gather(inbound, usize::try_from(remaining).unwrap_or(usize::MAX).min(GATHER)).await?;
                let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(inbound.buffered().len());
                let at = begin_chunk(&mut wire);
                rewriter.push(&inbound.buffered()[..take], &mut wire).map_err(coding_err)?;
                end_chunk(&mut wire, at);
                inbound.consume(take);
                remaining -= take as u64;
                flush_chunk(upstream, &mut wire).await?;
            }
        }
        BodyFraming::Chunked => {
            let mut decoder = ChunkedDecoder::new(max_trailer_bytes);
            while !decoder.is_done() {
                gather(inbound, GATHER).await?;
                let used = decoder.decode(inbound.buffered(), &mut decoded).map_err(ForwardError::Chunk)?;
                inbound.consume(used);
                let at = begin_chunk(&mut wire);
                rewriter.push(&decoded, &mut wire).map_err(coding_err)?;
                end_chunk(&mut wire, at);
                decoded.clear();
                flush_chunk(upstream, &mut wire).await?;
            }
            repl.replace_all(decoder.trailers(), &mut trailers);
        }
        BodyFraming::None => {}
    }
    let at = begin_chunk(&mut wire);
    let replaced = rewriter.finish(&mut wire).map_err(coding_err)?;
    end_chunk(&mut wire, at);
    encode_last(&trailers, &mut wire);
    upstream.write_all(&wire).await?;
    Ok(replaced)
}

const CHUNK_SIZE_DIGITS: usize = 8;

fn begin_chunk(wire: &mut Vec<u8>) -> usize {
    let at = wire.len();
    wire.extend_from_slice(b"00000000\r\n");
    at
}

/// Fills in the size of the chunk begun at `at`, or removes it if empty (an empty
/// chunk would end the body).
fn end_chunk(wire: &mut Vec<u8>, at: usize) {
    let data_len = wire.len() - at - CHUNK_SIZE_DIGITS - 2;
    if data_len == 0 {
        wire.truncate(at);
        return;
    }
    let digits = format!("{data_len:0CHUNK_SIZE_DIGITS$x}");
    if digits.len() == CHUNK_SIZE_DIGITS {
        wire[at..at + CHUNK_SIZE_DIGITS].copy_from_slice(digits.as_bytes());
        wire.extend_from_slice(b"\r\n");
    } else {
        // Over 4 GiB in one chunk cannot happen with bounded reads; re-encode anyway.
        let data = wire.split_off(at + CHUNK_SIZE_DIGITS + 2);
        wire.truncate(at);
        encode_chunk(&data, wire);
    }
}

async fn flush_chunk<W: AsyncWrite + Unpin>(upstream: &mut W, wire: &mut Vec<u8>) -> Result<(), ForwardError> {
    if !wire.is_empty() {
        upstream.write_all(wire).await?;
        wire.clear();
    }
    Ok(())
}

/// Forwards a body byte for byte (no token may be replaced in it).
async fn copy_body_unchanged<R, W>(
    framing: BodyFraming,
    inbound: &mut Inbound<R>,
    upstream: &mut W,
    max_trailer_bytes: usize,
) -> Result<(), ForwardError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match framing {
        BodyFraming::None => {}
        BodyFraming::Length(mut remaining) => {
            while remaining > 0 {
                gather(inbound, usize::try_from(remaining).unwrap_or(usize::MAX).min(GATHER)).await?;
                let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(inbound.buffered().len());
                upstream.write_all(&inbound.buffered()[..take]).await?;
                inbound.consume(take);
                remaining -= take as u64;
            }
        }
        BodyFraming::Chunked => {
            // Decode only to find where the body ends; the raw bytes are forwarded.
            let mut decoder = ChunkedDecoder::new(max_trailer_bytes);
            let mut discard = Vec::with_capacity(64 * 1024);
            while !decoder.is_done() {
                ensure_buffered(inbound).await?;
                let used = decoder.decode(inbound.buffered(), &mut discard).map_err(ForwardError::Chunk)?;
                discard.clear();
                upstream.write_all(&inbound.buffered()[..used]).await?;
                inbound.consume(used);
            }
        }
    }
    Ok(())
}

/// After an upgrade: the remaining client bytes go upstream unchanged.
pub async fn copy_raw<R, W>(inbound: &mut Inbound<R>, upstream: &mut W) -> Result<(), ForwardError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if inbound.buffered().is_empty() && inbound.fill().await? == 0 {
            upstream.shutdown().await?;
            return Ok(());
        }
        upstream.write_all(inbound.buffered()).await?;
        upstream.flush().await?;
        let n = inbound.buffered().len();
        inbound.consume(n);
    }
}

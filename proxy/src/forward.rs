//! Forwarding of one request (head and body) from the sandbox to the upstream,
//! replacing tokens on the way and re-framing the body when its length changes.
//!
//! Uncompressed bodies stream. A gzip/deflate body in which a token may be
//! replaced is read whole (capped), inflated and rewritten on a blocking thread
//! under caps on its decompressed size and ratio, and only then sent, with its
//! exact Content-Length; past a cap nothing of the request goes upstream.

use std::fmt;
use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use zeroize::{Zeroize, Zeroizing};

use crate::body::{request_coding, rewrite_compressed, show_size, Coding, CompressedError, InflateCaps, Rewritten};
use crate::config::Limits;
use crate::http::chunked::{begin_chunk, encode_chunk, encode_last, end_chunk, ChunkError, ChunkedDecoder};
use crate::http::head::{BodyFraming, HeadError, RequestHead, Version};
use crate::io::Inbound;
use crate::subst::{Replacements, Substituter};

#[derive(Debug)]
pub enum ForwardError {
    Head(HeadError),
    Chunk(ChunkError),
    /// The sandbox closed the connection in the middle of a body.
    ClientClosed,
    /// A gzip/deflate body does not decode, and a token in the part that does
    /// could not be replaced. Nothing of the request was sent upstream (answer 400).
    Coding(String),
    /// HTTP/1.0 cannot carry a re-chunked body, and this one is too large to buffer.
    Http10BodyTooLarge,
    /// A gzip/deflate body passes a cap (compressed size, decompressed size or
    /// ratio; the message names it). Nothing of the request was sent upstream
    /// (answer 413).
    InflateLimit(String),
    Io(io::Error),
}

impl ForwardError {
    /// True when the request was refused before any byte of it (head included)
    /// went upstream, so it can be answered. The request's body may be partly
    /// unread: the connection cannot carry another request after the answer.
    pub fn nothing_sent(&self) -> bool {
        matches!(self, Self::Coding(_) | Self::InflateLimit(_))
    }
}

impl fmt::Display for ForwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Head(e) => write!(f, "bad request head: {e}"),
            Self::Chunk(e) => write!(f, "bad chunked body: {e}"),
            Self::ClientClosed => f.write_str("client closed the connection mid-body"),
            Self::Coding(e) => write!(f, "cannot decode compressed body: {e}"),
            Self::Http10BodyTooLarge => f.write_str("HTTP/1.0 request body too large to rewrite; use HTTP/1.1"),
            Self::InflateLimit(why) => f.write_str(why),
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
pub fn precheck(head: &RequestHead, limits: &Limits, may_rewrite: bool) -> Result<BodyFraming, ForwardError> {
    let framing = head.framing().map_err(ForwardError::Head)?;
    if head.method.eq_ignore_ascii_case("CONNECT") {
        return Err(ForwardError::Head(HeadError::BadRequestLine));
    }
    if let (true, BodyFraming::Length(n)) = (may_rewrite, framing) {
        match request_coding(head) {
            Coding::Gzip | Coding::Deflate if n > limits.max_compressed_body as u64 => {
                return Err(ForwardError::InflateLimit(compressed_cap_text(limits)));
            }
            // HTTP/1.0 has no chunked coding, so a rewritten body must fit in memory
            // (compressed ones always do: they are read whole under their own cap).
            Coding::Identity if head.version == Version::Http10 && n > limits.max_buffered_body as u64 => {
                return Err(ForwardError::Http10BodyTooLarge);
            }
            _ => {}
        }
    }
    Ok(framing)
}

fn compressed_cap_text(limits: &Limits) -> String {
    format!(
        "compressed request body over the {} cap for bodies the proxy may rewrite",
        show_size(limits.max_compressed_body as u64)
    )
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
/// Trailers of chunked bodies are capped at `limits.max_header_bytes`. On an error
/// for which [`ForwardError::nothing_sent`] holds, nothing was written to `upstream`.
pub async fn forward_request<R, W>(
    mut head: RequestHead,
    framing: BodyFraming,
    inbound: &mut Inbound<R>,
    upstream: &mut W,
    repl: &Arc<Replacements>,
    limits: &Limits,
) -> Result<u64, ForwardError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max_buffered = limits.max_buffered_body;
    let max_trailer_bytes = limits.max_header_bytes;
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
        _ if coding.is_compressed() => {
            let result =
                forward_compressed(&mut head, framing, coding, inbound, upstream, repl, limits, &mut wire).await;
            if result.is_err() {
                wipe_head(&mut head);
            }
            replaced += result?;
        }
        BodyFraming::Length(n) if n <= max_buffered as u64 && (!expect_continue || head.version == Version::Http10) => {
            replaced += forward_buffered(&mut head, n, inbound, upstream, repl, &mut wire).await?;
        }
        BodyFraming::Length(_) | BodyFraming::Chunked => {
            head.remove_header("content-length");
            head.set_header("Transfer-Encoding", b"chunked");
            head.write_to(&mut wire);
            upstream.write_all(&wire).await?;
            // The sandbox may wait for `100 Continue` before sending the body.
            upstream.flush().await?;
            wire.clear();
            replaced += stream_body(framing, inbound, upstream, repl, max_trailer_bytes).await?;
        }
    }
    wipe_head(&mut head);
    upstream.flush().await?;
    Ok(replaced)
}

/// Reads a whole compressed body (up to `max_compressed_body`), de-chunked, and
/// the raw trailer lines of a chunked one. Nothing is written anywhere.
async fn read_compressed<R: AsyncRead + Unpin>(
    framing: BodyFraming,
    inbound: &mut Inbound<R>,
    limits: &Limits,
) -> Result<(Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>), ForwardError> {
    let max = limits.max_compressed_body;
    let mut body = Zeroizing::new(Vec::new());
    let mut trailers = Zeroizing::new(Vec::new());
    match framing {
        BodyFraming::None => {}
        BodyFraming::Length(n) => {
            let len = usize::try_from(n).ok().filter(|&l| l <= max);
            let len = len.ok_or_else(|| ForwardError::InflateLimit(compressed_cap_text(limits)))?;
            // Grows with what arrives, not with what the head announces.
            body.reserve(len.min(GATHER));
            while body.len() < len {
                ensure_buffered(inbound).await?;
                let take = inbound.buffered().len().min(len - body.len());
                body.extend_from_slice(&inbound.buffered()[..take]);
                inbound.consume(take);
            }
        }
        BodyFraming::Chunked => {
            let mut decoder = ChunkedDecoder::new(limits.max_header_bytes);
            while !decoder.is_done() {
                ensure_buffered(inbound).await?;
                // Overshoots `max` by at most one read buffer before the check.
                let used = decoder.decode(inbound.buffered(), &mut body).map_err(ForwardError::Chunk)?;
                inbound.consume(used);
                if body.len() > max {
                    return Err(ForwardError::InflateLimit(compressed_cap_text(limits)));
                }
            }
            trailers.extend_from_slice(decoder.trailers());
        }
    }
    Ok((body, trailers))
}

/// A gzip/deflate body that may hold tokens: read whole, rewritten on a blocking
/// thread under the inflate caps, then sent with the head in one go. Any error
/// is returned before anything is written to `upstream`.
#[allow(clippy::too_many_arguments)] // Internal step of `forward_request_with`, sharing its state.
async fn forward_compressed<R, W>(
    head: &mut RequestHead,
    framing: BodyFraming,
    coding: Coding,
    inbound: &mut Inbound<R>,
    upstream: &mut W,
    repl: &Arc<Replacements>,
    limits: &Limits,
    wire: &mut Vec<u8>,
) -> Result<u64, ForwardError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (body, trailers) = read_compressed(framing, inbound, limits).await?;
    let caps =
        InflateCaps { max_inflated: limits.max_inflated_body as u64, max_ratio: u64::from(limits.max_inflate_ratio) };
    let task_repl = repl.clone();
    // Inflating up to the caps is CPU work of up to a fraction of a second: keep it
    // off the async workers, which serve every other connection.
    let (body, outcome) = tokio::task::spawn_blocking(move || {
        let outcome = rewrite_compressed(coding, &body, &task_repl, caps);
        (body, outcome)
    })
    .await
    .map_err(|_| ForwardError::Coding("the decompression task failed".to_string()))?;
    let (rewritten, mut replaced) = match outcome {
        Ok(Rewritten::Unchanged) => (None, 0),
        Ok(Rewritten::Body { body, replaced }) => (Some(body), replaced),
        Err(CompressedError::Limit(why)) => return Err(ForwardError::InflateLimit(why)),
        Err(CompressedError::Corrupt(why)) => return Err(ForwardError::Coding(why)),
    };
    let payload: &[u8] = rewritten.as_deref().map_or(&body, Vec::as_slice);
    // The body follows the head at once: there is nothing to wait for.
    head.remove_header("expect");
    if trailers.is_empty() {
        head.remove_header("transfer-encoding");
        head.set_header("Content-Length", payload.len().to_string().as_bytes());
        head.write_to(wire);
        if payload.len() <= GATHER {
            wire.extend_from_slice(payload);
            upstream.write_all(wire).await?;
        } else {
            // Not copied again: the body can be tens of MiB.
            upstream.write_all(wire).await?;
            upstream.write_all(payload).await?;
        }
    } else {
        // Trailers only exist in the chunked coding (so HTTP/1.1): one chunk, then them.
        let mut fields = Zeroizing::new(Vec::new());
        replaced += repl.replace_all(&trailers, &mut fields);
        head.write_to(wire);
        encode_chunk(payload, wire);
        encode_last(&fields, wire);
        upstream.write_all(wire).await?;
    }
    Ok(replaced)
}

/// Whole body in memory (bounded by `max_buffered`), so Content-Length can be corrected.
async fn forward_buffered<R, W>(
    head: &mut RequestHead,
    len: u64,
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
    let mut subst = Substituter::new(repl.clone());
    subst.push(&body, &mut rewritten);
    subst.finish(&mut rewritten);
    let (payload, replaced): (&[u8], u64) = match subst.replaced() {
        0 => (&body, 0),
        n => (&rewritten, n),
    };
    head.set_header("Content-Length", payload.len().to_string().as_bytes());
    head.write_to(wire);
    wire.extend_from_slice(payload);
    upstream.write_all(wire).await?;
    Ok(replaced)
}

/// Uncompressed body streamed through the substituter and sent re-chunked. Output is written
/// straight after a fixed-width chunk-size placeholder (leading zeros are valid),
/// so each chunk is assembled with one copy.
async fn stream_body<R, W>(
    framing: BodyFraming,
    inbound: &mut Inbound<R>,
    upstream: &mut W,
    repl: &Arc<Replacements>,
    max_trailer_bytes: usize,
) -> Result<u64, ForwardError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut subst = Substituter::new(repl.clone());
    // Buffers are reused chunk after chunk and wiped when dropped.
    let mut decoded = Zeroizing::new(Vec::with_capacity(GATHER));
    let mut wire = Zeroizing::new(Vec::with_capacity(GATHER + 1024));
    let mut trailers = Zeroizing::new(Vec::new());
    match framing {
        BodyFraming::Length(mut remaining) => {
            while remaining > 0 {
                gather(inbound, usize::try_from(remaining).unwrap_or(usize::MAX).min(GATHER)).await?;
                let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(inbound.buffered().len());
                let at = begin_chunk(&mut wire);
                subst.push(&inbound.buffered()[..take], &mut wire);
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
                subst.push(&decoded, &mut wire);
                end_chunk(&mut wire, at);
                decoded.clear();
                flush_chunk(upstream, &mut wire).await?;
            }
            repl.replace_all(decoder.trailers(), &mut trailers);
        }
        BodyFraming::None => {}
    }
    let at = begin_chunk(&mut wire);
    subst.finish(&mut wire);
    let replaced = subst.replaced();
    end_chunk(&mut wire, at);
    encode_last(&trailers, &mut wire);
    upstream.write_all(&wire).await?;
    Ok(replaced)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::parse_request_head;
    use crate::io::Activity;
    use crate::secret::SecretValue;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use std::cell::Cell;
    use std::io::{Read, Write};

    const TOKEN: &str = "osb_sealed_00112233445566778899aabbccddeeff";
    const SECRET: &str = "the-secret-value";

    fn repl() -> Arc<Replacements> {
        let mut r = Replacements::new();
        r.insert(TOKEN.as_bytes(), Arc::new(SecretValue::new(SECRET.as_bytes().to_vec())));
        Arc::new(r)
    }

    fn text_with_tokens() -> String {
        (0..500).map(|i| format!("{{\"n\":{i},\"key\":\"{TOKEN}\"}}\n")).collect()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// `zeros` zero bytes, gzip-compressed as a stream (never held uncompressed).
    fn gzip_zeros(zeros: usize) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(TOKEN.as_bytes()).unwrap();
        let block = vec![0u8; 1 << 20];
        let mut left = zeros;
        while left > 0 {
            let n = left.min(block.len());
            e.write_all(&block[..n]).unwrap();
            left -= n;
        }
        e.finish().unwrap()
    }

    /// Forwards one request whose head is `head` (without the blank line) and body
    /// bytes `body` (as framed on the wire) into an in-memory upstream.
    async fn forward(head: &str, body: &[u8], limits: &Limits) -> (Result<u64, ForwardError>, Vec<u8>) {
        let (mut sandbox, proxy_side) = tokio::io::duplex(body.len() + 1024);
        sandbox.write_all(body).await.unwrap();
        drop(sandbox);
        let mut inbound = Inbound::new(proxy_side, Activity::new());
        let head = parse_request_head(format!("{head}\r\n\r\n").as_bytes(), 64).unwrap();
        let framing = head.framing().unwrap();
        let mut upstream = Vec::new();
        let r = forward_request(head, framing, &mut inbound, &mut upstream, &repl(), limits).await;
        (r, upstream)
    }

    /// Splits what reached the upstream into its head (lowercase) and body.
    fn sent(up: &[u8]) -> (String, &[u8]) {
        let end = up.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head") + 4;
        (String::from_utf8_lossy(&up[..end]).to_ascii_lowercase(), &up[end..])
    }

    fn content_length(head: &str) -> Option<usize> {
        head.lines().find_map(|l| l.strip_prefix("content-length: ")).map(|v| v.trim().parse().unwrap())
    }

    fn limit_error(r: Result<u64, ForwardError>) -> String {
        match r {
            Err(e @ ForwardError::InflateLimit(_)) => {
                assert!(e.nothing_sent());
                e.to_string()
            }
            other => panic!("expected InflateLimit, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn gzip_bomb_is_refused_and_nothing_is_sent() {
        // 1 GiB of zeros, about 1 MiB compressed: within the compressed-size cap,
        // stopped by the decompressed-size cap after 64 MiB of output.
        let bomb = gzip_zeros(1 << 30);
        assert!(bomb.len() < 2 << 20, "bomb is {} bytes", bomb.len());
        let limits = Limits::default();
        let head = format!("POST /b HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: {}", bomb.len());
        let (r, up) = forward(&head, &bomb, &limits).await;
        let why = limit_error(r);
        assert!(why.contains("64 MiB"), "{why}");
        assert!(up.is_empty(), "{} bytes went upstream", up.len());
        // Chunked, the same.
        let mut chunked = Vec::new();
        for c in bomb.chunks(100_000) {
            encode_chunk(c, &mut chunked);
        }
        encode_last(b"", &mut chunked);
        let (r, up) =
            forward("POST /b HTTP/1.1\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked", &chunked, &limits)
                .await;
        assert!(limit_error(r).contains("64 MiB"));
        assert!(up.is_empty());
    }

    #[tokio::test]
    async fn ratio_cap_refuses_a_small_highly_compressible_body() {
        let body = gzip_zeros(8 << 20);
        let head = format!("POST /r HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: {}", body.len());
        let (r, up) = forward(&head, &body, &Limits::default()).await;
        let why = limit_error(r);
        assert!(why.contains("200:1"), "{why}");
        assert!(up.is_empty());
    }

    #[tokio::test]
    async fn compressed_size_cap_is_checked_before_reading() {
        let limits = Limits { max_compressed_body: 64 * 1024, ..Limits::default() };
        let big: Vec<u8> = (0..100_000u32).flat_map(u32::to_le_bytes).collect();
        let gz = gzip(&big);
        assert!(gz.len() > 64 * 1024);
        let head = format!("POST /c HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: {}", gz.len());
        let parsed = parse_request_head(format!("{head}\r\n\r\n").as_bytes(), 64).unwrap();
        let pre = precheck(&parsed, &limits, true);
        assert!(matches!(&pre, Err(ForwardError::InflateLimit(m)) if m.contains("64 KiB")), "{pre:?}");
        assert!(precheck(&parsed, &limits, false).is_ok(), "no token possible: streamed as is");
        let (r, up) = forward(&head, &gz, &limits).await;
        assert!(limit_error(r).contains("64 KiB"));
        assert!(up.is_empty());
        let mut chunked = Vec::new();
        encode_chunk(&gz, &mut chunked);
        encode_last(b"", &mut chunked);
        let (r, up) =
            forward("POST /c HTTP/1.1\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked", &chunked, &limits)
                .await;
        assert!(limit_error(r).contains("64 KiB"));
        assert!(up.is_empty());
    }

    #[tokio::test]
    async fn compressed_bodies_are_rewritten_with_an_exact_length() {
        let text = text_with_tokens();
        let expected = text.replace(TOKEN, SECRET);
        let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
        zlib.write_all(text.as_bytes()).unwrap();
        let mut raw = DeflateEncoder::new(Vec::new(), Compression::default());
        raw.write_all(text.as_bytes()).unwrap();
        let cases =
            [("gzip", gzip(text.as_bytes())), ("deflate", zlib.finish().unwrap()), ("deflate", raw.finish().unwrap())];
        for (i, (coding, body)) in cases.iter().enumerate() {
            let decode = |b: &[u8]| {
                let mut s = String::new();
                match i {
                    0 => flate2::read::GzDecoder::new(b).read_to_string(&mut s),
                    1 => flate2::read::ZlibDecoder::new(b).read_to_string(&mut s),
                    _ => flate2::read::DeflateDecoder::new(b).read_to_string(&mut s),
                }
                .unwrap();
                s
            };
            let mut chunked = Vec::new();
            for c in body.chunks(1000) {
                encode_chunk(c, &mut chunked);
            }
            encode_last(b"", &mut chunked);
            let framings = [
                (
                    format!("POST /x HTTP/1.1\r\nContent-Encoding: {coding}\r\nContent-Length: {}", body.len()),
                    body.clone(),
                ),
                (format!("POST /x HTTP/1.1\r\nContent-Encoding: {coding}\r\nTransfer-Encoding: chunked"), chunked),
                (
                    format!("POST /x HTTP/1.0\r\nContent-Encoding: {coding}\r\nContent-Length: {}", body.len()),
                    body.clone(),
                ),
                (
                    format!(
                        "POST /x HTTP/1.1\r\nContent-Encoding: {coding}\r\nExpect: 100-continue\r\nContent-Length: {}",
                        body.len()
                    ),
                    body.clone(),
                ),
            ];
            for (head, wire) in framings {
                let (r, up) = forward(&head, &wire, &Limits::default()).await;
                assert_eq!(r.unwrap(), 500, "{head}");
                let (h, b) = sent(&up);
                assert_eq!(content_length(&h), Some(b.len()), "{h}");
                assert!(!h.contains("transfer-encoding") && !h.contains("expect"), "{h}");
                assert!(h.contains(&format!("content-encoding: {coding}")), "{h}");
                assert_eq!(decode(b), expected, "{head}");
            }
        }
    }

    #[tokio::test]
    async fn chunked_trailers_keep_the_chunked_framing() {
        let gz = gzip(text_with_tokens().as_bytes());
        let mut wire = Vec::new();
        encode_chunk(&gz, &mut wire);
        encode_last(format!("X-Sig: {TOKEN}\r\n").as_bytes(), &mut wire);
        let (r, up) = forward(
            "POST /t HTTP/1.1\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked",
            &wire,
            &Limits::default(),
        )
        .await;
        assert_eq!(r.unwrap(), 501);
        let (h, rest) = sent(&up);
        assert!(h.contains("transfer-encoding: chunked") && content_length(&h).is_none(), "{h}");
        let mut decoder = ChunkedDecoder::new(1024);
        let mut body = Vec::new();
        assert_eq!(decoder.decode(rest, &mut body).unwrap(), rest.len());
        assert!(decoder.is_done());
        assert_eq!(decoder.trailers(), format!("X-Sig: {SECRET}\r\n").as_bytes());
        let mut s = String::new();
        flate2::read::GzDecoder::new(&body[..]).read_to_string(&mut s).unwrap();
        assert_eq!(s, text_with_tokens().replace(TOKEN, SECRET));
    }

    #[tokio::test]
    async fn corrupt_bodies() {
        // Nothing decodes, so no token can be in the way: sent exactly as received.
        let junk = b"this is not gzip data at all".to_vec();
        let head = format!("POST /j HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: {}", junk.len());
        let (r, up) = forward(&head, &junk, &Limits::default()).await;
        assert_eq!(r.unwrap(), 0);
        let (h, b) = sent(&up);
        assert_eq!((content_length(&h), b), (Some(junk.len()), &junk[..]));
        // A token decodes before the stream breaks: refused, nothing sent.
        let gz = gzip(text_with_tokens().as_bytes());
        let cut = &gz[..gz.len() - 10];
        let head = format!("POST /j HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: {}", cut.len());
        let (r, up) = forward(&head, cut, &Limits::default()).await;
        match r {
            Err(e @ ForwardError::Coding(_)) => {
                assert!(e.nothing_sent());
                assert!(!e.to_string().contains(TOKEN) && !e.to_string().contains(SECRET));
            }
            other => panic!("expected a Coding error, got {other:?}"),
        }
        assert!(up.is_empty());
        // A gzip body without tokens goes byte for byte.
        let plain = gzip(b"nothing to replace");
        let head = "POST /p HTTP/1.1\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked";
        let mut wire = Vec::new();
        encode_chunk(&plain, &mut wire);
        encode_last(b"", &mut wire);
        let (r, up) = forward(head, &wire, &Limits::default()).await;
        assert_eq!(r.unwrap(), 0);
        let (h, b) = sent(&up);
        assert_eq!((content_length(&h), b), (Some(plain.len()), &plain[..]));
    }

    #[tokio::test]
    async fn http10_rules() {
        let limits = Limits { max_buffered_body: 1000, ..Limits::default() };
        let h = |s: &str| parse_request_head(format!("{s}\r\n\r\n").as_bytes(), 64).unwrap();
        let identity = h("POST / HTTP/1.0\r\nContent-Length: 5000");
        assert!(matches!(precheck(&identity, &limits, true), Err(ForwardError::Http10BodyTooLarge)));
        assert!(precheck(&identity, &limits, false).is_ok());
        // A compressed body is read whole under its own cap, whatever the version.
        let gz = h("POST / HTTP/1.0\r\nContent-Encoding: gzip\r\nContent-Length: 5000");
        assert!(precheck(&gz, &limits, true).is_ok());
        let opaque = h("POST / HTTP/1.0\r\nContent-Encoding: br\r\nContent-Length: 5000");
        assert!(precheck(&opaque, &limits, true).is_ok(), "opaque bodies are never rewritten");
    }

    /// On this single-threaded runtime, a sibling future keeps running while the
    /// body inflates: the inflation is not on the async thread.
    #[tokio::test(flavor = "current_thread")]
    async fn inflation_runs_off_the_async_thread() {
        let body = gzip_zeros(48 << 20);
        let limits = Limits { max_inflate_ratio: u32::MAX, ..Limits::default() };
        let head = format!("POST /s HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: {}", body.len());
        let done = Cell::new(false);
        let ticks = Cell::new(0u64);
        let work = async {
            let r = forward(&head, &body, &limits).await;
            done.set(true);
            r
        };
        let ticker = async {
            while !done.get() {
                ticks.set(ticks.get() + 1);
                tokio::task::yield_now().await;
            }
        };
        let ((r, up), ()) = tokio::join!(work, ticker);
        assert_eq!(r.unwrap(), 1);
        assert!(!up.is_empty());
        assert!(ticks.get() > 100, "the async thread was blocked: {} ticks", ticks.get());
    }
}

//! The response side of a connection: upstream bytes back to the sandbox, scrubbed of
//! the sandbox's secret values (see [`crate::scrub`]).
//!
//! With nothing to scrub, bytes are copied unchanged. Otherwise every response is
//! parsed: its status line and header values are scrubbed, its body is unframed,
//! decoded when gzip or deflate, scrubbed while streaming and sent chunked (or, to an
//! HTTP/1.0 client, until close) without Content-Encoding and Content-Length, since
//! scrubbing changes its length. A coding the proxy cannot decode gets a 502 instead
//! of passing unscrubbed. After `101 Switching Protocols` WebSocket frames are
//! scrubbed and re-framed ([`crate::websocket`]); any other protocol's raw bytes are
//! scrubbed as a stream. Memory per connection stays bounded: reads are at most 64 KiB, inflation
//! advances a few KiB of input at a time, the scrubber holds back less than one value.

use std::fmt;
use std::io::{self, Write};
use std::sync::Arc;

use flate2::write::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::body::is_zlib_header;
use crate::http::chunked::{begin_chunk, encode_last, end_chunk, ChunkError, ChunkedDecoder};
use crate::http::head::Version;
use crate::http::response::{parse_response_head, ResponseBody, ResponseHead};
use crate::io::{HeadReadError, Inbound};
use crate::scrub::{ScrubSet, Scrubber};

/// What the response relay must know about a request forwarded upstream, sent to it
/// before the request goes out so responses are read in order.
#[derive(Clone, Debug)]
pub struct Expect {
    /// A HEAD request's response has no body whatever its headers say.
    pub head_request: bool,
    /// The sandbox's HTTP version: an HTTP/1.0 client cannot receive chunked bodies.
    pub client_version: Version,
    /// The sandbox's secret values at the time of the request.
    pub scrub: Arc<ScrubSet>,
}

/// A response that could not be relayed.
#[derive(Debug)]
pub enum RelayError {
    /// Bad upstream response: the sandbox gets a 502 with this message if no byte of
    /// the response was sent yet, else the connection is dropped.
    BadResponse {
        message: String,
        started: bool,
    },
    Io(io::Error),
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadResponse { message, .. } => f.write_str(message),
            Self::Io(e) => write!(f, "i/o error: {}", e.kind()),
        }
    }
}

impl From<io::Error> for RelayError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

fn bad(message: impl Into<String>, started: bool) -> RelayError {
    RelayError::BadResponse { message: message.into(), started }
}

/// Bounds on a response head.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    pub max_bytes: usize,
    pub max_fields: usize,
    /// Once a head has started it must complete within this.
    pub timeout: std::time::Duration,
}

/// Bytes counted towards the connection's egress record.
#[derive(Debug, Default, Clone, Copy)]
pub struct Relayed {
    pub bytes: u64,
    /// Secret-value occurrences replaced by tokens.
    pub scrubbed: u64,
}

/// Upstream input bytes fed to an inflater per step: bounds its output to about a
/// thousand times this (deflate's maximum ratio) before it is drained.
const INFLATE_STEP: usize = 1024;
/// Body bytes collected (when already readable) before one chunk is written.
const GATHER: usize = 64 * 1024;

/// Waits for body bytes, then also takes whatever else is readable right now, up to
/// [`GATHER`]: a TLS read yields one record (16 KiB), and writing each on its own
/// (plus a chunk header, which spills into a second record) costs twice the records.
/// `Ok(false)`: the upstream closed with nothing buffered.
async fn gather<R: AsyncRead + Unpin>(up: &mut Inbound<R>) -> io::Result<bool> {
    if up.buffered().is_empty() && fill(up).await? == 0 {
        return Ok(false);
    }
    while up.buffered().len() < GATHER {
        match up.fill_ready(GATHER).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(true)
}

/// Many servers close TLS without close_notify after a complete response.
pub(crate) async fn fill<R: AsyncRead + Unpin>(up: &mut Inbound<R>) -> io::Result<usize> {
    match up.fill().await {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
        other => other,
    }
}

/// Relays every response until the upstream closes. `expects` yields one entry per
/// forwarded request, in order; `totals` counts what was sent, also when it fails.
pub async fn relay<R, W>(
    upstream: Inbound<R>,
    client: &mut W,
    mut expects: mpsc::UnboundedReceiver<Expect>,
    limits: HeadLimits,
    totals: &mut Relayed,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut up = upstream;
    let mut last: Option<Expect> = None;
    loop {
        // Unsolicited bytes after the last request (e.g. a 408 before closing) are
        // treated as a response to a request like the last one.
        let expect = match expects.try_recv() {
            Ok(e) => e,
            Err(_) if !up.buffered().is_empty() => match &last {
                Some(l) => l.clone(),
                None => expects.recv().await.ok_or_else(|| bad("response without a request", false))?,
            },
            Err(_) => tokio::select! {
                e = expects.recv() => match e {
                    Some(e) => e,
                    None => match &last {
                        Some(l) => l.clone(),
                        None => return Ok(()),
                    },
                },
                n = fill(&mut up) => {
                    if n? == 0 {
                        return Ok(());
                    }
                    continue;
                }
            },
        };
        if expect.scrub.is_empty() {
            // No secret value can be in anything this connection carries (a sandbox
            // never gains tokens while it runs): plain copy from here on.
            return copy_unchanged(&mut up, client, totals).await.map_err(RelayError::Io);
        }
        match relay_response(&mut up, client, &expect, limits, totals).await? {
            Next::Continue => last = Some(expect),
            Next::Close => return Ok(()),
        }
    }
}

enum Next {
    Continue,
    Close,
}

/// How the body is framed towards the sandbox.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OutFraming {
    Chunked,
    UntilClose,
}

/// One response (with any interim 1xx before it).
async fn relay_response<R, W>(
    up: &mut Inbound<R>,
    client: &mut W,
    expect: &Expect,
    limits: HeadLimits,
    totals: &mut Relayed,
) -> Result<Next, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let scrub = &expect.scrub;
    loop {
        let raw = match up.read_head(limits.max_bytes, limits.timeout).await {
            Ok(Some(raw)) => Zeroizing::new(raw),
            Ok(None) => return Ok(Next::Close),
            Err(HeadReadError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Next::Close),
            Err(HeadReadError::Io(e)) => return Err(RelayError::Io(e)),
            Err(e) => return Err(bad(format!("upstream response head: {e}"), false)),
        };
        let mut head = parse_response_head(&raw, limits.max_fields)
            .map_err(|e| bad(format!("upstream sent a malformed response head: {e}"), false))?;
        scrub_head(&mut head, scrub, totals);
        if head.status == 101 {
            let websocket = head.has_token("upgrade", "websocket");
            write_head(client, &head, totals).await?;
            if websocket {
                crate::websocket::relay_frames(up, client, scrub, totals).await?;
            } else {
                relay_upgraded(up, client, scrub, totals).await?;
            }
            return Ok(Next::Close);
        }
        if head.status < 200 {
            write_head(client, &head, totals).await?;
            continue;
        }
        let body = head.body(expect.head_request).map_err(|e| bad(format!("upstream response: {e}"), false))?;
        if body == ResponseBody::None {
            write_head(client, &head, totals).await?;
            return Ok(if head.has_token("connection", "close") { Next::Close } else { Next::Continue });
        }
        let codings = head.content_codings();
        let decoder = match codings.as_slice() {
            [] => Inflater::Identity,
            [c] if c == b"gzip" || c == b"x-gzip" => Inflater::Gzip(Box::new(MultiGzDecoder::new(Vec::new()))),
            [c] if c == b"deflate" => Inflater::SniffDeflate(Vec::with_capacity(2)),
            _ => {
                let named = String::from_utf8_lossy(&codings.join(&b", "[..])).into_owned();
                return Err(bad(
                    format!(
                        "the upstream response is encoded with {named:?}, which the proxy cannot decode to remove secret values from it; ask for gzip, deflate or identity (Accept-Encoding)"
                    ),
                    false,
                ));
            }
        };
        head.remove_header("content-length");
        head.remove_header("transfer-encoding");
        head.remove_header("content-encoding");
        let framing = if expect.client_version == Version::Http11 && head.version == Version::Http11 {
            head.set_header("Transfer-Encoding", b"chunked");
            OutFraming::Chunked
        } else {
            head.set_header("Connection", b"close");
            OutFraming::UntilClose
        };
        // The head goes out with the first piece of the body: one write for small responses.
        let mut head_bytes = Vec::with_capacity(512);
        head.write_to(&mut head_bytes);
        relay_body(up, client, head_bytes, body, decoder, framing, scrub, totals).await?;
        let closes = framing == OutFraming::UntilClose
            || body == ResponseBody::UntilClose
            || head.has_token("connection", "close");
        return Ok(if closes { Next::Close } else { Next::Continue });
    }
}

fn scrub_head(head: &mut ResponseHead, scrub: &ScrubSet, totals: &mut Relayed) {
    let mut out = Vec::new();
    totals.scrubbed += scrub.scrub_all(&head.reason, &mut out);
    head.reason = out;
    for h in &mut head.headers {
        let mut out = Vec::with_capacity(h.value.len());
        totals.scrubbed += scrub.scrub_all(&h.value, &mut out);
        h.value = out;
    }
}

async fn write_head<W: AsyncWrite + Unpin>(
    client: &mut W,
    head: &ResponseHead,
    totals: &mut Relayed,
) -> Result<(), RelayError> {
    let mut wire = Vec::with_capacity(512);
    head.write_to(&mut wire);
    client.write_all(&wire).await?;
    client.flush().await?;
    totals.bytes += wire.len() as u64;
    Ok(())
}

/// A response body's content decoder; output accumulates in the decoder's Vec and is
/// drained after every step.
enum Inflater {
    Identity,
    Gzip(Box<MultiGzDecoder<Vec<u8>>>),
    /// `deflate` is zlib-wrapped per the RFC but raw deflate is common: the first two
    /// bytes decide.
    SniffDeflate(Vec<u8>),
    Zlib(Box<ZlibDecoder<Vec<u8>>>),
    Raw(Box<DeflateDecoder<Vec<u8>>>),
}

impl Inflater {
    /// Decodes one step of input (at most [`INFLATE_STEP`] bytes) into `out`.
    fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        if let Self::SniffDeflate(head) = self {
            head.extend_from_slice(input);
            if head.len() < 2 {
                return Ok(());
            }
            let head = std::mem::take(head);
            *self = if is_zlib_header(&head) {
                Self::Zlib(Box::new(ZlibDecoder::new(Vec::new())))
            } else {
                Self::Raw(Box::new(DeflateDecoder::new(Vec::new())))
            };
            return self.step(&head, out);
        }
        match self {
            Self::Identity => out.extend_from_slice(input),
            Self::Gzip(d) => {
                d.write_all(input)?;
                out.append(d.get_mut());
            }
            Self::Zlib(d) => {
                d.write_all(input)?;
                out.append(d.get_mut());
            }
            Self::Raw(d) => {
                d.write_all(input)?;
                out.append(d.get_mut());
            }
            Self::SniffDeflate(_) => {}
        }
        Ok(())
    }

    fn finish(self, out: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Self::Identity => {}
            Self::Gzip(d) => out.append(&mut d.finish()?),
            Self::Zlib(d) => out.append(&mut d.finish()?),
            Self::Raw(d) => out.append(&mut d.finish()?),
            Self::SniffDeflate(head) if head.is_empty() => {}
            Self::SniffDeflate(_) => return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated deflate body")),
        }
        Ok(())
    }

    fn is_identity(&self) -> bool {
        matches!(self, Self::Identity)
    }
}

/// Decoded body bytes -> scrubber -> framing -> sandbox.
struct BodyOut<'a, W> {
    client: &'a mut W,
    /// Bytes to send before the next piece (the response head).
    pending: Vec<u8>,
    scrubber: Scrubber,
    framing: OutFraming,
    wire: Zeroizing<Vec<u8>>,
    decoded: Zeroizing<Vec<u8>>,
}

impl<W: AsyncWrite + Unpin> BodyOut<'_, W> {
    /// Scrubs and sends `data`.
    async fn send(&mut self, data: &[u8], totals: &mut Relayed) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.wire.clear();
        let at = (self.framing == OutFraming::Chunked).then(|| begin_chunk(&mut self.wire));
        self.scrubber.push(data, &mut self.wire);
        if let Some(at) = at {
            end_chunk(&mut self.wire, at);
        }
        self.write_wire(totals).await
    }

    /// Scrubs and sends `self.decoded` (then empties it).
    async fn send_decoded(&mut self, totals: &mut Relayed) -> io::Result<()> {
        let decoded = std::mem::take(&mut *self.decoded);
        let sent = self.send(&decoded, totals).await;
        *self.decoded = decoded;
        self.decoded.clear();
        sent
    }

    async fn write_wire(&mut self, totals: &mut Relayed) -> io::Result<()> {
        if !self.pending.is_empty() {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(&self.wire);
            std::mem::swap(&mut pending, &mut *self.wire);
        }
        if !self.wire.is_empty() {
            self.client.write_all(&self.wire).await?;
            self.client.flush().await?;
            totals.bytes += self.wire.len() as u64;
            self.wire.clear();
        }
        Ok(())
    }

    /// Feeds framed-off body bytes through the inflater in bounded steps.
    async fn feed(&mut self, inflater: &mut Inflater, data: &[u8], totals: &mut Relayed) -> Result<(), RelayError> {
        if inflater.is_identity() {
            return Ok(self.send(data, totals).await?);
        }
        for step in data.chunks(INFLATE_STEP) {
            inflater
                .step(step, &mut self.decoded)
                .map_err(|e| bad(format!("cannot decode the upstream's compressed response: {e}"), true))?;
            if self.decoded.len() >= GATHER {
                self.send_decoded(totals).await?;
            }
        }
        Ok(self.send_decoded(totals).await?)
    }

    /// Ends the body: the held-back tail, then (chunked) the last chunk with `trailers`.
    async fn finish(mut self, inflater: Inflater, trailers: &[u8], totals: &mut Relayed) -> Result<(), RelayError> {
        inflater
            .finish(&mut self.decoded)
            .map_err(|e| bad(format!("cannot decode the upstream's compressed response: {e}"), true))?;
        self.send_decoded(totals).await?;
        self.wire.clear();
        let at = (self.framing == OutFraming::Chunked).then(|| begin_chunk(&mut self.wire));
        self.scrubber.finish(&mut self.wire);
        if let Some(at) = at {
            end_chunk(&mut self.wire, at);
            encode_last(trailers, &mut self.wire);
        }
        self.write_wire(totals).await?;
        totals.scrubbed += self.scrubber.replaced();
        Ok(())
    }
}

/// Streams one body after `head_bytes`; a chunked body's trailers are passed on scrubbed.
#[allow(clippy::too_many_arguments)] // one response's parts, each used once
async fn relay_body<R, W>(
    up: &mut Inbound<R>,
    client: &mut W,
    head_bytes: Vec<u8>,
    body: ResponseBody,
    mut inflater: Inflater,
    framing: OutFraming,
    scrub: &Arc<ScrubSet>,
    totals: &mut Relayed,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = BodyOut {
        client,
        pending: head_bytes,
        scrubber: Scrubber::new(scrub.clone()),
        framing,
        wire: Zeroizing::new(Vec::with_capacity(GATHER + 1024)),
        decoded: Zeroizing::new(Vec::with_capacity(GATHER)),
    };
    let truncated = || bad("the upstream closed the connection in the middle of a response body", true);
    let mut trailers = Vec::new();
    match body {
        ResponseBody::None => {}
        ResponseBody::Length(mut remaining) => {
            while remaining > 0 {
                if !gather(up).await? {
                    return Err(truncated());
                }
                let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(up.buffered().len());
                out.feed(&mut inflater, &up.buffered()[..take], totals).await?;
                up.consume(take);
                remaining -= take as u64;
            }
        }
        ResponseBody::Chunked => {
            let mut decoder = ChunkedDecoder::new(64 * 1024);
            let mut data = Zeroizing::new(Vec::with_capacity(GATHER));
            while !decoder.is_done() {
                if !gather(up).await? {
                    return Err(truncated());
                }
                let used = decoder
                    .decode(up.buffered(), &mut data)
                    .map_err(|e: ChunkError| bad(format!("upstream sent a bad chunked body: {e}"), true))?;
                up.consume(used);
                out.feed(&mut inflater, &data, totals).await?;
                data.clear();
            }
            scrub.scrub_all(decoder.trailers(), &mut trailers);
        }
        ResponseBody::UntilClose => loop {
            if !gather(up).await? {
                break;
            }
            let n = up.buffered().len();
            out.feed(&mut inflater, up.buffered(), totals).await?;
            up.consume(n);
        },
    }
    out.finish(inflater, &trailers, totals).await
}

/// After `101`: the raw stream, scrubbed, until the upstream closes.
async fn relay_upgraded<R, W>(
    up: &mut Inbound<R>,
    client: &mut W,
    scrub: &Arc<ScrubSet>,
    totals: &mut Relayed,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut scrubber = Scrubber::new(scrub.clone());
    let mut wire = Zeroizing::new(Vec::with_capacity(GATHER));
    loop {
        if up.buffered().is_empty() && fill(up).await? == 0 {
            break;
        }
        let n = up.buffered().len();
        scrubber.push(up.buffered(), &mut wire);
        up.consume(n);
        if !wire.is_empty() {
            client.write_all(&wire).await?;
            client.flush().await?;
            totals.bytes += wire.len() as u64;
            wire.clear();
        }
    }
    scrubber.finish(&mut wire);
    client.write_all(&wire).await?;
    client.flush().await?;
    totals.bytes += wire.len() as u64;
    totals.scrubbed += scrubber.replaced();
    Ok(())
}

/// Copies everything until the upstream closes (nothing to scrub).
async fn copy_unchanged<R, W>(up: &mut Inbound<R>, client: &mut W, totals: &mut Relayed) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if !gather(up).await? {
            return Ok(());
        }
        let n = up.buffered().len();
        client.write_all(up.buffered()).await?;
        client.flush().await?;
        up.consume(n);
        totals.bytes += n as u64;
    }
}

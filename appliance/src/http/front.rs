//! The API's public listener. tiny_http gives every connection a thread for as long as the
//! client keeps it open and has neither a connection cap nor read timeouts, so a client that
//! opens connections and sends nothing (or half a request head) would use up threads without
//! end. The front accepts instead, on a small tokio runtime: it caps open connections (`503`
//! beyond), closes a client that takes too long to send a request head (`408`) or sits idle
//! between requests, and relays everything else byte for byte to tiny_http, which listens on
//! loopback only.
//!
//! With TLS configured, the front also terminates it: the relay to tiny_http is plaintext on
//! loopback, so the request handlers (and the WebSocket takeover of tiny_http's socket) do not
//! change. A client that speaks plain HTTP to the TLS port is told so in a plain `400`.
//!
//! It does not parse HTTP beyond finding where a request head ends (the blank line), the
//! length a head announces for its body (see `MAX_REQUEST_BODY`), and whether
//! a response is informational (`1xx`) or switches protocols (`101`, after which the
//! connection is a WebSocket and is relayed untimed). A request whose head is complete is the
//! server's to answer, however long that takes (commands run for hours); its body and the
//! response are not timed, except that a client that stops reading a response is dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// How many clients may hold connections, and how long they may hold one without using it.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open client connections; one more is answered `503` and closed.
    pub max_connections: usize,
    /// From a connection's start, or from the first byte of a later request, until its head
    /// is complete.
    pub header_timeout: Duration,
    /// Between requests on a kept-alive connection, and for a client that stops reading a
    /// response.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        // Idle: longer than clients keep pooled connections (httpx 5 s, Node 4 s), so they
        // close first and never send on a connection being closed.
        Self { max_connections: 1024, header_timeout: Duration::from_secs(20), idle_timeout: Duration::from_secs(75) }
    }
}

/// The running front: its runtime owns the accept loop and every relay.
pub struct Front {
    runtime: tokio::runtime::Runtime,
    accepting: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
}

impl Front {
    /// Listens on `listen` (with TLS when `tls` is given) and relays to `inner` (tiny_http's
    /// loopback address).
    pub fn start(
        listen: &str,
        inner: SocketAddr,
        limits: ConnectionLimits,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("api-front")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the API's listener runtime: {e}"))?;
        let std_listener =
            std::net::TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        super::server::raise_backlog(&std_listener).map_err(|e| format!("cannot configure {listen}: {e}"))?;
        std_listener.set_nonblocking(true).map_err(|e| format!("cannot configure {listen}: {e}"))?;
        let addr = std_listener.local_addr().map_err(|e| format!("cannot read the address of {listen}: {e}"))?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(std_listener).map_err(|e| format!("cannot listen on {listen}: {e}"))?
        };
        let accepting = runtime.spawn(accept_loop(listener, inner, limits, tls.map(TlsAcceptor::from)));
        Ok(Self { runtime, accepting, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the listening socket; open connections are still relayed.
    pub fn stop_accepting(&self) {
        self.accepting.abort();
    }

    /// Drops every relay still open.
    pub fn shutdown(self) {
        self.runtime.shutdown_timeout(Duration::from_millis(200));
    }
}

async fn accept_loop(listener: TcpListener, inner: SocketAddr, limits: ConnectionLimits, tls: Option<TlsAcceptor>) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of descriptors or memory: wait for connections to close rather than spin.
                eprintln!("appliance: cannot accept an API connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let permit = Arc::clone(&permits).try_acquire_owned().ok();
        tokio::spawn(serve_client(client, inner, limits, permit, tls.clone()));
    }
}

/// Relays one client (after its TLS handshake, if any), or refuses it when over the cap.
async fn serve_client(
    client: TcpStream,
    inner: SocketAddr,
    limits: ConnectionLimits,
    permit: Option<OwnedSemaphorePermit>,
    tls: Option<TlsAcceptor>,
) {
    let Some(acceptor) = tls else {
        match permit {
            Some(permit) => {
                let (read, write) = client.into_split();
                relay(read, write, inner, limits, permit).await;
            }
            None => refuse(client, limits.max_connections).await,
        }
        return;
    };
    match tokio::time::timeout(limits.header_timeout, first_byte(&client)).await {
        Ok(Some(TLS_HANDSHAKE_RECORD)) => {}
        Ok(Some(b'A'..=b'Z')) => return close_after(client, PLAIN_HTTP_TO_TLS_REPLY).await,
        // Not TLS, nothing sent in time, or already closed: nothing to answer.
        _ => return,
    }
    let Ok(Ok(stream)) = tokio::time::timeout(limits.header_timeout, acceptor.accept(client)).await else { return };
    match permit {
        Some(permit) => {
            let (read, write) = tokio::io::split(stream);
            relay(read, write, inner, limits, permit).await;
        }
        None => refuse(stream, limits.max_connections).await,
    }
}

/// The first byte of every TLS connection (a handshake record: the ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

const PLAIN_HTTP_TO_TLS_REPLY: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
Content-Length: 62\r\nConnection: close\r\n\r\n{\"error\":\"this API is served over HTTPS: use an https:// URL\"}";

/// The first byte the client sent, left in place for the TLS handshake.
async fn first_byte(client: &TcpStream) -> Option<u8> {
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(1) => Some(byte[0]),
        _ => None,
    }
}

/// Answers a connection over the cap with `503` and closes it.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(client: S, max: usize) {
    let body = format!("{{\"error\":\"the API has {max} open connections, its limit; retry shortly\"}}");
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Retry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    close_after(client, reply.as_bytes()).await;
}

/// Writes `reply`, then reads what the client still sends until it closes (within a second):
/// closing with unread bytes would reset the connection and could discard the reply before it
/// is read.
async fn close_after<S: AsyncRead + AsyncWrite + Unpin>(mut client: S, reply: &[u8]) {
    let answer = async {
        if client.write_all(reply).await.is_err() || client.shutdown().await.is_err() {
            return;
        }
        let mut sink = [0u8; 4096];
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// Where a connection is in its request/response cycle, as far as timeouts care.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// The client owes a request head: since `since` (the connection's start, the last
    /// response bytes, or the head's first byte once `started`); `first` on a new connection.
    AwaitingHead { since: Instant, started: bool, first: bool },
    /// The head is complete: the server answers in its own time.
    Answering,
    /// After `101 Switching Protocols`: relayed untimed until either side closes.
    Tunnel,
}

struct Connection {
    phase: Mutex<Phase>,
    /// Wakes the client-side reader when the phase changes under it.
    changed: Notify,
    limits: ConnectionLimits,
}

impl Connection {
    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase;
        self.changed.notify_one();
    }

    /// When the client must have sent more, or None when it owes nothing.
    fn deadline(&self) -> Option<Instant> {
        match self.phase() {
            Phase::AwaitingHead { since, started, first } => {
                let wait = if started || first { self.limits.header_timeout } else { self.limits.idle_timeout };
                Some(since + wait)
            }
            Phase::Answering | Phase::Tunnel => None,
        }
    }
}

async fn relay<R, W>(
    client_read: R,
    mut client_write: W,
    inner: SocketAddr,
    limits: ConnectionLimits,
    _permit: OwnedSemaphorePermit,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let server = match TcpStream::connect(inner).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("appliance: cannot reach the API server at {inner}: {e}");
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let conn = Arc::new(Connection {
        phase: Mutex::new(Phase::AwaitingHead { since: Instant::now(), started: false, first: true }),
        changed: Notify::new(),
        limits,
    });
    let (server_read, server_write) = server.into_split();
    let mut downstream = Box::pin(responses(server_read, &mut client_write, &conn));
    let ended = tokio::select! {
        ended = requests(client_read, server_write, &conn) => ended,
        () = &mut downstream => RequestsEnded::Closed,
    };
    let farewell: &[u8] = match ended {
        // The client sent all it will (the server was told): its answers still go back.
        RequestsEnded::ClientDone => {
            downstream.await;
            b""
        }
        RequestsEnded::HeadTooSlow => {
            drop(downstream);
            REQUEST_TIMEOUT_REPLY
        }
        RequestsEnded::BodyTooLarge => {
            drop(downstream);
            BODY_TOO_LARGE_REPLY
        }
        RequestsEnded::HeadTooLarge => {
            drop(downstream);
            HEAD_TOO_LARGE_REPLY
        }
        RequestsEnded::Closed | RequestsEnded::Idle => {
            drop(downstream);
            b""
        }
    };
    // Ends the client's side cleanly (over TLS, with close_notify); the server's is dropped.
    let close = async {
        if client_write.write_all(farewell).await.is_ok() {
            let _ = client_write.shutdown().await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
}

/// The longest body any route takes (an upgrade image). A longer `Content-Length` is refused
/// (`413`, connection closed) before tiny_http sees the head: when a request is dropped with
/// its body unread, tiny_http drains the rest into one buffer of the remaining length,
/// allocated at once, and an allocation that fails aborts the whole appliance.
pub const MAX_REQUEST_BODY: u64 = if crate::api::system::MAX_IMAGE_BYTES > crate::runtime::MAX_FILE_SIZE {
    crate::api::system::MAX_IMAGE_BYTES
} else {
    crate::runtime::MAX_FILE_SIZE
};
/// The longest request head kept to read its `Content-Length`; a longer head is refused (`431`).
const MAX_HEAD: usize = 64 << 10;

const BODY_TOO_LARGE_REPLY: &[u8] = b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n\
Content-Length: 71\r\nConnection: close\r\n\r\n{\"error\":\"the request body is longer than any route of this API takes\"}";
const HEAD_TOO_LARGE_REPLY: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n\
Content-Length: 50\r\nConnection: close\r\n\r\n{\"error\":\"the request head is longer than 64 KiB\"}";

const REQUEST_TIMEOUT_REPLY: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n\
Content-Length: 49\r\nConnection: close\r\n\r\n{\"error\":\"the request head was not sent in time\"}";

#[derive(Debug, PartialEq, Eq)]
enum RequestsEnded {
    /// An error on either side, or the server closed.
    Closed,
    /// The client closed its sending side (after its last request); the server has been told.
    ClientDone,
    /// Idle between requests for the idle timeout.
    Idle,
    /// A request head was begun (or the connection opened) and not finished in time.
    HeadTooSlow,
    /// A head announced a body longer than `MAX_REQUEST_BODY`; it was not passed on.
    BodyTooLarge,
    /// A head longer than `MAX_HEAD`; it was not passed on whole.
    HeadTooLarge,
}

/// Client to server, until either side closes or the client is late with a request head.
async fn requests<R: AsyncRead + Unpin>(mut from: R, mut to: OwnedWriteHalf, conn: &Connection) -> RequestsEnded {
    let mut buf = vec![0u8; 16 * 1024];
    // The last three bytes of a head seen so far, so a blank line split across reads is found.
    let mut tail = [0u8; 3];
    // The head so far (and what follows it in the same read), for its Content-Length.
    let mut head = Vec::new();
    // Bytes of the current request's body still to pass before the next head can begin: a
    // client may still be sending a body the server answered early (413, 401), and those bytes
    // are not a head.
    let mut body_left: u64 = 0;
    // The current body is chunked, its end unknown here: what follows is scanned for a blank
    // line as before, keeping only the last `MAX_HEAD` bytes.
    let mut body_unknown = false;
    loop {
        let deadline = conn.deadline();
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            () = sleep_until(deadline) => {
                return match conn.phase() {
                    Phase::AwaitingHead { started: false, first: false, .. } => RequestsEnded::Idle,
                    _ => RequestsEnded::HeadTooSlow,
                };
            }
            () = conn.changed.notified() => continue,
        };
        let n = match read {
            Ok(0) => {
                return match to.shutdown().await {
                    Ok(()) => RequestsEnded::ClientDone,
                    Err(_) => RequestsEnded::Closed,
                };
            }
            Err(_) => return RequestsEnded::Closed,
            Ok(n) => n,
        };
        let body = usize::try_from(body_left).unwrap_or(usize::MAX).min(n);
        body_left -= body as u64;
        let fresh = &buf[body..n];
        if let (false, Phase::AwaitingHead { started, .. }) = (fresh.is_empty(), conn.phase()) {
            // Kept until the head is complete, and passed on only if its body is not too long.
            if head.len() > MAX_HEAD {
                if !body_unknown {
                    return RequestsEnded::HeadTooLarge;
                }
                head.drain(..head.len() - MAX_HEAD);
            }
            head.extend_from_slice(fresh);
            if head_ends_in(&mut tail, fresh) {
                let framing = body_framing(&head);
                if framing.length.is_some_and(|len| len > MAX_REQUEST_BODY) {
                    return RequestsEnded::BodyTooLarge;
                }
                let after_head = framing.head_len.map_or(0, |h| head.len().saturating_sub(h));
                body_left = framing.length.unwrap_or(0).saturating_sub(after_head as u64);
                body_unknown = framing.chunked;
                head.clear();
                conn.set(Phase::Answering);
            } else if !started {
                conn.set(Phase::AwaitingHead { since: Instant::now(), started: true, first: false });
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return RequestsEnded::Closed;
        }
    }
}

/// How the head at the start of `bytes` frames its body.
struct BodyFraming {
    /// Where the head ends in `bytes` (after its blank line), if the blank line is there.
    head_len: Option<usize>,
    /// The largest `Content-Length` (several headers may disagree; the largest is what tiny_http
    /// might drain); unparsable values count as huge: tiny_http's own parse is not ours to predict.
    length: Option<u64>,
    /// `Transfer-Encoding` is present: the body's end is not known from the head.
    chunked: bool,
}

fn body_framing(bytes: &[u8]) -> BodyFraming {
    let head_len = bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let head_end = head_len.map_or(bytes.len(), |h| h - 4);
    let mut framing = BodyFraming { head_len, length: None, chunked: false };
    for line in bytes[..head_end].split(|b| *b == b'\n') {
        let Some((name, value)) = std::str::from_utf8(line).ok().and_then(|l| l.split_once(':')) else { continue };
        if name.trim().eq_ignore_ascii_case("content-length") {
            framing.length = framing.length.max(Some(value.trim().parse().unwrap_or(u64::MAX)));
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
            framing.chunked = true;
        }
    }
    framing
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Server to client, until either side closes or the client has not taken a response chunk
/// within the idle timeout.
async fn responses<W: AsyncWrite + Unpin>(mut from: OwnedReadHalf, to: &mut W, conn: &Connection) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match conn.phase() {
            Phase::Answering if buf[..n].starts_with(b"HTTP/1.1 101") => conn.set(Phase::Tunnel),
            // 100 Continue and other informational answers: the real response is still to come.
            Phase::Answering if buf[..n].starts_with(b"HTTP/1.1 1") => {}
            Phase::Answering => conn.set(Phase::AwaitingHead { since: Instant::now(), started: false, first: false }),
            // More of a long response: the next request is not due before it has arrived.
            Phase::AwaitingHead { started: false, first, .. } => {
                conn.set(Phase::AwaitingHead { since: Instant::now(), started: false, first });
            }
            Phase::AwaitingHead { .. } | Phase::Tunnel => {}
        }
        match tokio::time::timeout(conn.limits.idle_timeout, to.write_all(&buf[..n])).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// Whether `chunk`, following the head bytes summarised by `tail`, completes a request head
/// (contains the blank line `\r\n\r\n`). Updates `tail`.
fn head_ends_in(tail: &mut [u8; 3], chunk: &[u8]) -> bool {
    const BLANK_LINE: &[u8; 4] = b"\r\n\r\n";
    // A blank line that starts in `tail` ends within the chunk's first three bytes.
    let mut seam = [0u8; 6];
    seam[..3].copy_from_slice(tail);
    let head_of_chunk = chunk.len().min(3);
    seam[3..3 + head_of_chunk].copy_from_slice(&chunk[..head_of_chunk]);
    let found =
        seam[..3 + head_of_chunk].windows(4).any(|w| w == BLANK_LINE) || chunk.windows(4).any(|w| w == BLANK_LINE);
    let joined = &seam[..3 + head_of_chunk];
    *tail = if found {
        [0; 3]
    } else if chunk.len() >= 3 {
        [chunk[chunk.len() - 3], chunk[chunk.len() - 2], chunk[chunk.len() - 1]]
    } else {
        [joined[joined.len() - 3], joined[joined.len() - 2], joined[joined.len() - 1]]
    };
    found
}

#[cfg(test)]
mod tests {
    use super::{
        body_framing, head_ends_in, BODY_TOO_LARGE_REPLY, HEAD_TOO_LARGE_REPLY, PLAIN_HTTP_TO_TLS_REPLY,
        REQUEST_TIMEOUT_REPLY,
    };

    #[test]
    fn the_announced_body_length_is_read_from_the_head_only() {
        let length = |bytes: &[u8]| body_framing(bytes).length;
        assert_eq!(length(b"PUT / HTTP/1.1\r\ncontent-LENGTH: 12\r\n\r\n"), Some(12));
        assert_eq!(length(b"PUT / HTTP/1.1\r\nHost: x\r\n\r\nContent-Length: 99\r\n"), None);
        let twice = b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length:  7000\r\n\r\n";
        assert_eq!(length(twice), Some(7000));
        assert_eq!(length(b"PUT / HTTP/1.1\r\nContent-Length: 1e9\r\n\r\n"), Some(u64::MAX));
        // What follows the head in the same read is body: its length is known from the head.
        let framing = body_framing(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");
        assert_eq!((framing.head_len, framing.chunked), (Some(38), false));
        assert!(body_framing(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").chunked);
    }

    #[test]
    fn canned_replies_declare_their_body_length() {
        for reply in [PLAIN_HTTP_TO_TLS_REPLY, REQUEST_TIMEOUT_REPLY, BODY_TOO_LARGE_REPLY, HEAD_TOO_LARGE_REPLY] {
            let text = std::str::from_utf8(reply).expect("ASCII");
            let (head, body) = text.split_once("\r\n\r\n").expect("a head");
            let declared = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).expect("a length");
            assert_eq!(declared.parse::<usize>().ok(), Some(body.len()), "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(body).is_ok(), "{body}");
        }
    }

    #[test]
    fn a_blank_line_is_found_whole_or_split_across_reads() {
        let mut tail = [0; 3];
        assert!(head_ends_in(&mut tail, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        for split in 1..4 {
            let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
            let (a, b) = head.split_at(head.len() - split);
            let mut tail = [0; 3];
            assert!(!head_ends_in(&mut tail, a), "split {split}");
            assert!(head_ends_in(&mut tail, b), "split {split}");
        }
        // One byte at a time.
        let mut tail = [0; 3];
        let bytes = b"GET / HTTP/1.1\r\n\r\n";
        let found: Vec<bool> = bytes.iter().map(|b| head_ends_in(&mut tail, &[*b])).collect();
        assert_eq!(found.iter().filter(|f| **f).count(), 1);
        assert!(found[bytes.len() - 1]);
        let mut tail = [0; 3];
        assert!(!head_ends_in(&mut tail, b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(!head_ends_in(&mut tail, b"X: y\r\n"));
    }
}

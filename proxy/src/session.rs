//! One sandbox connection from first byte to close: the proxy request (CONNECT or
//! absolute `http://`), policy checks, TLS interception, the upstream dial, then
//! requests forwarded one after another while responses stream back unchanged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::{debug, info, warn};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

use crate::destination::{check_request, check_sni, Mismatch, Shown};
use crate::egress::EgressError;
use crate::egress_log::Decision;
use crate::forward::{copy_raw, forward_request, is_upgrade, precheck, ForwardError};
use crate::hostmatch::Traffic;
use crate::http::head::{parse_request_head, RequestHead};
use crate::http::simple_response;
use crate::http::target::{parse_absolute_http, parse_authority, Authority};
use crate::io::{Activity, HeadReadError, Inbound, Prefixed};
use crate::registry::{SandboxId, SandboxPolicy};
use crate::relay::{relay, Expect, HeadLimits, RelayError, Relayed};
use crate::shared::Shared;
use crate::subst::Replacements;

const SOCKET_BUFFER: usize = 64 * 1024;

/// An error answered to the sandbox before any upstream traffic.
struct Reject {
    status: u16,
    reason: &'static str,
    message: String,
}

impl Reject {
    fn new(status: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { status, reason, message: message.into() }
    }
}

/// Sends the proxy's own answer. Its message is scrubbed of the sandbox's secret
/// values like any response (an upstream's error text may quote one).
async fn send_reject<W: AsyncWrite + Unpin>(shared: &Shared, w: &mut W, sandbox: SandboxId, r: &Reject) {
    let message = match shared.registry.policy(sandbox) {
        Some(policy) => policy.scrub_set().scrub_text(&r.message),
        None => r.message.clone(),
    };
    let decision = Decision::of_status(r.status);
    shared.counters.record(decision);
    info!("egress: sandbox {sandbox}: {} ({} {}): {message}", decision.name(), r.status, r.reason);
    let _ = w.write_all(&simple_response(r.status, r.reason, &message, true)).await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

fn head_read_reject(e: &HeadReadError) -> Option<Reject> {
    match e {
        HeadReadError::TooLarge => Some(Reject::new(431, "Request Header Fields Too Large", e.to_string())),
        HeadReadError::Timeout => Some(Reject::new(408, "Request Timeout", e.to_string())),
        HeadReadError::Truncated | HeadReadError::Io(_) => None,
    }
}

fn forward_reject(e: &ForwardError) -> Reject {
    match e {
        ForwardError::Http10BodyTooLarge | ForwardError::InflateLimit(_) => {
            Reject::new(413, "Content Too Large", e.to_string())
        }
        _ => Reject::new(400, "Bad Request", e.to_string()),
    }
}

fn egress_reject(host: &str, e: &EgressError) -> Reject {
    match e {
        EgressError::Refused { .. } => Reject::new(403, "Forbidden", format!("destination {host} refused: {e}")),
        EgressError::Timeout => Reject::new(504, "Gateway Timeout", format!("upstream {host}: {e}")),
        _ => Reject::new(502, "Bad Gateway", format!("upstream {host}: {e}")),
    }
}

/// A fatal TLS alert record `unrecognized_name` (RFC 6066 section 3), sent in
/// place of a ServerHello: content type 21 (alert), record version TLS 1.2,
/// length 2, level fatal (2), description 112.
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// The answer to a request whose Host header or target does not name the
/// connection's destination: 421 for another host, 400 for an unreadable one.
/// `dest_is` says what fixed the destination ("this tunnel is to", ...).
fn mismatch_reject(m: &Mismatch, dest_is: &str, dest: &Authority) -> Reject {
    match m {
        Mismatch::Elsewhere(named) => {
            Reject::new(421, "Misdirected Request", format!("{dest_is} {}; the request names {named}", Shown(dest)))
        }
        Mismatch::Malformed(why) => Reject::new(400, "Bad Request", format!("{why} ({dest_is} {})", Shown(dest))),
    }
}

fn current_policy(
    shared: &Shared,
    sandbox: SandboxId,
    dest: &Authority,
    traffic: Traffic,
) -> Result<Arc<SandboxPolicy>, Reject> {
    let policy = shared
        .registry
        .policy(sandbox)
        .ok_or_else(|| Reject::new(403, "Forbidden", format!("sandbox {sandbox} is not registered with the proxy")))?;
    if !policy.allows(&dest.host, dest.port, traffic) {
        let default = traffic.default_port();
        let why = if dest.port == default {
            "is not in this sandbox's egress allowlist".to_string()
        } else {
            format!("is not in this sandbox's egress allowlist (an entry without a port admits only port {default})")
        };
        return Err(Reject::new(403, "Forbidden", format!("destination {} {why}", Shown(dest))));
    }
    Ok(policy)
}

/// Entry point for one accepted connection.
pub async fn handle<S>(shared: Arc<Shared>, stream: S, sandbox: SandboxId)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &shared.config.limits;
    let timeouts = &shared.config.timeouts;
    let activity = Activity::new();
    let mut inbound = Inbound::new(stream, activity.clone());
    let raw = match tokio::time::timeout(timeouts.header, inbound.read_head(limits.max_header_bytes, timeouts.header))
        .await
    {
        Ok(Ok(Some(raw))) => raw,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            debug!("sandbox {sandbox}: {e}");
            if let Some(r) = head_read_reject(&e) {
                let (mut s, _) = inbound.into_parts();
                send_reject(&shared, &mut s, sandbox, &r).await;
            }
            return;
        }
        Err(_) => {
            let (mut s, _) = inbound.into_parts();
            send_reject(
                &shared,
                &mut s,
                sandbox,
                &Reject::new(408, "Request Timeout", "timed out waiting for the request head"),
            )
            .await;
            return;
        }
    };
    let head = parse_request_head(&raw, limits.max_headers);
    let (mut stream, leftover) = inbound.into_parts();
    let head = match head {
        Ok(h) => h,
        Err(e) => {
            return send_reject(&shared, &mut stream, sandbox, &Reject::new(400, "Bad Request", e.to_string())).await
        }
    };
    if head.method.eq_ignore_ascii_case("CONNECT") {
        let Some(authority) = parse_authority(&head.target, None) else {
            let r = Reject::new(400, "Bad Request", "CONNECT target must be host:port");
            return send_reject(&shared, &mut stream, sandbox, &r).await;
        };
        if let Err(r) = current_policy(&shared, sandbox, &authority, Traffic::Tunnel) {
            return send_reject(&shared, &mut stream, sandbox, &r).await;
        }
        if stream.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_err() {
            return;
        }
        debug!("sandbox {sandbox}: CONNECT {}", Shown(&authority));
        intercept(shared, Prefixed::new(leftover, stream), sandbox, authority, activity).await;
    } else if let Some((authority, origin_target)) = parse_absolute_http(&head.target) {
        if let Err(r) = current_policy(&shared, sandbox, &authority, Traffic::PlainHttp) {
            return send_reject(&shared, &mut stream, sandbox, &r).await;
        }
        debug!("sandbox {sandbox}: plain HTTP to {}", Shown(&authority));
        plain_forward(shared, Prefixed::new(leftover, stream), sandbox, authority, head, origin_target, activity).await;
    } else {
        let r = Reject::new(400, "Bad Request", "expected CONNECT host:port or an absolute http:// URL");
        send_reject(&shared, &mut stream, sandbox, &r).await;
    }
}

/// TLS interception of a CONNECT tunnel.
async fn intercept<S>(shared: Arc<Shared>, stream: S, sandbox: SandboxId, authority: Authority, activity: Arc<Activity>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let host = authority.host.clone();
    // One budget for the whole handshake, ClientHello included.
    let deadline = tokio::time::Instant::now() + shared.config.timeouts.header;
    // rustls reads the socket 4 KiB at a time; a buffer below it saves most syscalls.
    let io = BufReader::with_capacity(SOCKET_BUFFER, stream);
    let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout_at(deadline, hello).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => return info!("sandbox {sandbox}: TLS handshake for {host} failed: {e}"),
        Err(_) => return info!("sandbox {sandbox}: TLS handshake for {host} timed out"),
    };
    // The SNI is checked before any certificate is issued or request read. A name
    // other than the tunnel's ends the handshake with a fatal unrecognized_name
    // alert: every TLS client reports that plainly, whereas completing the
    // handshake (with the only certificate this tunnel may get, the tunnel
    // host's) would show a verifying client a misleading certificate error.
    if let Err(named) = check_sni(start.client_hello().server_name(), &authority) {
        shared.counters.record(Decision::Misdirected);
        info!(
            "egress: sandbox {sandbox}: misdirected: TLS server name {named} does not match the tunnel to {}; handshake refused (unrecognized_name)",
            Shown(&authority)
        );
        let mut io = start.io;
        let _ = io.write_all(&UNRECOGNIZED_NAME_ALERT).await;
        let _ = io.flush().await;
        let _ = io.shutdown().await;
        return;
    }
    let server_config = match shared.leafs.server_config(&host) {
        Ok(c) => c,
        Err(e) => return warn!("sandbox {sandbox}: cannot issue a certificate for {host}: {e}"),
    };
    let tls = match tokio::time::timeout_at(deadline, start.into_stream(server_config)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return info!("sandbox {sandbox}: TLS handshake for {host} failed: {e}"),
        Err(_) => return info!("sandbox {sandbox}: TLS handshake for {host} timed out"),
    };
    let (client_r, mut client_w) = tokio::io::split(tls);
    let mut inbound = Inbound::new(client_r, activity.clone());
    let limits = &shared.config.limits;
    let timeouts = &shared.config.timeouts;
    let first = tokio::time::timeout(timeouts.idle, inbound.read_head(limits.max_header_bytes, timeouts.header)).await;
    let raw = match first {
        Ok(Ok(Some(raw))) => raw,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            if let Some(r) = head_read_reject(&e) {
                send_reject(&shared, &mut client_w, sandbox, &r).await;
            }
            return;
        }
        Err(_) => return debug!("sandbox {sandbox}: no request inside the tunnel to {host}"),
    };
    let prepared = parse_request_head(&raw, limits.max_headers)
        .map_err(|e| Reject::new(400, "Bad Request", e.to_string()))
        .and_then(|head| {
            // Before the upstream is dialled: a misdirected request opens nothing.
            check_request(&head, &authority).map_err(|m| mismatch_reject(&m, TUNNEL_IS_TO, &authority))?;
            let policy = current_policy(&shared, sandbox, &authority, Traffic::Tunnel)?;
            let repl = Arc::new(policy.replacements_for(&host, authority.port));
            let framing = precheck(&head, limits, !repl.is_empty()).map_err(|e| forward_reject(&e))?;
            Ok((head, framing, policy, repl))
        });
    let (head, framing, policy, repl) = match prepared {
        Ok(p) => p,
        Err(r) => return send_reject(&shared, &mut client_w, sandbox, &r).await,
    };
    let upstream = match dial_tls(&shared, &authority).await {
        Ok(u) => u,
        Err(r) => return send_reject(&shared, &mut client_w, sandbox, &r).await,
    };
    let (upstream_r, upstream_w) = tokio::io::split(upstream);
    let first = FirstRequest { head, framing, policy, repl };
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = Conn::new(&shared, sandbox, &authority, Traffic::Tunnel);
    let requests = request_loop(&conn, first, inbound, upstream_w, tx);
    run_pipeline(&conn, requests, rx, upstream_r, client_w, activity).await;
}

const TUNNEL_IS_TO: &str = "this tunnel is to";

/// Plain-HTTP proxying: one request per connection, never any substitution
/// (secrets only leave over verified TLS).
async fn plain_forward<S>(
    shared: Arc<Shared>,
    stream: S,
    sandbox: SandboxId,
    authority: Authority,
    mut head: RequestHead,
    origin_target: Vec<u8>,
    activity: Arc<Activity>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (client_r, mut client_w) = tokio::io::split(stream);
    let inbound = Inbound::new(client_r, activity.clone());
    let host = authority.host.clone();
    // Each plain request stands alone (one per connection): its Host header must
    // name the host its target names, which is the one checked and dialled.
    if let Err(m) = check_request(&head, &authority) {
        return send_reject(
            &shared,
            &mut client_w,
            sandbox,
            &mismatch_reject(&m, "the request target names", &authority),
        )
        .await;
    }
    let framing = match precheck(&head, &shared.config.limits, false) {
        Ok(f) => f,
        Err(e) => return send_reject(&shared, &mut client_w, sandbox, &forward_reject(&e)).await,
    };
    let policy = match current_policy(&shared, sandbox, &authority, Traffic::PlainHttp) {
        Ok(p) => p,
        Err(r) => return send_reject(&shared, &mut client_w, sandbox, &r).await,
    };
    let upstream = match shared.egress.dial(&host, authority.port).await {
        Ok((s, _)) => s,
        Err(e) => return send_reject(&shared, &mut client_w, sandbox, &egress_reject(&host, &e)).await,
    };
    head.target = origin_target;
    head.set_header("Connection", b"close");
    let (upstream_r, upstream_w) = upstream.into_split();
    let first = FirstRequest { head, framing, policy, repl: Arc::new(Replacements::new()) };
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = Conn::new(&shared, sandbox, &authority, Traffic::PlainHttp);
    let requests = request_loop(&conn, first, inbound, upstream_w, tx);
    run_pipeline(&conn, requests, rx, upstream_r, client_w, activity).await;
}

type UpstreamTls = tokio_rustls::client::TlsStream<BufReader<TcpStream>>;

async fn dial_tls(shared: &Shared, authority: &Authority) -> Result<UpstreamTls, Reject> {
    let host = &authority.host;
    let (tcp, addr) = shared.egress.dial(host, authority.port).await.map_err(|e| egress_reject(host, &e))?;
    let name = ServerName::try_from(host.clone())
        .map_err(|_| Reject::new(400, "Bad Request", format!("{host} is not a valid TLS server name")))?;
    let connector = TlsConnector::from(shared.upstream_tls.clone());
    match tokio::time::timeout(
        shared.config.timeouts.connect,
        connector.connect(name, BufReader::with_capacity(SOCKET_BUFFER, tcp)),
    )
    .await
    {
        Ok(Ok(tls)) => {
            debug!("upstream {host} ({addr}) TLS established");
            Ok(tls)
        }
        Ok(Err(e)) => Err(Reject::new(502, "Bad Gateway", format!("upstream TLS with {host} failed: {e}"))),
        Err(_) => Err(Reject::new(504, "Gateway Timeout", format!("upstream TLS handshake with {host} timed out"))),
    }
}

struct FirstRequest {
    head: RequestHead,
    framing: crate::http::head::BodyFraming,
    policy: Arc<SandboxPolicy>,
    repl: Arc<Replacements>,
}

/// Why the request loop stopped before the sandbox closed its side.
enum Stop {
    /// Something is wrong with the stream: the connection is dropped.
    Drop(String),
    /// A request is refused with an answer; the requests before it are answered first.
    Refuse(Reject),
}

impl From<String> for Stop {
    fn from(e: String) -> Self {
        Self::Drop(e)
    }
}

/// Content codings the response scrubber can decode; requests may ask only for these.
const DECODABLE_CODINGS: [&[u8]; 4] = [b"gzip", b"x-gzip", b"deflate", b"identity"];

/// Keeps the responses this request may get scrubbable: Accept-Encoding is cut to the
/// codings the scrubber decodes, and WebSocket compression (which would hide values
/// inside compressed frames) is not offered.
fn keep_responses_scrubbable(head: &mut RequestHead) {
    if let Some(accept) = head.header("accept-encoding") {
        let kept: Vec<&[u8]> = accept
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .filter(|e| {
                let coding = e.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
                DECODABLE_CODINGS.iter().any(|c| coding.eq_ignore_ascii_case(c))
            })
            .collect();
        // An empty Accept-Encoding would mean "anything": say identity instead.
        let value = if kept.is_empty() { b"identity".to_vec() } else { kept.join(&b", "[..]) };
        head.set_header("Accept-Encoding", &value);
    }
    head.remove_header("sec-websocket-extensions");
}

/// One forwarding connection: where it goes and its running totals, shared by the
/// request and response directions (which run in one task).
struct Conn<'a> {
    shared: &'a Shared,
    sandbox: SandboxId,
    dest: &'a Authority,
    traffic: Traffic,
    requests: AtomicU64,
    from_sandbox: AtomicU64,
}

impl<'a> Conn<'a> {
    fn new(shared: &'a Shared, sandbox: SandboxId, dest: &'a Authority, traffic: Traffic) -> Self {
        Self { shared, sandbox, dest, traffic, requests: AtomicU64::new(0), from_sandbox: AtomicU64::new(0) }
    }

    /// The egress record of the connection, once it ends (see [`crate::egress_log`]).
    fn log_end(&self, to_sandbox: u64, scrubbed: u64, end: &str) {
        let requests = self.requests.load(Ordering::Relaxed);
        let from_sandbox = self.from_sandbox.load(Ordering::Relaxed);
        self.shared.counters.add_traffic(from_sandbox, to_sandbox, scrubbed);
        let kind = match self.traffic {
            Traffic::Tunnel => "tunnel",
            Traffic::PlainHttp => "plain HTTP",
        };
        info!(
            "egress: sandbox {}: {kind} to {}: {requests} request(s) forwarded, {from_sandbox} B from the sandbox, {to_sandbox} B to it, {scrubbed} secret value(s) scrubbed; {end}",
            self.sandbox,
            Shown(self.dest)
        );
    }
}

/// Forwards requests until the sandbox closes its side (Ok) or something is
/// wrong (Err). Policy is re-read, and the destination re-checked, for every request;
/// each request is announced to the response relay (`expects`) before it is sent.
async fn request_loop<R, W>(
    conn: &Conn<'_>,
    first: FirstRequest,
    mut inbound: Inbound<R>,
    mut upstream: W,
    expects: mpsc::UnboundedSender<Expect>,
) -> Result<(), Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Conn { shared, sandbox, dest, .. } = *conn;
    let keep_alive = conn.traffic == Traffic::Tunnel;
    let host = dest.host.as_str();
    let limits = &shared.config.limits;
    let FirstRequest { mut head, mut framing, policy, repl } = first;
    let mut cached = (policy, repl);
    loop {
        let upgrade = is_upgrade(&head);
        let method = head.method.clone();
        let repl = cached.1.clone();
        let scrub = cached.0.scrub_set().clone();
        if !scrub.is_empty() {
            keep_responses_scrubbable(&mut head);
        }
        let expect = Expect { head_request: method.eq_ignore_ascii_case("HEAD"), client_version: head.version, scrub };
        if expects.send(expect).is_err() {
            return Err(Stop::Drop("the response side ended".into()));
        }
        let replaced = match forward_request(head, framing, &mut inbound, &mut upstream, &repl, limits).await {
            Ok(n) => n,
            // Refused before any byte went upstream; the body may be partly unread,
            // so the connection closes after the answer.
            Err(e) if e.nothing_sent() => {
                let _ = upstream.shutdown().await;
                return Err(Stop::Refuse(forward_reject(&e)));
            }
            Err(e) => return Err(Stop::Drop(e.to_string())),
        };
        shared.counters.record(Decision::Forwarded);
        conn.requests.fetch_add(1, Ordering::Relaxed);
        conn.from_sandbox.store(inbound.bytes_read(), Ordering::Relaxed);
        debug!("sandbox {sandbox}: {method} {host}: {replaced} token(s) replaced");
        if upgrade {
            return copy_raw(&mut inbound, &mut upstream).await.map_err(|e| Stop::Drop(e.to_string()));
        }
        if !keep_alive {
            return Ok(());
        }
        let raw = match inbound.read_head(limits.max_header_bytes, shared.config.timeouts.header).await {
            Ok(Some(raw)) => raw,
            Ok(None) => {
                let _ = upstream.shutdown().await;
                return Ok(());
            }
            Err(e) => return Err(Stop::Drop(e.to_string())),
        };
        // Nothing of a refused request goes upstream. Closing our sending side lets
        // the upstream finish the responses it owes and then close, so the answer
        // can follow them in order.
        let policy = match current_policy(shared, sandbox, dest, Traffic::Tunnel) {
            Ok(p) => p,
            Err(r) => {
                let _ = upstream.shutdown().await;
                return Err(Stop::Refuse(r));
            }
        };
        if !Arc::ptr_eq(&policy, &cached.0) {
            let repl = Arc::new(policy.replacements_for(host, dest.port));
            cached = (policy, repl);
        }
        head = parse_request_head(&raw, limits.max_headers).map_err(|e| e.to_string())?;
        if let Err(m) = check_request(&head, dest) {
            let _ = upstream.shutdown().await;
            return Err(Stop::Refuse(mismatch_reject(&m, TUNNEL_IS_TO, dest)));
        }
        framing = match precheck(&head, limits, !cached.1.is_empty()) {
            Ok(f) => f,
            Err(e @ (ForwardError::InflateLimit(_) | ForwardError::Http10BodyTooLarge)) => {
                let _ = upstream.shutdown().await;
                return Err(Stop::Refuse(forward_reject(&e)));
            }
            Err(e) => return Err(Stop::Drop(e.to_string())),
        };
    }
}

/// How a connection ends once its requests and responses stop.
enum End {
    /// The upstream closed after its last response: close the sandbox's side cleanly.
    Close,
    /// Drop the connection as it is (errors, idle timeout).
    Drop,
    /// All earlier responses were relayed; answer the refused request, then close.
    Answer(Reject),
}

async fn run_pipeline<F, R, W>(
    conn: &Conn<'_>,
    requests: F,
    expects: mpsc::UnboundedReceiver<Expect>,
    upstream_r: R,
    mut client_w: W,
    activity: Arc<Activity>,
) where
    F: std::future::Future<Output = Result<(), Stop>>,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Conn { shared, sandbox, dest, .. } = *conn;
    let host = Shown(dest);
    let idle_limit = shared.config.timeouts.idle;
    // What the response side sent, for the egress record.
    let mut sent = Relayed::default();
    let relayed = |r: Result<(), RelayError>| match r {
        Ok(()) => End::Close,
        // A response that cannot be passed on safely, before any of it was sent.
        Err(RelayError::BadResponse { message, started: false }) => {
            End::Answer(Reject::new(502, "Bad Gateway", format!("upstream {host}: {message}")))
        }
        Err(e) => {
            info!("sandbox {sandbox}: {host}: response stream ended: {e}");
            End::Drop
        }
    };
    let limits = &shared.config.limits;
    let head_limits = HeadLimits {
        max_bytes: limits.max_header_bytes,
        max_fields: limits.max_headers,
        timeout: shared.config.timeouts.header,
    };
    let end = {
        let upstream = Inbound::new(upstream_r, activity.clone());
        let responses = relay(upstream, &mut client_w, expects, head_limits, &mut sent);
        let idle = activity.idle_timeout(idle_limit);
        tokio::pin!(requests, responses, idle);
        tokio::select! {
            r = &mut requests => match r {
                Ok(()) => tokio::select! {
                    r = &mut responses => relayed(r),
                    () = &mut idle => {
                        info!("sandbox {sandbox}: {host}: idle timeout");
                        End::Drop
                    }
                },
                Err(Stop::Drop(e)) => {
                    info!("sandbox {sandbox}: {host}: closing connection: {e}");
                    End::Drop
                }
                // Earlier responses first: the upstream closes after them (its side
                // was shut down). If it does not, or a response is cut off, an
                // answer could be read as part of a response, so the connection is
                // dropped instead.
                Err(Stop::Refuse(reject)) => tokio::select! {
                    r = &mut responses => match relayed(r) {
                        End::Close => End::Answer(reject),
                        other => other,
                    },
                    () = &mut idle => {
                        info!("sandbox {sandbox}: {host}: idle timeout; dropping refused request: {}", reject.message);
                        End::Drop
                    }
                },
            },
            r = &mut responses => relayed(r),
            () = &mut idle => {
                info!("sandbox {sandbox}: {host}: idle timeout");
                End::Drop
            }
        }
    };
    // Bounded: a sandbox that stops reading must not hold this task.
    match end {
        End::Close => {
            conn.log_end(sent.bytes, sent.scrubbed, "closed");
            let _ = tokio::time::timeout(idle_limit, client_w.shutdown()).await;
        }
        End::Drop => conn.log_end(sent.bytes, sent.scrubbed, "dropped"),
        End::Answer(r) => {
            conn.log_end(sent.bytes, sent.scrubbed, &format!("then answered {} {}", r.status, r.reason));
            let _ = tokio::time::timeout(idle_limit, send_reject(shared, &mut client_w, sandbox, &r)).await;
        }
    }
}

//! Test doubles for the proxy tests: a loopback echo upstream with its own test CA,
//! a client that talks through the proxy, and a logger that captures every line.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use proxy::{
    CaPem, Cidr, Proxy, ProxyConfig, SandboxBindings, SandboxId, SealRegistry, SealedSecret, SecretValue, TcpSource,
    UpstreamTrust,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

// ---------- log capture ----------

static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static LOGGER_INIT: Once = Once::new();

struct CaptureLogger;

impl log::Log for CaptureLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        LOGS.lock().unwrap().push(format!("{} {}: {}", record.level(), record.target(), record.args()));
    }
    fn flush(&self) {}
}

pub fn init_logs() {
    LOGGER_INIT.call_once(|| {
        log::set_logger(&CaptureLogger).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
}

pub fn logs() -> Vec<String> {
    LOGS.lock().unwrap().clone()
}

/// Fails if any captured log line contains any of `secrets`.
pub fn assert_not_logged(secrets: &[&str]) {
    let all = logs();
    assert!(!all.is_empty(), "the proxy logged nothing at all; capture is broken");
    for line in &all {
        for s in secrets {
            assert!(!line.contains(s), "secret found in log line: {line}");
        }
    }
}

// ---------- test PKI ----------

pub struct TestPki {
    pub ca_pem: String,
    pub server_chain: Vec<CertificateDer<'static>>,
    pub server_key_pem: String,
}

/// A CA unrelated to the proxy's, and a server certificate for `names`.
pub fn upstream_pki(names: &[&str]) -> TestPki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "upstream test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(std::string::ToString::to_string).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    TestPki { ca_pem: ca_cert.pem(), server_chain: vec![cert.der().clone()], server_key_pem: key.serialize_pem() }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---------- echo upstream ----------

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub conn: usize,
    pub head: String,
    pub body: Vec<u8>,
    pub chunked: bool,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }
}

pub struct Upstream {
    pub port: u16,
    pub pki: TestPki,
    pub received: mpsc::UnboundedReceiver<Received>,
    /// TCP connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
}

impl Upstream {
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(10), self.received.recv())
            .await
            .expect("upstream received nothing within 10 s")
            .expect("upstream channel closed")
    }

    pub fn try_next(&mut self) -> Option<Received> {
        self.received.try_recv().ok()
    }
}

/// Starts a TLS (or, with `tls == false`, plain) echo server on 127.0.0.1.
pub async fn start_upstream(tls: bool) -> Upstream {
    let pki = upstream_pki(&[
        "api.test",
        "other.test",
        "x.other.test",
        "blocked.test",
        "private.test",
        "127.0.0.1",
        "169.254.169.254",
    ]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    let acceptor = if tls {
        let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes()).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(pki.server_chain.clone(), key)
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
    } else {
        None
    };
    let conns = Arc::new(AtomicUsize::new(0));
    let accepted = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            let conn = conns.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    Some(a) => {
                        if let Ok(s) = a.accept(tcp).await {
                            echo_loop(s, conn, tx).await;
                        }
                    }
                    None => echo_loop(tcp, conn, tx).await,
                }
            });
        }
    });
    Upstream { port, pki, received: rx, accepted }
}

async fn echo_loop<S: AsyncRead + AsyncWrite + Unpin>(stream: S, conn: usize, tx: mpsc::UnboundedSender<Received>) {
    let mut r = BufReader::new(stream);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match r.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let rec = Received { conn, head: head.clone(), body: Vec::new(), chunked: false };
        let te = rec.header("transfer-encoding").unwrap_or_default().to_ascii_lowercase();
        let mut body = Vec::new();
        let chunked = te == "chunked";
        if chunked {
            loop {
                let mut size_line = String::new();
                if r.read_line(&mut size_line).await.unwrap_or(0) == 0 {
                    return;
                }
                let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16).unwrap();
                if size == 0 {
                    // trailers until empty line
                    loop {
                        let mut l = String::new();
                        if r.read_line(&mut l).await.unwrap_or(0) == 0 || l == "\r\n" {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                r.read_exact(&mut body[start..]).await.unwrap();
                let mut crlf = [0u8; 2];
                r.read_exact(&mut crlf).await.unwrap();
                assert_eq!(&crlf, b"\r\n");
            }
        } else if let Some(len) = rec.header("content-length") {
            body.resize(len.parse().unwrap(), 0);
            if r.read_exact(&mut body).await.is_err() {
                return;
            }
        }
        let mut echo = head.clone().into_bytes();
        echo.extend_from_slice(b"\r\n");
        echo.extend_from_slice(&body);
        let mode = rec.header("x-echo-mode");
        let _ = tx.send(Received { conn, head, body, chunked });
        let writes = if let Some(mode) = mode.as_deref() {
            hostile_response(mode, &rec.header("authorization").unwrap_or_default(), &echo)
        } else {
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Upstream-Conn: {conn}\r\n\r\n", echo.len());
            vec![resp.into_bytes(), echo]
        };
        let w = r.get_mut();
        // Each write is flushed on its own: over TLS, one record each.
        for part in &writes {
            if w.write_all(part).await.is_err() || w.flush().await.is_err() {
                return;
            }
        }
        match mode.as_deref() {
            Some("upgrade") => {
                // After 101: echo raw bytes back, then close.
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 || r.get_mut().write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    let _ = r.get_mut().flush().await;
                }
                let _ = r.get_mut().shutdown().await;
                return;
            }
            Some("close" | "websocket") => {
                let _ = r.get_mut().shutdown().await;
                return;
            }
            _ => {}
        }
    }
}

/// How a hostile-but-honest upstream quotes what it received (`X-Echo-Mode`): every
/// mode puts the request's values (`auth`: its Authorization value, `echo`: its whole
/// head and body) somewhere in the response, the way real APIs quote bad input.
fn hostile_response(mode: &str, auth: &str, echo: &[u8]) -> Vec<Vec<u8>> {
    use std::io::Write as _;
    let with_len = |extra: &str, body: &[u8]| {
        let mut head = format!("HTTP/1.1 200 OK\r\n{extra}Content-Length: {}\r\n\r\n", body.len()).into_bytes();
        head.extend_from_slice(body);
        vec![head]
    };
    match mode {
        "status" => vec![format!("HTTP/1.1 401 Key {auth} is not valid\r\nContent-Length: 0\r\n\r\n").into_bytes()],
        "header" => with_len(&format!("X-Echo-Auth: {auth}\r\nLocation: /next?key={auth}\r\n"), b"ok"),
        "identity" => with_len("", echo),
        "chunked" => {
            // 7-byte chunks: every quoted value straddles chunk boundaries.
            let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for piece in echo.chunks(7) {
                out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                out.extend_from_slice(piece);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(format!("0\r\nX-Trailer-Auth: {auth}\r\n\r\n").as_bytes());
            vec![out]
        }
        "gzip" | "deflate" | "br" => {
            let encoded = match mode {
                "gzip" => {
                    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                    e.write_all(echo).unwrap();
                    e.finish().unwrap()
                }
                "deflate" => {
                    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                    e.write_all(echo).unwrap();
                    e.finish().unwrap()
                }
                // Not really brotli: the proxy must refuse it unread either way.
                _ => echo.to_vec(),
            };
            with_len(&format!("Content-Encoding: {mode}\r\n"), &encoded)
        }
        "split" => {
            // The first quoted value is cut in two TLS records.
            let mut all = with_len("", echo).remove(0);
            let at = all
                .windows(auth.len().max(1))
                .position(|w| w == auth.as_bytes())
                .map_or(all.len() / 2, |i| i + auth.len() / 2);
            let tail = all.split_off(at);
            vec![all, tail]
        }
        "upgrade" => {
            let mut head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n".to_vec();
            head.extend_from_slice(&echo[..echo.len() / 2]);
            vec![head, echo[echo.len() / 2..].to_vec()]
        }
        "websocket" => {
            // A text message, a fragmented one with the value cut between its frames and a
            // ping between them quoting it, then a close frame whose reason quotes it.
            let half = auth.len() / 2;
            let mut close = 1000u16.to_be_bytes().to_vec();
            close.extend_from_slice(format!("bye {auth}").as_bytes());
            vec![
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec(),
                ws_frame(true, 1, format!("echo: {auth}").as_bytes()),
                ws_frame(false, 1, format!("part one {}", &auth[..half]).as_bytes()),
                ws_frame(true, 9, auth.as_bytes()),
                ws_frame(true, 0, format!("{} part two", &auth[half..]).as_bytes()),
                ws_frame(true, 8, &close),
            ]
        }
        "close" => {
            let mut out = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
            out.extend_from_slice(echo);
            vec![out]
        }
        other => with_len("", format!("unknown echo mode {other}").as_bytes()),
    }
}

/// An unmasked WebSocket frame (payloads under 64 KiB).
pub fn ws_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match u8::try_from(payload.len()) {
        Ok(n) if n < 126 => f.push(n),
        _ => {
            f.push(126);
            f.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// Splits unmasked frames: (fin, opcode, payload) each; panics on a malformed stream.
pub fn ws_parse(mut data: &[u8]) -> Vec<(bool, u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while !data.is_empty() {
        assert!(data[1] & 0x80 == 0, "server frames are not masked");
        let (len, at) = match data[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([data[2], data[3]])), 4),
            127 => (usize::try_from(u64::from_be_bytes(data[2..10].try_into().unwrap())).unwrap(), 10),
            n => (usize::from(n), 2),
        };
        assert!(data.len() >= at + len, "frame cut off");
        frames.push((data[0] & 0x80 != 0, data[0] & 0x0f, data[at..at + len].to_vec()));
        data = &data[at + len..];
    }
    frames
}

// ---------- proxy harness ----------

pub fn token(n: u32) -> String {
    format!("osb_sealed_{:032x}", 0xabc0_0000u64 + u64::from(n))
}

pub fn secret(value: &str, hosts: &[&str]) -> SealedSecret {
    SealedSecret {
        value: SecretValue::from(value.to_string()),
        allowed_hosts: hosts.iter().map(std::string::ToString::to_string).collect(),
    }
}

pub struct Harness {
    pub proxy_ca: CaPem,
    pub counters: Arc<proxy::egress_log::EgressCounters>,
    pub registry: Arc<SealRegistry>,
    /// Sandbox id -> address of the listener dedicated to it.
    pub listeners: HashMap<SandboxId, SocketAddr>,
}

pub fn base_config(upstream: &Upstream) -> ProxyConfig {
    let mut cfg = ProxyConfig::new(CaPem::generate().unwrap());
    cfg.upstream_trust =
        UpstreamTrust { system_bundle: None, operator_bundle_pem: Some(upstream.pki.ca_pem.clone().into_bytes()) };
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    for name in ["api.test", "other.test", "x.other.test", "blocked.test", "private.test"] {
        cfg.address_overrides.insert(name.to_string(), lo);
    }
    cfg.allowed_private = vec!["127.0.0.0/8".parse::<Cidr>().unwrap()];
    cfg
}

/// Starts the proxy with one TCP listener per sandbox id in `sandboxes`.
pub async fn start_proxy(cfg: ProxyConfig, registry: Arc<SealRegistry>, sandboxes: &[SandboxId]) -> Harness {
    init_logs();
    let proxy_ca = cfg.ca.clone();
    let proxy = Proxy::new(cfg, registry.clone()).unwrap();
    let counters = proxy.egress_counters();
    let mut listeners = HashMap::new();
    for &id in sandboxes {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listeners.insert(id, l.local_addr().unwrap());
        let p = proxy.clone();
        tokio::spawn(async move { p.serve(TcpSource::new(l, id)).await });
    }
    Harness { proxy_ca, counters, registry, listeners }
}

/// Registers a sandbox with an allowlist and (token, secret) pairs.
pub fn register(reg: &SealRegistry, id: SandboxId, allow: &[&str], tokens: Vec<(String, SealedSecret)>) {
    reg.register(
        id,
        SandboxBindings { egress_allowlist: allow.iter().map(std::string::ToString::to_string).collect(), tokens },
    )
    .unwrap();
}

// ---------- client ----------

pub type Client = BufReader<tokio_rustls::client::TlsStream<TcpStream>>;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response with a Content-Length body (what the echo server and the
/// proxy's own errors send).
pub async fn read_response<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> std::io::Result<Response> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.trim() == "chunked")
    });
    if chunked {
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await?;
            let n = usize::from_str_radix(size.trim(), 16).map_err(|_| std::io::ErrorKind::InvalidData)?;
            if n == 0 {
                // Trailer lines are appended to the head.
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await? == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                break;
            }
            let at = body.len();
            body.resize(at + n + 2, 0);
            r.read_exact(&mut body[at..]).await?;
            body.truncate(at + n);
        }
        return Ok(Response { status, head, body });
    }
    let len = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("content-length")))
        .map_or(0, |(_, v)| v.trim().parse::<usize>().unwrap());
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Response { status, head, body })
}

/// Opens a CONNECT tunnel. Err carries the proxy's answer when it is not 200.
pub async fn connect_raw(proxy: SocketAddr, authority: &str) -> Result<BufReader<TcpStream>, Response> {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let mut r = BufReader::new(tcp);
    r.get_mut()
        .write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let resp = read_response(&mut r).await.unwrap();
    if resp.status != 200 {
        return Err(resp);
    }
    Ok(r)
}

/// CONNECT + TLS handshake trusting only the proxy CA.
pub async fn connect_tls(h: &Harness, sandbox: SandboxId, host: &str, port: u16) -> Result<Client, Response> {
    let r = connect_raw(h.listeners[&sandbox], &format!("{host}:{port}")).await?;
    assert!(r.buffer().is_empty());
    let tcp = r.into_inner();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(h.proxy_ca.cert_pem.as_bytes()).unwrap()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    Ok(BufReader::new(tls))
}

/// Accepts any server certificate: a hostile sandbox does not care whom it talks to.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// CONNECT to `host:port`, then a TLS handshake sending `sni` as the server name
/// and accepting any certificate (what a hand-crafted client may do). Err: the
/// handshake failed.
pub async fn connect_tls_with_sni(
    h: &Harness,
    sandbox: SandboxId,
    host: &str,
    port: u16,
    sni: &str,
) -> std::io::Result<Client> {
    let r = connect_raw(h.listeners[&sandbox], &format!("{host}:{port}")).await.unwrap();
    let tcp = r.into_inner();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider())))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .expect("handshake timeout")?;
    Ok(BufReader::new(tls))
}

/// Sends `req` and reads the response.
pub async fn roundtrip(c: &mut Client, req: &[u8]) -> Response {
    c.get_mut().write_all(req).await.unwrap();
    c.get_mut().flush().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), read_response(c)).await.expect("response timeout").unwrap()
}

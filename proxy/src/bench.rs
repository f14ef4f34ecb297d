//! `proxy bench`: the same loopback TLS upstream is driven directly and through the
//! proxy in one run, plus the substitution engine alone; then 100 MiB downloads through
//! the proxy with response scrubbing on (a sandbox with a secret) and off (one without),
//! plus the scrubbing engine alone. Loopback only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy::http::chunked::ChunkedDecoder;
use proxy::scrub::{ScrubSet, Scrubber};
use proxy::subst::{Replacements, Substituter};
use proxy::{
    CaPem, Cidr, Proxy, ProxyConfig, SandboxBindings, SealRegistry, SealedSecret, SecretValue, TcpSource, UpstreamTrust,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "bench.test";
const TOKEN: &str = "osb_sealed_0123456789abcdef0123456789abcdef";
const SECRET: &str = "sk-bench-secret-value-0123456789";
const SANDBOX: u32 = 3;
/// A sandbox without secrets: its responses have nothing to scrub.
const PLAIN_SANDBOX: u32 = 4;
const DOWNLOAD_BODY: usize = 100 * 1024 * 1024;
/// Scrubbed and unscrubbed downloads alternate; on these noisy 2-core machines single
/// rounds vary by a factor of two, so the medians need more rounds than uploads.
const DOWNLOAD_ROUNDS: usize = 9;
const SMALL_BODY: usize = 1024;
const SMALL_CONNS: usize = 8;
const SMALL_DURATION: Duration = Duration::from_secs(3);
const LARGE_BODY: usize = 100 * 1024 * 1024;
const LARGE_ROUNDS: usize = 5;
const TOKEN_EVERY: usize = 64 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Pki {
    ca_pem: String,
    server: rustls::ServerConfig,
}

fn upstream_pki() -> Result<Pki, BoxError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "bench upstream CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec![HOST.to_string()])?.signed_by(&key, &issuer)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Pki { ca_pem: ca_cert.pem(), server })
}

/// Upstream: reads each request body (Content-Length or chunked), answers with the
/// byte count and how many secret values it saw.
async fn serve_upstream(listener: TcpListener, config: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(tls) = acceptor.accept(tcp).await {
                let _ = upstream_conn(tls).await;
            }
        });
    }
}

async fn upstream_conn<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> Result<(), BoxError> {
    let mut r = BufReader::with_capacity(256 * 1024, stream);
    let finder = memchr::memmem::Finder::new(SECRET.as_bytes());
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        if head.starts_with("GET /download ") {
            let body = download_body();
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            r.get_mut().write_all(resp.as_bytes()).await?;
            for piece in body.chunks(256 * 1024) {
                r.get_mut().write_all(piece).await?;
            }
            r.get_mut().flush().await?;
            continue;
        }
        let lower = head.to_ascii_lowercase();
        let mut bytes = 0usize;
        let mut secrets = 0usize;
        // Secrets may straddle reads: keep a short tail of the previous piece.
        let mut tail: Vec<u8> = Vec::new();
        let mut count = |data: &[u8], tail: &mut Vec<u8>| {
            bytes += data.len();
            tail.extend_from_slice(data);
            secrets += finder.find_iter(tail).count();
            let keep = SECRET.len() - 1;
            let cut = tail.len().saturating_sub(keep);
            tail.drain(..cut);
        };
        if lower.contains("transfer-encoding: chunked") {
            let mut dec = ChunkedDecoder::new(64 * 1024);
            let mut out = Vec::with_capacity(256 * 1024);
            while !dec.is_done() {
                let buf = r.fill_buf().await?;
                if buf.is_empty() {
                    return Ok(());
                }
                let used = dec.decode(buf, &mut out)?;
                r.consume(used);
                count(&out, &mut tail);
                out.clear();
            }
        } else if let Some(pos) = lower.find("content-length:") {
            let len: usize = lower[pos + 15..].lines().next().unwrap_or("").trim().parse()?;
            let mut remaining = len;
            while remaining > 0 {
                let buf = r.fill_buf().await?;
                if buf.is_empty() {
                    return Ok(());
                }
                let take = buf.len().min(remaining);
                count(&buf[..take], &mut tail);
                r.consume(take);
                remaining -= take;
            }
        }
        let body = format!("bytes={bytes} secrets={secrets}");
        let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        r.get_mut().write_all(resp.as_bytes()).await?;
        r.get_mut().flush().await?;
    }
}

type Client = BufReader<tokio_rustls::client::TlsStream<TcpStream>>;

#[derive(Clone)]
struct Target {
    upstream: SocketAddr,
    proxy: Option<SocketAddr>,
    client_config: Arc<rustls::ClientConfig>,
}

async fn connect(t: &Target) -> Result<Client, BoxError> {
    let tcp = match t.proxy {
        None => TcpStream::connect(t.upstream).await?,
        Some(p) => {
            let mut tcp = TcpStream::connect(p).await?;
            let port = t.upstream.port();
            tcp.write_all(format!("CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").as_bytes()).await?;
            let mut answer = Vec::new();
            while !answer.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if tcp.read(&mut b).await? == 0 {
                    return Err("proxy closed during CONNECT".into());
                }
                answer.push(b[0]);
            }
            if !answer.starts_with(b"HTTP/1.1 200") {
                return Err(format!("CONNECT refused: {}", String::from_utf8_lossy(&answer)).into());
            }
            tcp
        }
    };
    tcp.set_nodelay(true)?;
    let tls =
        tokio_rustls::TlsConnector::from(t.client_config.clone()).connect(ServerName::try_from(HOST)?, tcp).await?;
    Ok(BufReader::with_capacity(64 * 1024, tls))
}

async fn read_answer(c: &mut Client) -> Result<String, BoxError> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if c.read_line(&mut line).await? == 0 {
            return Err("connection closed before the response".into());
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("unexpected response: {}", head.lines().next().unwrap_or("")).into());
    }
    let lower = head.to_ascii_lowercase();
    // Through the proxy a sandbox with secrets gets responses re-framed (scrubbed) as chunked.
    if lower.contains("transfer-encoding: chunked") {
        let mut dec = ChunkedDecoder::new(64 * 1024);
        let mut body = Vec::new();
        while !dec.is_done() {
            let buf = c.fill_buf().await?;
            if buf.is_empty() {
                return Err("connection closed in a chunked response".into());
            }
            let used = dec.decode(buf, &mut body)?;
            c.consume(used);
        }
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    let pos = lower.find("content-length:").ok_or("response without Content-Length")?;
    let len: usize = lower[pos + 15..].lines().next().unwrap_or("").trim().parse()?;
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn body_with_tokens(len: usize) -> Vec<u8> {
    let mut body = vec![b'a'; len];
    let mut i = TOKEN_EVERY / 2;
    while i + TOKEN.len() <= len {
        body[i..i + TOKEN.len()].copy_from_slice(TOKEN.as_bytes());
        i += TOKEN_EVERY;
    }
    body
}

/// A response body quoting the secret value every 64 KiB, as an echoing API would.
fn download_body() -> &'static [u8] {
    static BODY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BODY.get_or_init(|| {
        let mut body = vec![b'a'; DOWNLOAD_BODY];
        let mut i = TOKEN_EVERY / 2;
        while i + SECRET.len() <= body.len() {
            body[i..i + SECRET.len()].copy_from_slice(SECRET.as_bytes());
            i += TOKEN_EVERY;
        }
        body
    })
}

/// Counts occurrences of a pattern in a stream read in pieces.
struct StreamCount {
    finder: memchr::memmem::Finder<'static>,
    tail: Vec<u8>,
    count: usize,
}

impl StreamCount {
    fn new(pattern: &'static str) -> Self {
        Self { finder: memchr::memmem::Finder::new(pattern.as_bytes()), tail: Vec::new(), count: 0 }
    }

    fn feed(&mut self, data: &[u8]) {
        // Occurrences across the seam lie in the previous piece's last `keep` bytes plus
        // this one's first `keep`; neither part can hold a whole one on its own.
        let keep = self.finder.needle().len() - 1;
        self.tail.extend_from_slice(&data[..data.len().min(keep)]);
        self.count += self.finder.find_iter(&self.tail).count();
        self.count += self.finder.find_iter(data).count();
        self.tail.clear();
        self.tail.extend_from_slice(&data[data.len().saturating_sub(keep)..]);
    }
}

/// One 100 MiB download; returns MB/s and checks what arrived: scrubbed, the secret
/// never and the token in each of its places; unscrubbed, every byte as sent.
async fn download_once(t: &Target, scrubbed: bool) -> Result<f64, BoxError> {
    let mut c = connect(t).await?;
    let start = Instant::now();
    c.get_mut().write_all(format!("GET /download HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await?;
    c.get_mut().flush().await?;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if c.read_line(&mut line).await? == 0 {
            return Err("connection closed before the download's head".into());
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let lower = head.to_ascii_lowercase();
    let (mut secrets, mut tokens) = (StreamCount::new(SECRET), StreamCount::new(TOKEN));
    let mut bytes = 0usize;
    if lower.contains("transfer-encoding: chunked") {
        let mut dec = ChunkedDecoder::new(64 * 1024);
        let mut out = Vec::with_capacity(256 * 1024);
        while !dec.is_done() {
            let buf = c.fill_buf().await?;
            if buf.is_empty() {
                return Err("download cut short".into());
            }
            let used = dec.decode(buf, &mut out)?;
            c.consume(used);
            bytes += out.len();
            secrets.feed(&out);
            tokens.feed(&out);
            out.clear();
        }
    } else {
        let pos = lower.find("content-length:").ok_or("download without a length")?;
        let mut remaining: usize = lower[pos + 15..].lines().next().unwrap_or("").trim().parse()?;
        while remaining > 0 {
            let buf = c.fill_buf().await?;
            if buf.is_empty() {
                return Err("download cut short".into());
            }
            let take = buf.len().min(remaining);
            bytes += take;
            secrets.feed(&buf[..take]);
            tokens.feed(&buf[..take]);
            c.consume(take);
            remaining -= take;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let places = DOWNLOAD_BODY.saturating_sub(TOKEN_EVERY / 2).div_ceil(TOKEN_EVERY);
    let (want_secrets, want_tokens) = if scrubbed { (0, places) } else { (places, 0) };
    if (secrets.count, tokens.count) != (want_secrets, want_tokens) {
        return Err(format!(
            "download check failed: {} secret(s), {} token(s); expected {want_secrets} and {want_tokens}",
            secrets.count, tokens.count
        )
        .into());
    }
    Ok(bytes as f64 / 1e6 / secs)
}

struct SmallResult {
    rps: f64,
    p50_ms: f64,
}

impl SmallResult {
    /// `OC_PROXY_BENCH_LARGE_ONLY`: the small-request phase was not run (NaN in the last line).
    fn skipped() -> Self {
        SmallResult { rps: f64::NAN, p50_ms: f64::NAN }
    }
}

async fn small_phase(t: &Target) -> Result<SmallResult, BoxError> {
    let mut body = vec![b'x'; SMALL_BODY];
    body[100..100 + TOKEN.len()].copy_from_slice(TOKEN.as_bytes());
    let mut req = format!("POST /small HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {SMALL_BODY}\r\n\r\n").into_bytes();
    req.extend_from_slice(&body);
    let req = Arc::new(req);
    let mut tasks = Vec::new();
    for _ in 0..SMALL_CONNS {
        let t = t.clone();
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&t).await?;
            let mut lat = Vec::new();
            // Warm-up request outside the measurement.
            c.get_mut().write_all(&req).await?;
            read_answer(&mut c).await?;
            let end = Instant::now() + SMALL_DURATION;
            while Instant::now() < end {
                let start = Instant::now();
                c.get_mut().write_all(&req).await?;
                c.get_mut().flush().await?;
                let answer = read_answer(&mut c).await?;
                lat.push(start.elapsed().as_secs_f64() * 1000.0);
                if t.proxy.is_some() && !answer.ends_with("secrets=1") {
                    return Err::<Vec<f64>, BoxError>(format!("token not replaced: {answer}").into());
                }
            }
            Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort_by(f64::total_cmp);
    let p50 = all.get(all.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(SmallResult { rps: all.len() as f64 / SMALL_DURATION.as_secs_f64(), p50_ms: p50 })
}

/// One 100 MiB upload; returns MB/s (10^6 bytes per second).
async fn large_once(t: &Target, body: &Arc<Vec<u8>>) -> Result<f64, BoxError> {
    let mut c = connect(t).await?;
    let head = format!("POST /large HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n", body.len());
    let start = Instant::now();
    c.get_mut().write_all(head.as_bytes()).await?;
    for piece in body.chunks(256 * 1024) {
        c.get_mut().write_all(piece).await?;
    }
    c.get_mut().flush().await?;
    let answer = read_answer(&mut c).await?;
    let secs = start.elapsed().as_secs_f64();
    let tokens = body.len().saturating_sub(TOKEN_EVERY / 2).div_ceil(TOKEN_EVERY);
    let expected = if t.proxy.is_some() { format!("secrets={tokens}") } else { "secrets=0".into() };
    if !answer.ends_with(&expected) {
        return Err(format!("large body check failed: {answer} (expected {expected})").into());
    }
    Ok(body.len() as f64 / 1e6 / secs)
}

/// CPU time of this process's threads by role (thread name prefix), from
/// /proc/self/task/*/schedstat: shows which stage of the pipeline costs what.
#[derive(Default)]
struct CpuByRole {
    upstream_ns: u64,
    proxy_ns: u64,
    client_ns: u64,
}

impl CpuByRole {
    fn now() -> Self {
        let mut t = CpuByRole::default();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return t;
        };
        for task in tasks.flatten() {
            let dir = task.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let ns: u64 = std::fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            if comm.starts_with("bench-upstream") {
                t.upstream_ns += ns;
            } else if comm.starts_with("bench-proxy") {
                t.proxy_ns += ns;
            } else {
                t.client_ns += ns;
            }
        }
        t
    }

    /// Milliseconds spent since `earlier`: (client, proxy, upstream).
    fn since(&self, earlier: &CpuByRole) -> [f64; 3] {
        let ms = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1e6;
        [
            ms(self.client_ns, earlier.client_ns),
            ms(self.proxy_ns, earlier.proxy_ns),
            ms(self.upstream_ns, earlier.upstream_ns),
        ]
    }
}

fn cpu_text([client, proxy, upstream]: [f64; 3]) -> String {
    format!("cpu ms: client {client:.0} proxy {proxy:.0} upstream {upstream:.0}")
}

/// What the CPU times imply for the proxy path: a body cannot cross it faster than its CPU
/// divided by the cores, nor faster than the proxy's own stage (one connection is one task, so
/// one thread at a time). Against the measured direct speed that caps the ratio.
fn cpu_bound_text(direct: &[[f64; 3]], via: &[[f64; 3]], direct_mbps: f64) -> String {
    let total = |v: &[[f64; 3]]| median(v.iter().map(|c| c.iter().sum()).collect());
    let proxy_stage = median(via.iter().map(|c| c[1]).collect());
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let (d, p) = (total(direct), total(via));
    let floor_ms = (p / cores).max(proxy_stage);
    let best_mbps = LARGE_BODY as f64 / 1e6 / (floor_ms / 1e3);
    format!(
        "cpu per body (medians): direct {d:.0} ms, through the proxy {p:.0} ms, of which the proxy's stage \
         {proxy_stage:.0} ms; on {cores} cores the proxy path needs >= {floor_ms:.0} ms per body (<= {best_mbps:.0} MB/s), \
         so against direct {direct_mbps:.0} MB/s large_ratio <= {:.2} here",
        best_mbps / direct_mbps
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Best of 3 runs of a streaming engine over `data` in 64 KiB pieces, in GB/s (10^9
/// bytes per second). `push`/`finish` feed the engine and append its output.
fn engine_gbps<E>(
    data: &[u8],
    mut new: impl FnMut() -> E,
    push: impl Fn(&mut E, &[u8], &mut Vec<u8>),
    finish: impl Fn(&mut E, &mut Vec<u8>),
) -> f64 {
    let mut out = Vec::with_capacity(128 * 1024);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let mut engine = new();
        let start = Instant::now();
        let mut produced = 0usize;
        for piece in data.chunks(64 * 1024) {
            push(&mut engine, piece, &mut out);
            produced += out.len();
            out.clear();
        }
        finish(&mut engine, &mut out);
        produced += out.len();
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(produced);
        best = best.max(data.len() as f64 / 1e9 / secs);
    }
    best
}

/// The substitution engine alone on 256 MiB (a token every 64 KiB).
fn subst_gbps() -> f64 {
    let mut repl = Replacements::new();
    repl.insert(TOKEN.as_bytes(), Arc::new(SecretValue::new(SECRET.as_bytes().to_vec())));
    let repl = Arc::new(repl);
    let data = body_with_tokens(256 * 1024 * 1024);
    engine_gbps(&data, || Substituter::new(repl.clone()), Substituter::push, Substituter::finish)
}

/// The scrubbing engine alone on 256 MiB (the secret every 64 KiB).
fn scrub_gbps() -> f64 {
    let pairs = vec![(Arc::new(SecretValue::new(SECRET.as_bytes().to_vec())), Arc::<str>::from(TOKEN))];
    let Ok(set) = ScrubSet::build(pairs) else { return f64::NAN };
    let set = Arc::new(set);
    let mut data = Vec::with_capacity(256 * 1024 * 1024);
    while data.len() < 256 * 1024 * 1024 {
        data.extend_from_slice(download_body());
    }
    engine_gbps(&data, || Scrubber::new(set.clone()), Scrubber::push, Scrubber::finish)
}

/// Servers started on their own runtimes (own OS threads), as in production where
/// the proxy has its own runtime: one shared runtime would run the pipeline stages
/// one after another on a worker instead of in parallel.
struct Servers {
    upstream: SocketAddr,
    upstream_ca_pem: String,
    proxy: SocketAddr,
    /// The proxy as seen by [`PLAIN_SANDBOX`].
    plain_proxy: SocketAddr,
    proxy_ca: CertificateDer<'static>,
    _upstream_rt: tokio::runtime::Runtime,
    _proxy_rt: tokio::runtime::Runtime,
}

fn start_servers() -> Result<Servers, BoxError> {
    let pki = upstream_pki()?;
    let upstream_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-upstream")
        .enable_all()
        .build()?;
    let upstream_listener = upstream_rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let upstream = upstream_listener.local_addr()?;
    upstream_rt.spawn(serve_upstream(upstream_listener, Arc::new(pki.server)));

    let registry = Arc::new(SealRegistry::new());
    // The upstream's port must be named: without one an entry admits only 443.
    let allowed = format!("{HOST}:{}", upstream.port());
    registry.register(
        SANDBOX,
        SandboxBindings {
            egress_allowlist: vec![allowed.clone()],
            tokens: vec![(
                TOKEN.to_string(),
                SealedSecret { value: SecretValue::from(SECRET.to_string()), allowed_hosts: vec![allowed.clone()] },
            )],
        },
    )?;
    registry.register(PLAIN_SANDBOX, SandboxBindings { egress_allowlist: vec![allowed], tokens: vec![] })?;
    let mut cfg = ProxyConfig::new(CaPem::generate()?);
    cfg.upstream_trust =
        UpstreamTrust { system_bundle: None, operator_bundle_pem: Some(pki.ca_pem.clone().into_bytes()) };
    cfg.address_overrides.insert(HOST.to_string(), upstream.ip());
    cfg.allowed_private = vec!["127.0.0.0/8".parse::<Cidr>()?];
    let proxy_ca = CertificateDer::from_pem_slice(cfg.ca.cert_pem.as_bytes())?;
    let proxy = Proxy::new(cfg, registry)?;
    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-proxy")
        .enable_all()
        .build()?;
    let proxy_listener = proxy_rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let proxy_addr = proxy_listener.local_addr()?;
    let plain_listener = proxy_rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let plain_proxy = plain_listener.local_addr()?;
    let plain = proxy.clone();
    proxy_rt.spawn(async move { proxy.serve(TcpSource::new(proxy_listener, SANDBOX)).await });
    proxy_rt.spawn(async move { plain.serve(TcpSource::new(plain_listener, PLAIN_SANDBOX)).await });
    Ok(Servers {
        upstream,
        upstream_ca_pem: pki.ca_pem,
        proxy: proxy_addr,
        plain_proxy,
        proxy_ca,
        _upstream_rt: upstream_rt,
        _proxy_rt: proxy_rt,
    })
}

async fn run_async(servers: &Servers) -> Result<String, BoxError> {
    let upstream = servers.upstream;
    let proxy_addr = servers.proxy;
    let proxy_ca = servers.proxy_ca.clone();
    let client_config = |root: CertificateDer<'static>| -> Result<Arc<rustls::ClientConfig>, BoxError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root)?;
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    };
    let direct = Target {
        upstream,
        proxy: None,
        client_config: client_config(CertificateDer::from_pem_slice(servers.upstream_ca_pem.as_bytes())?)?,
    };
    let via = Target { upstream, proxy: Some(proxy_addr), client_config: client_config(proxy_ca.clone())? };
    let via_plain = Target { upstream, proxy: Some(servers.plain_proxy), client_config: client_config(proxy_ca)? };

    let large_only = std::env::var_os("OC_PROXY_BENCH_LARGE_ONLY").is_some();
    let (d_small, p_small) = if large_only {
        (SmallResult::skipped(), SmallResult::skipped())
    } else {
        (small_phase(&direct).await?, small_phase(&via).await?)
    };
    println!(
        "small (1 KiB POST, {SMALL_CONNS} conns, {}s each): direct {:.0} rps p50 {:.3} ms; proxy {:.0} rps p50 {:.3} ms",
        SMALL_DURATION.as_secs(),
        d_small.rps,
        d_small.p50_ms,
        p_small.rps,
        p_small.p50_ms
    );

    let body = Arc::new(body_with_tokens(LARGE_BODY));
    let (mut d_large, mut p_large) = (Vec::new(), Vec::new());
    let (mut d_cpu, mut p_cpu) = (Vec::new(), Vec::new());
    for round in 0..LARGE_ROUNDS {
        let before = CpuByRole::now();
        let d = large_once(&direct, &body).await?;
        let mid = CpuByRole::now();
        let p = large_once(&via, &body).await?;
        let after = CpuByRole::now();
        let (d_ms, p_ms) = (mid.since(&before), after.since(&mid));
        println!(
            "large round {round}: direct {d:.0} MB/s ({}), proxy {p:.0} MB/s ({})",
            cpu_text(d_ms),
            cpu_text(p_ms)
        );
        d_cpu.push(d_ms);
        p_cpu.push(p_ms);
        d_large.push(d);
        p_large.push(p);
    }
    let (d_large, p_large) = (median(d_large), median(p_large));
    println!("{}", cpu_bound_text(&d_cpu, &p_cpu, d_large));
    let subst = tokio::task::spawn_blocking(subst_gbps).await?;

    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..DOWNLOAD_ROUNDS {
        let before = CpuByRole::now();
        let s_on = download_once(&via, true).await?;
        let mid = CpuByRole::now();
        let s_off = download_once(&via_plain, false).await?;
        let after = CpuByRole::now();
        println!(
            "download round {round}: scrubbed {s_on:.0} MB/s ({}), not scrubbed {s_off:.0} MB/s ({})",
            cpu_text(mid.since(&before)),
            cpu_text(after.since(&mid))
        );
        on.push(s_on);
        off.push(s_off);
    }
    let (on, off) = (median(on), median(off));
    let scrub = tokio::task::spawn_blocking(scrub_gbps).await?;
    Ok(format!(
        "proxy-bench small_rps={:.0} direct_small_rps={:.0} added_p50_ms={:.3} large_mbps={:.0} direct_large_mbps={:.0} large_ratio={:.2} subst_gbps={:.2} download_mbps={on:.0} unscrubbed_download_mbps={off:.0} scrub_download_ratio={:.2} scrub_gbps={scrub:.2}",
        p_small.rps,
        d_small.rps,
        p_small.p50_ms - d_small.p50_ms,
        p_large,
        d_large,
        p_large / d_large,
        subst,
        on / off
    ))
}

pub fn run() -> Result<(), BoxError> {
    let servers = start_servers()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()?;
    let line = rt.block_on(run_async(&servers))?;
    println!("{line}");
    Ok(())
}

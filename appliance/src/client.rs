//! A minimal blocking HTTP/1.1 keep-alive client for the benchmark (and tests): one
//! request at a time on one connection, bodies delimited by Content-Length; over TCP or TLS.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

/// A byte stream to the server: plain TCP or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

pub struct HttpClient {
    stream: BufReader<Stream>,
    api_key: Option<String>,
}

pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl HttpClient {
    pub fn connect(addr: SocketAddr, api_key: Option<String>) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Self { stream: BufReader::new(Stream::Plain(stream)), api_key })
    }

    /// Connects over TLS, verifying the server as `server_name` with `tls`'s roots.
    pub fn connect_tls(
        addr: SocketAddr,
        api_key: Option<String>,
        tls: Arc<ClientConfig>,
        server_name: &str,
    ) -> io::Result<Self> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("server name {server_name:?}: {e}")))?;
        let connection = ClientConnection::new(tls, name).map_err(io::Error::other)?;
        let tcp = TcpStream::connect(addr)?;
        tcp.set_nodelay(true)?;
        let mut stream = StreamOwned::new(connection, tcp);
        // Handshake now, so a certificate problem is this call's error.
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(Self { stream: BufReader::new(Stream::Tls(Box::new(stream))), api_key })
    }

    /// A TLS client configuration trusting only the certificates in `pem`.
    pub fn tls_trusting(pem: &str) -> io::Result<Arc<ClientConfig>> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            roots.add(cert).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        }
        let config = ClientConfig::builder_with_provider(proxy::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    pub fn request(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<HttpResponse> {
        let content_type = if body.is_empty() { None } else { Some("application/json") };
        self.request_typed(method, path, content_type, body)
    }

    /// A request whose body is of `content_type` (an upload), not JSON.
    pub fn request_typed(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> io::Result<HttpResponse> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n", body.len());
        if let Some(content_type) = content_type {
            head.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        if let Some(key) = &self.api_key {
            head.push_str(&format!("X-API-Key: {key}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body);
        let stream = self.stream.get_mut();
        stream.write_all(&out)?;
        stream.flush()?;
        self.read_response()
    }

    fn read_response(&mut self) -> io::Result<HttpResponse> {
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| invalid("bad status line"))?;
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            line.clear();
            if self.stream.read_line(&mut line)? == 0 {
                return Err(invalid("truncated headers"));
            }
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((name, value)) = trimmed.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().map_err(|_| invalid("bad content-length"))?;
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.trim().eq_ignore_ascii_case("chunked");
                    if !chunked {
                        return Err(invalid("only chunked transfer encoding is supported by this client"));
                    }
                }
            }
        }
        let body = if chunked {
            self.read_chunks()?
        } else {
            let mut body = vec![0u8; length];
            self.stream.read_exact(&mut body)?;
            body
        };
        Ok(HttpResponse { status, body })
    }

    /// A chunked body, whole; one that breaks off before its zero-length chunk is an error
    /// (the server cuts a download that fails midway that way).
    fn read_chunks(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            if self.stream.read_line(&mut line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the chunked body broke off"));
            }
            let size_text = line.trim_end().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("bad chunk size"))?;
            let start = body.len();
            body.resize(start + size, 0);
            self.stream.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            self.stream.read_exact(&mut crlf)?;
            if crlf != *b"\r\n" {
                return Err(invalid("bad chunk end"));
            }
            if size == 0 {
                return Ok(body);
            }
        }
    }
}

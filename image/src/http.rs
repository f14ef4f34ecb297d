//! A minimal blocking HTTP/1.1 client over loopback (plain or TLS), enough to poll the
//! appliance's health endpoint and drive its API without pulling an HTTP stack into the build
//! tool.

use crate::err;
use crate::error::{Context, Result};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Where the appliance API answers on this host: a loopback port, over TLS trusting `tls`'s
/// roots (verified as `127.0.0.1`), or plain HTTP when `tls` is None.
#[derive(Clone)]
pub struct Endpoint {
    pub port: u16,
    pub tls: Option<Arc<ClientConfig>>,
}

impl Endpoint {
    pub fn plain(port: u16) -> Endpoint {
        Endpoint { port, tls: None }
    }

    /// The API's base URL.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/api", self.port)
    }
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request with `Connection: close` and reads the whole response.
pub fn request(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response> {
    let port = endpoint.port;
    let mut stream = connect(endpoint, timeout, timeout)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).ctx(|| format!("send {method} {path}"))?;
    stream.write_all(body).ctx(|| format!("send body of {method} {path}"))?;
    stream.flush().ctx(|| format!("send {method} {path}"))?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A TLS peer that closes without close_notify after a complete answer: the answer stands.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(err!("read response to {method} {path}: {e}")),
    }
    parse_response(&raw)
}

/// A connection to the appliance API on this host (TLS when `endpoint` has it): `connect_timeout`
/// to open it, `io_timeout` for each read and write.
pub fn connect(endpoint: &Endpoint, connect_timeout: Duration, io_timeout: Duration) -> Result<Box<dyn ReadWrite>> {
    let addr = SocketAddr::from(([127, 0, 0, 1], endpoint.port));
    let tcp = TcpStream::connect_timeout(&addr, connect_timeout).ctx(|| format!("connect to {addr}"))?;
    tcp.set_read_timeout(Some(io_timeout)).ctx(|| "set read timeout".into())?;
    tcp.set_write_timeout(Some(io_timeout)).ctx(|| "set write timeout".into())?;
    Ok(match &endpoint.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let name = ServerName::try_from("127.0.0.1").map_err(|e| err!("server name: {e}"))?;
            let conn = ClientConnection::new(Arc::clone(tls), name).map_err(|e| err!("TLS to {addr}: {e}"))?;
            Box::new(StreamOwned::new(conn, tcp))
        }
    })
}

/// A byte stream both ways: a TCP connection or TLS over one.
pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The status and body of a whole HTTP/1.1 response (`Content-Length`, chunked, or to the close).
pub fn parse_response(raw: &[u8]) -> Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| err!("response has no complete header ({} bytes)", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status_line = head.lines().next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| err!("bad status line {status_line:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[split + 4..];
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| err!("truncated chunk size"))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| err!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).ok_or_else(|| err!("truncated chunk"))?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).ok_or_else(|| err!("truncated chunk trailer"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").expect("plain");
        assert_eq!((plain.status, plain.text().as_str()), (200, "ok"));
        let chunked = parse_response(
            b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .expect("chunked");
        assert_eq!((chunked.status, chunked.text().as_str()), (401, "abcde"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }
}

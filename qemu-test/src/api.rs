//! The appliance's public HTTP API as the tests use it: JSON in, status and JSON (or bytes) out,
//! authenticated with the admin key. Only the documented wire contract, nothing internal.

use image::err;
use image::error::{Context, Result};
use image::http::Endpoint;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Sandbox creation boots a nested microVM under TCG; commands may run for a while.
const TIMEOUT: Duration = Duration::from_secs(240);
/// An upload answers when what it carried is done with (a template import unpacks the archive,
/// makes a disk and boots it once for its snapshot): minutes under TCG.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(1200);

/// The answer to a streamed upload and when its parts happened, from the connect.
pub struct Uploaded {
    pub status: u16,
    /// The answer as JSON (`null` when empty).
    pub body: Value,
    /// The last byte of the body handed to the connection.
    pub sent: Duration,
    /// The whole answer read.
    pub answered: Duration,
}

pub struct Api {
    /// The appliance's API on this host (HTTPS, trusting the CA learned from the console).
    pub endpoint: Endpoint,
    pub key: String,
}

impl Api {
    pub fn new(endpoint: Endpoint, key: &str) -> Api {
        Api { endpoint, key: key.to_string() }
    }

    /// `path` is below `/api`.
    pub fn raw(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        self.request(method, &format!("/api{path}"), body)
    }

    fn request(&self, method: &str, full_path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        let headers = [("X-API-Key", self.key.as_str()), ("Content-Type", "application/json")];
        let resp = image::http::request(&self.endpoint, method, full_path, &headers, body, TIMEOUT)?;
        Ok((resp.status, resp.body))
    }

    /// Sends `body` (JSON or empty) and parses the answer as JSON (`null` for an empty body).
    pub fn call(&self, method: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
        let bytes = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
        let (status, answer) = self.raw(method, path, &bytes)?;
        if answer.is_empty() {
            return Ok((status, Value::Null));
        }
        let value = serde_json::from_slice(&answer)
            .map_err(|e| err!("{method} {path}: answer is not JSON ({e}): {}", String::from_utf8_lossy(&answer)))?;
        Ok((status, value))
    }

    /// Like `call`, but any status other than `want` is an error naming the answer.
    pub fn expect(&self, want: u16, method: &str, path: &str, body: &Value) -> Result<Value> {
        let (status, value) = self.call(method, path, body)?;
        if status != want {
            return Err(err!("{method} {path}: expected {want}, got {status}: {value}"));
        }
        Ok(value)
    }

    /// The names in a project's secret list (`[{"name", "allowedHosts"}]`, never values).
    pub fn secret_names(&self, project_id: &str) -> Result<Vec<String>> {
        let list = self.expect(200, "GET", &format!("/projects/{project_id}/secrets"), &Value::Null)?;
        let entries = list.as_array().ok_or_else(|| err!("the secret list is not an array: {list}"))?;
        entries
            .iter()
            .map(|e| e["name"].as_str().map(str::to_string).ok_or_else(|| err!("a secret entry without a name: {e}")))
            .collect()
    }

    pub fn create_sandbox(&self, body: &Value) -> Result<String> {
        let created = self.expect(201, "POST", "/sandboxes", body)?;
        created["sandboxID"].as_str().map(str::to_string).ok_or_else(|| err!("no sandboxID in {created}"))
    }

    /// Runs a shell line; returns (exit code, stdout, stderr).
    pub fn run(&self, sandbox: &str, cmd: &str, timeout_sec: u64) -> Result<(i64, String, String)> {
        let body = serde_json::json!({"cmd": cmd, "timeout": timeout_sec});
        let out = self.expect(200, "POST", &format!("/sandboxes/{sandbox}/commands"), &body)?;
        let code = out["exitCode"].as_i64().ok_or_else(|| err!("no exitCode in {out}"))?;
        let text = |k: &str| out[k].as_str().unwrap_or_default().to_string();
        Ok((code, text("stdout"), text("stderr")))
    }

    /// Streams `file` as the body of `POST /api{path}` with `content_type` (image::http::request
    /// takes its body as one slice; archives are hundreds of MiB), then reads the JSON answer.
    pub fn upload(&self, path: &str, content_type: &str, file: &Path) -> Result<Uploaded> {
        let what = format!("POST /api{path} with {}", file.display());
        let mut body = std::fs::File::open(file).ctx(|| format!("open {}", file.display()))?;
        let length = body.metadata().ctx(|| format!("stat {}", file.display()))?.len();
        let started = Instant::now();
        let mut stream = image::http::connect(&self.endpoint, TIMEOUT, UPLOAD_TIMEOUT)?;
        let head = format!(
            "POST /api{path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: {length}\r\nContent-Type: {content_type}\r\nX-API-Key: {}\r\n\r\n",
            self.endpoint.port, self.key
        );
        let mut sending = || -> std::io::Result<()> {
            stream.write_all(head.as_bytes())?;
            // TLS records carry at most 16 KiB; a large read keeps the file side cheap.
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = body.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                stream.write_all(&buf[..n])?;
            }
            stream.flush()
        };
        // A server that refuses early may close before the body is sent: its answer still counts.
        let send_error = sending().err();
        let sent = started.elapsed();
        let mut raw = Vec::new();
        match stream.read_to_end(&mut raw) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => {
                let also = send_error.map(|s| format!(" (sending: {s})")).unwrap_or_default();
                return Err(err!("{what}: reading the answer: {e}{also}"));
            }
        }
        let answered = started.elapsed();
        let image::http::Response { status, body: answer } = image::http::parse_response(&raw).map_err(|e| {
            let also = send_error.as_ref().map(|s| format!(" (sending: {s})")).unwrap_or_default();
            err!("{what}: {e}{also}")
        })?;
        let body = if answer.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&answer)
                .map_err(|e| err!("{what}: answer is not JSON ({e}): {}", String::from_utf8_lossy(&answer)))?
        };
        Ok(Uploaded { status, body, sent, answered })
    }

    pub fn metrics(&self) -> Result<String> {
        let (status, body) = self.request("GET", "/metrics", b"")?;
        if status != 200 {
            return Err(err!("/metrics answered {status}"));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// The value of a gauge or counter in Prometheus text (`name` with its labels, if any).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2026-11-29T03:04:05Z`, fractions ignored).
pub fn rfc3339_seconds(text: &str) -> Option<i64> {
    let text = text.strip_suffix('Z').or_else(|| text.strip_suffix("+00:00"))?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut t = time.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || s > 60 {
        return None;
    }
    // Days from 1970-01-01 to the date (proleptic Gregorian), counting from March so the
    // leap day falls at the end of the year.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(days * 86_400 + h * 3600 + min * 60 + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_convert_to_epoch_seconds() {
        assert_eq!(rfc3339_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_seconds("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(rfc3339_seconds("2024-02-29T12:30:15.250Z"), Some(1_709_209_815));
        assert_eq!(rfc3339_seconds("2026-11-29T03:04:05+00:00"), Some(1_795_921_445));
        assert_eq!(rfc3339_seconds("2026-13-01T00:00:00Z"), None);
        assert_eq!(rfc3339_seconds("yesterday"), None);
        assert_eq!(rfc3339_seconds("2026-11-29T03:04:05+02:00"), None);
    }
}

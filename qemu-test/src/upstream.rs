//! The test upstream: a recording HTTPS server (upstream/echo_upstream.py) with its own test CA,
//! on the host's loopback port 443, which the appliance reaches through QEMU's user network at
//! 10.0.2.2. The appliance's proxy is told to map the test names to that address and to trust
//! the test CA (operator proxy settings), exactly as an operator would for an internal API.

use crate::check::check;
use image::err;
use image::error::{Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Names the proxy maps to the upstream (so no test request can leave for the real host).
/// `blocked.example.com` and `example.com` are outside every allowlist.
pub const HOSTS: &[&str] = &["api.anthropic.com", "blocked.example.com", "example.com"];
/// Where the appliance (a QEMU user-network guest) reaches the host's loopback.
const HOST_FROM_GUEST: &str = "10.0.2.2";
/// HTTPS's port: the documented snippets use URLs without a port.
const PORT: u16 = 443;
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/upstream/echo_upstream.py");

pub struct Upstream {
    child: Child,
    pub records: PathBuf,
    pub ca_pem: String,
    /// Tokens whose secret was deleted and that a test then sent on purpose: they are expected
    /// in the records from then on, so the no-token check below does not count them.
    revoked: Vec<String>,
}

impl Upstream {
    pub fn start(dir: &Path) -> Result<Upstream> {
        image::host::ensure(&[image::host::tool("openssl", "openssl"), image::host::tool("python3", "python3")])?;
        std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        let (ca_pem, cert, key) = make_certificates(dir)?;
        let records = dir.join("requests.jsonl");
        std::fs::write(&records, b"").ctx(|| format!("create {}", records.display()))?;
        let mut child = Command::new("python3")
            .arg(SCRIPT)
            .args(["127.0.0.1", &PORT.to_string()])
            .arg(&cert)
            .arg(&key)
            .arg(&records)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .ctx(|| "start the test upstream (python3)".into())?;
        let mut first = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut first);
        }
        if first.trim() != "listening" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err!(
                "the test upstream did not start on 127.0.0.1:{PORT} (is the port free? tests run as root)"
            ));
        }
        Ok(Upstream { child, records, ca_pem, revoked: Vec::new() })
    }

    /// The appliance's proxy settings that route the test names here.
    pub fn proxy_config(&self) -> Value {
        let hosts: serde_json::Map<String, Value> =
            HOSTS.iter().map(|h| (h.to_string(), json!(HOST_FROM_GUEST))).collect();
        json!({"hosts": hosts, "allowPrivate": [format!("{HOST_FROM_GUEST}/32")], "trustedCaPem": self.ca_pem})
    }

    /// The real `secret` arrived in the two requests received after the first `before`: in the
    /// `x-api-key` header of the first and as `api_key` in the JSON body of the second; and no
    /// sealed token is in anything received so far. Returns everything received.
    pub fn expect_real_key(&self, before: usize, secret: &str) -> Result<Vec<Value>> {
        let received = self.received()?;
        let new = &received[before.min(received.len())..];
        check(new.len() == 2, || format!("the upstream received {} requests: {new:?}", new.len()))?;
        check(header(&new[0], "x-api-key") == Some(secret), || format!("the header request arrived as {}", new[0]))?;
        let body: Value = serde_json::from_str(new[1]["body"].as_str().unwrap_or("")).unwrap_or(Value::Null);
        check(body["api_key"] == secret, || format!("the body request arrived as {}", new[1]))?;
        let all = serde_json::to_string(&received).unwrap_or_default();
        let revoked: usize = self.revoked.iter().map(|t| all.matches(t.as_str()).count()).sum();
        let tokens = all.matches("osb_sealed_").count().saturating_sub(revoked);
        check(tokens == 0, || format!("the upstream saw {tokens} sealed token(s)"))?;
        Ok(received)
    }

    /// After its secret was deleted, `token` arrived as itself (the proxy no longer replaces it)
    /// in the `x-api-key` header of the one request received after the first `before`, and no
    /// secret value did. From now on the records may hold this token.
    pub fn expect_revoked_token(&mut self, before: usize, token: &str, secret: &str) -> Result<Value> {
        let received = self.received()?;
        let new = &received[before.min(received.len())..];
        check(new.len() == 1, || format!("the upstream received {} requests: {new:?}", new.len()))?;
        let record = new[0].clone();
        check(header(&record, "x-api-key") == Some(token), || format!("the request arrived as {record}"))?;
        check(!record.to_string().contains(secret), || format!("the deleted secret's value arrived: {record}"))?;
        self.revoked.push(token.to_string());
        Ok(record)
    }

    /// Every request received so far, in order.
    pub fn received(&self) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(&self.records).ctx(|| format!("read {}", self.records.display()))?;
        text.lines().map(|l| serde_json::from_str(l).map_err(|e| err!("bad record {l:?}: {e}"))).collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first value of request header `name` (any case) in a record.
pub fn header<'a>(record: &'a Value, name: &str) -> Option<&'a str> {
    record["headers"].as_array()?.iter().find(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))?[1]
        .as_str()
}

/// A test CA and a leaf for the test names, made with the openssl CLI.
fn make_certificates(dir: &Path) -> Result<(String, PathBuf, PathBuf)> {
    let path = |name: &str| dir.join(name);
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl").args(args).current_dir(dir).output().ctx(|| "run openssl".into())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(err!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
        }
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=OpenComputer e2e test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ])?;
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=api.anthropic.com",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
    ])?;
    let san = format!("subjectAltName={}", HOSTS.iter().map(|h| format!("DNS:{h}")).collect::<Vec<_>>().join(","));
    std::fs::write(path("leaf.ext"), format!("{san}\nextendedKeyUsage=serverAuth\n"))
        .ctx(|| "write leaf.ext".into())?;
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
        "-out",
        "leaf.pem",
    ])?;
    let ca_pem = std::fs::read_to_string(path("ca.pem")).ctx(|| "read ca.pem".into())?;
    Ok((ca_pem, path("leaf.pem"), path("leaf.key")))
}

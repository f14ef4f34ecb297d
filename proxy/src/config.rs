//! Operator configuration of the proxy: CA, upstream trust, egress exceptions, limits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::ca::CaPem;
use crate::egress::Cidr;
use crate::tls::UpstreamTrust;

#[derive(Clone, Debug)]
pub struct Timeouts {
    /// Resolving and connecting to an upstream, including its TLS handshake.
    pub connect: Duration,
    /// Receiving a complete request head (and the sandbox-side TLS handshake).
    pub header: Duration,
    /// No byte in either direction.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(10), header: Duration::from_secs(30), idle: Duration::from_secs(120) }
    }
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_connections_per_sandbox: usize,
    pub max_connections: usize,
    /// Bodies with a Content-Length up to this size are rewritten in memory so the
    /// length can be corrected; larger and chunked bodies are streamed re-chunked.
    pub max_buffered_body: usize,
    /// A gzip/deflate request body in which tokens may be replaced is read whole
    /// (up to this size, else 413) before anything of the request goes upstream.
    pub max_compressed_body: usize,
    /// Such a body is refused (413) once it inflates past this many bytes.
    pub max_inflated_body: usize,
    /// ... or once it expands more than this many times its compressed size
    /// (bodies inflating to at most 1 MiB are exempt).
    pub max_inflate_ratio: u32,
    pub leaf_cache_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 128,
            max_connections_per_sandbox: 256,
            max_connections: 4096,
            max_buffered_body: 1024 * 1024,
            max_compressed_body: 8 * 1024 * 1024,
            max_inflated_body: 64 * 1024 * 1024,
            max_inflate_ratio: 200,
            leaf_cache_size: 1024,
        }
    }
}

/// Everything the proxy needs besides the registry.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The appliance CA that signs the per-host leaf certificates.
    pub ca: CaPem,
    pub upstream_trust: UpstreamTrust,
    /// Host name -> address used instead of DNS (internal APIs, tests). Keys are
    /// normalised host names.
    pub address_overrides: HashMap<String, IpAddr>,
    /// Restricted destinations (loopback, private, link-local, own addresses) that
    /// the operator explicitly allows.
    pub allowed_private: Vec<Cidr>,
    pub timeouts: Timeouts,
    pub limits: Limits,
}

impl ProxyConfig {
    /// Defaults: system trust bundle, no overrides, no private destinations.
    pub fn new(ca: CaPem) -> Self {
        Self {
            ca,
            upstream_trust: UpstreamTrust::default(),
            address_overrides: HashMap::new(),
            allowed_private: Vec::new(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
        }
    }
}

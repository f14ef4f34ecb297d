//! The proxy service: shared state, the accept loop and per-sandbox connection limits.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use rustls::ClientConfig;

use crate::ca::{CertificateAuthority, LeafCache};
use crate::config::ProxyConfig;
use crate::egress::EgressPolicy;
use crate::http::simple_response;
use crate::listener::ConnectionSource;
use crate::registry::{SandboxId, SealRegistry};
use crate::tls::upstream_client_config;

#[derive(Debug)]
pub enum ProxyError {
    Ca(crate::ca::CaError),
    Trust(String),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ca(e) => write!(f, "appliance CA: {e}"),
            Self::Trust(e) => write!(f, "upstream trust: {e}"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// State shared by every connection.
pub struct Shared {
    pub config: ProxyConfig,
    pub registry: Arc<SealRegistry>,
    pub leafs: LeafCache,
    pub upstream_tls: Arc<ClientConfig>,
    pub egress: EgressPolicy,
    connections: Mutex<(HashMap<SandboxId, usize>, usize)>,
}

/// Counts one open connection; released on drop.
struct ConnectionSlot {
    shared: Arc<Shared>,
    sandbox: SandboxId,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut guard = self.shared.connections.lock().unwrap_or_else(|e| e.into_inner());
        let (per_sandbox, total) = &mut *guard;
        *total = total.saturating_sub(1);
        if let Some(n) = per_sandbox.get_mut(&self.sandbox) {
            *n -= 1;
            if *n == 0 {
                per_sandbox.remove(&self.sandbox);
            }
        }
    }
}

impl Shared {
    fn try_acquire(self: &Arc<Self>, sandbox: SandboxId) -> Option<ConnectionSlot> {
        let limits = &self.config.limits;
        let mut guard = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let (per_sandbox, total) = &mut *guard;
        let mine = per_sandbox.entry(sandbox).or_insert(0);
        if *mine >= limits.max_connections_per_sandbox || *total >= limits.max_connections {
            if *mine == 0 {
                per_sandbox.remove(&sandbox);
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(ConnectionSlot { shared: self.clone(), sandbox })
    }
}

/// The sealing proxy. Cheap to clone; `serve` may run for several sources at once.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    /// Loads the CA and the upstream trust; fails with a clear message on bad input.
    pub fn new(config: ProxyConfig, registry: Arc<SealRegistry>) -> Result<Self, ProxyError> {
        let ca = CertificateAuthority::from_pem(&config.ca).map_err(ProxyError::Ca)?;
        let upstream_tls = upstream_client_config(&config.upstream_trust).map_err(ProxyError::Trust)?;
        let egress = EgressPolicy {
            overrides: config.address_overrides.clone(),
            allowed: config.allowed_private.clone(),
            connect_timeout: config.timeouts.connect,
        };
        let leafs = LeafCache::new(ca, config.limits.leaf_cache_size);
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                registry,
                leafs,
                upstream_tls,
                egress,
                connections: Mutex::new((HashMap::new(), 0)),
            }),
        })
    }

    /// Open connections of one sandbox (for the appliance's metrics).
    pub fn connections_of(&self, sandbox: SandboxId) -> usize {
        self.shared.connections.lock().unwrap_or_else(|e| e.into_inner()).0.get(&sandbox).copied().unwrap_or(0)
    }

    /// Accepts connections until the source fails permanently. Each connection
    /// runs in its own task on the current tokio runtime.
    pub async fn serve<S: ConnectionSource>(&self, mut source: S) -> std::io::Result<()> {
        loop {
            let (mut stream, sandbox) = match source.accept().await {
                Ok(c) => c,
                Err(e) if is_transient(&e) => {
                    warn!("accept failed (will retry): {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let shared = self.shared.clone();
            tokio::spawn(async move {
                let Some(slot) = shared.try_acquire(sandbox) else {
                    info!("sandbox {sandbox}: connection limit reached");
                    use tokio::io::AsyncWriteExt;
                    let body =
                        simple_response(429, "Too Many Requests", "too many open connections for this sandbox", true);
                    let _ = stream.write_all(&body).await;
                    let _ = stream.shutdown().await;
                    return;
                };
                crate::session::handle(shared, stream, sandbox).await;
                drop(slot);
            });
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut)
        || matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO))
}

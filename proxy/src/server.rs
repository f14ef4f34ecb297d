//! The proxy service: builds the shared state and runs the accept loop, turning away
//! connections over the limits.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};

use crate::ca::{CertificateAuthority, LeafCache};
use crate::config::ProxyConfig;
use crate::egress::EgressPolicy;
use crate::http::simple_response;
use crate::listener::ConnectionSource;
use crate::registry::{SandboxId, SealRegistry};
use crate::shared::Shared;
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
        Ok(Self { shared: Arc::new(Shared::new(config, registry, leafs, upstream_tls, egress)) })
    }

    /// Open connections of one sandbox (for the appliance's metrics).
    pub fn connections_of(&self, sandbox: SandboxId) -> usize {
        self.shared.connections_of(sandbox)
    }

    /// Egress decisions and traffic so far (for the appliance's metrics).
    pub fn egress_counters(&self) -> Arc<crate::egress_log::EgressCounters> {
        self.shared.counters.clone()
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
                    info!("egress: sandbox {sandbox}: rejected: connection limit reached");
                    shared.counters.record(crate::egress_log::Decision::Rejected);
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
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted, TimedOut, WouldBlock};
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut)
        || matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO))
}

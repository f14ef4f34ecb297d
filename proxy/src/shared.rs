//! The state every connection of a proxy shares: its configuration, the registry, the
//! leaf certificate cache, the upstream TLS configuration, the egress policy and counters, and the
//! open-connection counts that enforce the per-sandbox and total connection limits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::ClientConfig;

use crate::ca::LeafCache;
use crate::config::ProxyConfig;
use crate::egress::EgressPolicy;
use crate::egress_log::EgressCounters;
use crate::registry::{SandboxId, SealRegistry};

/// State shared by every connection.
pub struct Shared {
    pub config: ProxyConfig,
    pub registry: Arc<SealRegistry>,
    pub leafs: LeafCache,
    pub upstream_tls: Arc<ClientConfig>,
    pub egress: EgressPolicy,
    pub counters: Arc<EgressCounters>,
    connections: Mutex<(HashMap<SandboxId, usize>, usize)>,
}

/// Counts one open connection; released on drop.
pub struct ConnectionSlot {
    shared: Arc<Shared>,
    sandbox: SandboxId,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut guard = self.shared.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
    pub fn new(
        config: ProxyConfig,
        registry: Arc<SealRegistry>,
        leafs: LeafCache,
        upstream_tls: Arc<ClientConfig>,
        egress: EgressPolicy,
    ) -> Self {
        Self {
            config,
            registry,
            leafs,
            upstream_tls,
            egress,
            counters: Arc::new(EgressCounters::default()),
            connections: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// Open connections of one sandbox.
    pub fn connections_of(&self, sandbox: SandboxId) -> usize {
        self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0.get(&sandbox).copied().unwrap_or(0)
    }

    /// Counts a new connection of `sandbox`, or None when it or the proxy is at its limit.
    pub fn try_acquire(self: &Arc<Self>, sandbox: SandboxId) -> Option<ConnectionSlot> {
        let limits = &self.config.limits;
        let mut guard = self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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

//! The sealing proxy inside the appliance: the appliance CA (created at first start, key
//! encrypted at rest), the proxy serving sandboxes on vsock port 1080 on its own tokio thread,
//! and the publisher that hands sealed-token bindings to it keyed by the sandbox's CID.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use proxy::egress_log::EgressCounters;
use proxy::{CaPem, Cidr, Proxy, ProxyConfig, SandboxBindings, SealRegistry, SealedSecret, SecretValue, VsockListener};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::ca_store::{self, APPLIANCE_CA};
use crate::crypto::Keyring;
use crate::seal::{SandboxSeal, SealPublisher};
use crate::store::Store;

/// Where sandboxes reach the proxy: the port the agent's egress forwarder dials on host CID 2.
pub const PROXY_VSOCK_PORT: u32 = agent_protocol::EGRESS_PORT;

/// Operator settings for upstream connections (a JSON file; every field optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OperatorEgress {
    /// Extra PEM roots trusted for upstream TLS (internal APIs).
    #[serde(default)]
    pub trusted_ca_pem: Option<String>,
    /// Host name -> address used instead of DNS.
    #[serde(default)]
    pub hosts: HashMap<String, IpAddr>,
    /// Private/loopback/link-local ranges the proxy may dial anyway (CIDR strings).
    #[serde(default)]
    pub allow_private: Vec<String>,
}

impl OperatorEgress {
    /// Reads the file if it exists; a missing file means defaults.
    pub fn load(path: Option<&Path>) -> Result<OperatorEgress, String> {
        let Some(path) = path else { return Ok(OperatorEgress::default()) };
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("proxy configuration {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(OperatorEgress::default()),
            Err(e) => Err(format!("cannot read proxy configuration {}: {e}", path.display())),
        }
    }
}

/// The appliance CA, generated and stored (key sealed under the master key) on first use.
pub fn load_or_create_ca(store: &Store, keyring: &Keyring) -> Result<CaPem, String> {
    if let Some((cert_pem, key)) = ca_store::load(store, keyring, APPLIANCE_CA).map_err(|e| e.message)? {
        let key_pem = String::from_utf8(key.to_vec()).map_err(|_| "stored CA key is not PEM text".to_string())?;
        return Ok(CaPem { cert_pem, key_pem: Zeroizing::new(key_pem) });
    }
    let ca = CaPem::generate().map_err(|e| format!("cannot generate the appliance CA: {e}"))?;
    ca_store::save(store, keyring, APPLIANCE_CA, &ca.cert_pem, ca.key_pem.as_bytes()).map_err(|e| e.message)?;
    println!("appliance: generated the appliance CA (ECDSA P-256); its key is stored encrypted");
    Ok(ca)
}

pub fn proxy_config(ca: CaPem, ca_roots: PathBuf, operator: OperatorEgress) -> Result<ProxyConfig, String> {
    let mut config = ProxyConfig::new(ca);
    config.upstream_trust.system_bundle = Some(ca_roots);
    config.upstream_trust.operator_bundle_pem = operator.trusted_ca_pem.map(String::into_bytes);
    config.address_overrides = operator.hosts.into_iter().map(|(name, ip)| (name.to_ascii_lowercase(), ip)).collect();
    config.allowed_private = operator
        .allow_private
        .iter()
        .map(|c| c.parse::<Cidr>().map_err(|e| format!("allowPrivate {c:?}: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(config)
}

/// Starts the proxy on vsock on a dedicated thread with its own tokio runtime; returns
/// its egress counters.
pub fn start_proxy(config: ProxyConfig, registry: Arc<SealRegistry>) -> Result<Arc<EgressCounters>, String> {
    let proxy = Proxy::new(config, registry).map_err(|e| format!("cannot configure the proxy: {e}"))?;
    let counters = proxy.egress_counters();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("proxy")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the proxy runtime: {e}"))?;
    // Bind inside the runtime: the listener registers with its reactor.
    let listener = runtime
        .block_on(async { VsockListener::bind(PROXY_VSOCK_PORT) })
        .map_err(|e| format!("cannot listen on vsock port {PROXY_VSOCK_PORT}: {e}"))?;
    std::thread::Builder::new()
        .name("proxy".into())
        .spawn(move || {
            if let Err(e) = runtime.block_on(proxy.serve(listener)) {
                println!("appliance: PROXY STOPPED: {e}; sandboxes have no egress");
            }
        })
        .map_err(|e| format!("cannot start the proxy thread: {e}"))?;
    println!("appliance: sealing proxy listening on vsock port {PROXY_VSOCK_PORT}");
    Ok(counters)
}

/// Publishes sealed-token bindings to the proxy's registry, keyed by CID.
pub struct RegistryPublisher {
    registry: Arc<SealRegistry>,
    cids: Mutex<HashMap<String, u32>>,
}

impl RegistryPublisher {
    pub fn new(registry: Arc<SealRegistry>) -> Self {
        Self { registry, cids: Mutex::new(HashMap::new()) }
    }
}

impl SealPublisher for RegistryPublisher {
    fn publish(&self, seal: SandboxSeal) -> Result<(), String> {
        let tokens = seal
            .bindings
            .into_iter()
            .map(|b| {
                let value = SecretValue::new(b.value.to_vec());
                (b.token, SealedSecret { value, allowed_hosts: b.allowed_hosts })
            })
            .collect();
        let bindings = SandboxBindings { egress_allowlist: seal.egress_allowlist, tokens };
        self.registry.register(seal.cid, bindings).map_err(|e| e.to_string())?;
        self.cids.lock().map_err(|_| "publisher state poisoned".to_string())?.insert(seal.sandbox_id, seal.cid);
        Ok(())
    }

    fn withdraw(&self, sandbox_id: &str) {
        let cid = self.cids.lock().ok().and_then(|mut cids| cids.remove(sandbox_id));
        if let Some(cid) = cid {
            self.registry.unregister(cid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::SealedBinding;

    #[test]
    fn operator_configuration_parses_and_rejects_unknown_fields() {
        let dir = std::env::temp_dir().join(format!("appliance-sealing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("proxy.json");
        std::fs::write(&file, r#"{"hosts": {"API.example.com": "10.0.2.2"}, "allowPrivate": ["10.0.2.2/32"]}"#)
            .expect("write");
        let parsed = OperatorEgress::load(Some(&file)).expect("parse");
        let ca = CaPem::generate().expect("ca");
        let config = proxy_config(ca, "/etc/ssl/certs/ca-certificates.crt".into(), parsed).expect("config");
        assert_eq!(config.address_overrides.get("api.example.com"), Some(&"10.0.2.2".parse().expect("ip")));
        assert_eq!(config.allowed_private.len(), 1);
        std::fs::write(&file, r#"{"hostz": {}}"#).expect("write");
        assert!(OperatorEgress::load(Some(&file)).unwrap_err().contains("hostz"));
        assert!(OperatorEgress::load(Some(&dir.join("missing"))).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn publisher_registers_by_cid_and_withdraws_by_sandbox() {
        let registry = Arc::new(SealRegistry::new());
        let publisher = RegistryPublisher::new(Arc::clone(&registry));
        let seal = SandboxSeal {
            sandbox_id: "sb-1".into(),
            cid: 7,
            egress_allowlist: vec!["api.example.com".into()],
            bindings: vec![SealedBinding {
                token: format!("osb_sealed_{}", "ab".repeat(16)),
                secret_name: "K".into(),
                value: Zeroizing::new(b"v".to_vec()),
                allowed_hosts: vec!["api.example.com".into()],
            }],
        };
        publisher.publish(seal).expect("publish");
        assert!(registry.policy(7).is_some());
        publisher.withdraw("sb-1");
        assert!(registry.policy(7).is_none());
        publisher.withdraw("unknown");
    }
}

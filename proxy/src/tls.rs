//! rustls setup shared by both sides: the crypto provider, which upstream roots are
//! trusted and the verified upstream client configuration.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// Default location of the system trust bundle (Debian's `ca-certificates`).
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Which upstream certificates are trusted.
#[derive(Clone, Debug)]
pub struct UpstreamTrust {
    /// PEM bundle of system roots; `None` trusts only the operator bundle.
    pub system_bundle: Option<PathBuf>,
    /// Extra operator roots (PEM), e.g. for internal APIs.
    pub operator_bundle_pem: Option<Vec<u8>>,
}

impl Default for UpstreamTrust {
    fn default() -> Self {
        Self { system_bundle: Some(PathBuf::from(SYSTEM_BUNDLE)), operator_bundle_pem: None }
    }
}

/// ring: builds with only a C compiler (no cmake/nasm), fast AES-GCM and P-256.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads the trusted roots: every parsable certificate of each bundle.
pub fn root_store(trust: &UpstreamTrust) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if let Some(path) = &trust.system_bundle {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read trust bundle {}: {e}", path.display()))?;
        add_pem(&mut roots, &pem).map_err(|e| format!("trust bundle {}: {e}", path.display()))?;
    }
    if let Some(pem) = &trust.operator_bundle_pem {
        add_pem(&mut roots, pem).map_err(|e| format!("operator trust bundle: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no trusted upstream root certificates configured".into());
    }
    Ok(roots)
}

fn add_pem(roots: &mut RootCertStore, pem: &[u8]) -> Result<(), String> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err("no usable certificate".into());
    }
    Ok(())
}

/// Client configuration for upstream connections: verified, HTTP/1.1 only.
pub fn upstream_client_config(trust: &UpstreamTrust) -> Result<Arc<ClientConfig>, String> {
    let roots = root_store(trust)?;
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

//! The appliance CA (ECDSA P-256) and the per-host leaf certificates it signs,
//! cached as ready-to-use TLS server configurations in a bounded LRU.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{RootCertStore, ServerConfig};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::tls::crypto_provider;

const CA_COMMON_NAME: &str = "OpenComputer appliance CA";
const CA_ORGANIZATION: &str = "OpenComputer";
const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Leafs are re-issued well before they expire.
const LEAF_REUSE: Duration = Duration::from_secs(24 * 3600);

/// CA certificate and private key in PEM, as the appliance stores them (the key
/// encrypted at rest). `Debug` never shows the key.
#[derive(Clone)]
pub struct CaPem {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

impl fmt::Debug for CaPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaPem").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

#[derive(Debug)]
pub enum CaError {
    Generate(String),
    BadPem(String),
    /// The certificate and key do not form a CA this proxy can issue under.
    Mismatch(String),
    Tls(String),
}

impl fmt::Display for CaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Generate(m) => write!(f, "certificate generation failed: {m}"),
            Self::BadPem(m) => write!(f, "invalid CA PEM: {m}"),
            Self::Mismatch(m) => write!(f, "CA certificate and key are not usable together: {m}"),
            Self::Tls(m) => write!(f, "TLS configuration failed: {m}"),
        }
    }
}

impl std::error::Error for CaError {}

fn gen_err(e: rcgen::Error) -> CaError {
    CaError::Generate(e.to_string())
}

/// The CA's distinguished name and usages; rebuilt identically on load, because
/// leaf issuer names must match the CA subject byte for byte.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

impl CaPem {
    /// Creates a fresh CA (first boot), valid for ten years.
    pub fn generate() -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = ca_params();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(24 * 3600);
        params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(Self { cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }
}

/// A loaded CA able to issue leaf certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
}

impl CertificateAuthority {
    /// Loads and checks a CA: a probe leaf must verify against the certificate.
    pub fn from_pem(pem: &CaPem) -> Result<Self, CaError> {
        let cert_der = CertificateDer::from_pem_slice(pem.cert_pem.as_bytes())
            .map_err(|e| CaError::BadPem(format!("certificate: {e}")))?;
        // The key PEM is secret: report only the kind of failure.
        let key = KeyPair::from_pem(&pem.key_pem)
            .map_err(|_| CaError::BadPem("private key is not a valid PEM key".into()))?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::BadPem("private key is not ECDSA P-256".into()));
        }
        let ca = Self { issuer: Issuer::new(ca_params(), key), cert_der };
        ca.self_check()?;
        Ok(ca)
    }

    fn self_check(&self) -> Result<(), CaError> {
        let probe = "probe.invalid";
        let (leaf, _) = self.issue_leaf(probe)?;
        let mut roots = RootCertStore::empty();
        roots.add(self.cert_der.clone()).map_err(|e| CaError::Mismatch(e.to_string()))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
            .build()
            .map_err(|e| CaError::Mismatch(e.to_string()))?;
        let name = ServerName::try_from(probe).map_err(|e| CaError::Mismatch(e.to_string()))?;
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .map_err(|e| CaError::Mismatch(e.to_string()))?;
        Ok(())
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues a certificate for `host` (DNS name or IP literal) with a fresh key.
    pub fn issue_leaf(&self, host: &str) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = CertificateParams::new(vec![host.to_string()]).map_err(gen_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + LEAF_LIFETIME;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((cert.der().clone(), key_der))
    }

    fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        let (leaf, key) = self.issue_leaf(host)?;
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![leaf], key)
            .map_err(|e| CaError::Tls(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

struct CacheEntry {
    config: Arc<ServerConfig>,
    created: Instant,
    last_used: u64,
}

/// Host -> TLS server configuration with that host's leaf, bounded LRU.
pub struct LeafCache {
    ca: CertificateAuthority,
    capacity: usize,
    inner: Mutex<(HashMap<String, CacheEntry>, u64)>,
}

impl LeafCache {
    pub fn new(ca: CertificateAuthority, capacity: usize) -> Self {
        Self { ca, capacity: capacity.max(1), inner: Mutex::new((HashMap::new(), 0)) }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the cached configuration for `host`, issuing a leaf on a miss.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        {
            let mut guard = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (map, clock) = &mut *guard;
            *clock += 1;
            if let Some(entry) = map.get_mut(host) {
                if entry.created.elapsed() < LEAF_REUSE {
                    entry.last_used = *clock;
                    return Ok(entry.config.clone());
                }
            }
        }
        // Issue outside the lock; a concurrent miss for the same host just issues twice.
        let config = self.ca.server_config(host)?;
        let mut guard = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (map, clock) = &mut *guard;
        *clock += 1;
        if map.len() >= self.capacity && !map.contains_key(host) {
            // Linear scan: only on a miss, which already paid for a key generation.
            if let Some(oldest) = map.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
        map.insert(host.to_string(), CacheEntry { config: config.clone(), created: Instant::now(), last_used: *clock });
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ca_round_trips_through_pem() {
        let pem = CaPem::generate().unwrap();
        assert!(pem.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{pem:?}").contains(pem.key_pem.as_str()));
        let ca = CertificateAuthority::from_pem(&pem).unwrap();
        let (leaf, _) = ca.issue_leaf("127.0.0.1").unwrap();
        assert!(!leaf.is_empty());
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let a = CaPem::generate().unwrap();
        let b = CaPem::generate().unwrap();
        let mixed = CaPem { cert_pem: a.cert_pem.clone(), key_pem: b.key_pem.clone() };
        assert!(matches!(CertificateAuthority::from_pem(&mixed), Err(CaError::Mismatch(_))));
        let garbage = CaPem { cert_pem: a.cert_pem, key_pem: Zeroizing::new("not a key".into()) };
        let err = CertificateAuthority::from_pem(&garbage).err().unwrap().to_string();
        assert!(!err.contains("not a key"));
    }

    #[test]
    fn leaf_cache_is_bounded_lru() {
        let ca = CertificateAuthority::from_pem(&CaPem::generate().unwrap()).unwrap();
        let cache = LeafCache::new(ca, 2);
        let a1 = cache.server_config("a.test").unwrap();
        cache.server_config("b.test").unwrap();
        assert!(Arc::ptr_eq(&a1, &cache.server_config("a.test").unwrap()));
        cache.server_config("c.test").unwrap(); // evicts b (least recently used)
        assert_eq!(cache.len(), 2);
        assert!(Arc::ptr_eq(&a1, &cache.server_config("a.test").unwrap()));
        let b2 = cache.server_config("b.test").unwrap();
        assert!(Arc::ptr_eq(&b2, &cache.server_config("b.test").unwrap()));
        assert_eq!(cache.len(), 2);
    }
}

//! The API's TLS: either the operator's certificate (from the EFI partition, handed over by
//! init) or one issued by the appliance's own API CA. That CA is generated on first start and
//! kept in the store, its key sealed under the master key like the sandbox CA's (so key rotation
//! re-seals it too). Clients trust the CA, whose fingerprint the console shows; the server
//! certificate it signs is issued afresh at every start for the names and addresses the
//! appliance has then, so a changed address does not ask clients to trust anything new.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;
use serde::Deserialize;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::ca_store;
use crate::crypto::Keyring;
use crate::store::Store;

/// The store's name for the API CA (beside the sandbox CA, `ca_store::APPLIANCE_CA`).
pub const API_CA: &str = "api-ca";
const CA_COMMON_NAME: &str = "OpenComputer appliance API CA";
const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// The server certificate is re-issued at every start; a year outlasts any uptime.
const LEAF_LIFETIME: Duration = Duration::from_secs(397 * 24 * 3600);
/// Size cap for each PEM handed over (a chain of a few certificates is a few KiB).
const MAX_PEM_BYTES: usize = 1 << 20;

/// How the API listens.
#[derive(Clone)]
pub enum TlsChoice {
    /// Plain HTTP: only where the operator turned it on.
    Plain,
    /// The certificate is issued by the appliance's own API CA.
    Generated,
    /// The operator's certificate chain (leaf first) and private key, PEM.
    Operator { cert_pem: String, key_pem: Zeroizing<String> },
}

impl std::fmt::Debug for TlsChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsChoice::Plain => f.write_str("Plain"),
            TlsChoice::Generated => f.write_str("Generated"),
            TlsChoice::Operator { .. } => f.write_str("Operator { .. }"),
        }
    }
}

/// The file init writes when the operator set TLS options in `opencomputer.conf`
/// (`init_handoff::API_TLS_FILE`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Handoff {
    #[serde(default)]
    plain_http: bool,
    cert_pem: Option<String>,
    key_pem: Option<Zeroizing<String>>,
}

impl TlsChoice {
    /// The URL scheme clients reach the API with.
    pub fn scheme(&self) -> &'static str {
        if matches!(self, TlsChoice::Plain) {
            "http"
        } else {
            "https"
        }
    }

    /// The choice in init's handoff file; `Generated` when there is none (the operator set nothing).
    pub fn from_handoff(path: &Path) -> Result<TlsChoice, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => Zeroizing::new(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TlsChoice::Generated),
            Err(e) => return Err(format!("cannot read the TLS settings {}: {e}", path.display())),
        };
        // The text holds a private key: errors name the field, never quote the input.
        let handoff: Handoff = serde_json::from_str(&text).map_err(|e| {
            format!("TLS settings {}: invalid at line {} column {}", path.display(), e.line(), e.column())
        })?;
        match (handoff.plain_http, handoff.cert_pem, handoff.key_pem) {
            (true, _, _) => Ok(TlsChoice::Plain),
            (false, Some(cert_pem), Some(key_pem)) => Ok(TlsChoice::Operator { cert_pem, key_pem }),
            (false, None, None) => Ok(TlsChoice::Generated),
            (false, _, _) => Err(format!("TLS settings {}: certPem and keyPem must be given together", path.display())),
        }
    }

    /// The operator's certificate and key from two PEM files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<TlsChoice, String> {
        let read = |path: &Path| -> Result<Zeroizing<String>, String> {
            let text = Zeroizing::new(
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            );
            if text.len() > MAX_PEM_BYTES {
                return Err(format!("{} is larger than {MAX_PEM_BYTES} bytes; expected a PEM file", path.display()));
            }
            Ok(text)
        };
        let cert_pem = read(cert)?.to_string();
        Ok(TlsChoice::Operator { cert_pem, key_pem: read(key)? })
    }
}

/// A TLS configuration for the API, and what clients are told to trust.
pub struct ApiTls {
    pub server: Arc<ServerConfig>,
    /// The certificate clients should trust (the API CA, or the operator's leaf), PEM.
    pub trust_pem: String,
    /// SHA-256 of `trust_pem`'s certificate, as `AB:CD:...` (the form `openssl x509 -fingerprint` prints).
    pub fingerprint: String,
    /// What the fingerprint is of, for the console.
    pub describes: &'static str,
}

/// Builds the API's TLS configuration for `choice` (None for plain HTTP), generating and
/// storing the API CA on first use.
pub fn prepare(choice: &TlsChoice, store: &Store, keyring: &Keyring) -> Result<Option<ApiTls>, String> {
    match choice {
        TlsChoice::Plain => Ok(None),
        TlsChoice::Operator { cert_pem, key_pem } => operator_tls(cert_pem, key_pem).map(Some),
        TlsChoice::Generated => {
            let (ca_cert_pem, issuer) = load_or_create_ca(store, keyring)?;
            let names = server_names()?;
            let (leaf, key) = issue_server_certificate(&issuer, &names)?;
            let ca_der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())
                .map_err(|e| format!("the stored API CA certificate is not PEM: {e}"))?;
            let fingerprint = fingerprint(&ca_der);
            let server = server_config(vec![leaf, ca_der], key)?;
            Ok(Some(ApiTls { server, trust_pem: ca_cert_pem, fingerprint, describes: "API CA" }))
        }
    }
}

fn operator_tls(cert_pem: &str, key_pem: &str) -> Result<ApiTls, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the operator's TLS certificate file is not valid PEM: {e}"))?;
    let leaf = chain.first().ok_or("the operator's TLS certificate file holds no certificate")?.clone();
    // The key is secret: report only the kind of failure.
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| "the operator's TLS key file holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_string())?;
    let server = server_config(chain, key)?;
    let trust_pem = first_pem_block(cert_pem).ok_or("the operator's TLS certificate file holds no certificate")?;
    Ok(ApiTls { server, trust_pem, fingerprint: fingerprint(&leaf), describes: "API certificate" })
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, String> {
    let mut config = ServerConfig::builder_with_provider(proxy::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("the TLS certificate and key do not form a usable pair: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The CA's name and usages; rebuilt identically on load, because the issued certificate's
/// issuer name must match the CA's subject byte for byte.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "OpenComputer");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

fn load_or_create_ca(store: &Store, keyring: &Keyring) -> Result<(String, Issuer<'static, KeyPair>), String> {
    if let Some((cert_pem, key)) = ca_store::load(store, keyring, API_CA).map_err(|e| e.message)? {
        let key_pem = std::str::from_utf8(&key).map_err(|_| "the stored API CA key is not PEM text".to_string())?;
        let key = KeyPair::from_pem(key_pem).map_err(|_| "the stored API CA key is not a valid key".to_string())?;
        return Ok((cert_pem, Issuer::new(ca_params(), key)));
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| format!("cannot generate the API CA: {e}"))?;
    let mut params = ca_params();
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(24 * 3600);
    params.not_after = now + CA_LIFETIME;
    let cert = params.self_signed(&key).map_err(|e| format!("cannot generate the API CA: {e}"))?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    ca_store::save(store, keyring, API_CA, &cert.pem(), key_pem.as_bytes()).map_err(|e| e.message)?;
    println!("appliance: generated the API CA (ECDSA P-256); its key is stored encrypted");
    Ok((cert.pem(), Issuer::new(ca_params(), key)))
}

/// What the server certificate names: loopback, the host name, and every address the
/// appliance has now.
fn server_names() -> Result<Vec<SanType>, String> {
    let localhost = "localhost".try_into().map_err(|e| format!("certificate name localhost: {e}"))?;
    let mut names = vec![SanType::DnsName(localhost)];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() && host != "localhost" {
            if let Ok(name) = host.to_ascii_lowercase().try_into() {
                names.push(SanType::DnsName(name));
            }
        }
    }
    let mut addresses: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from(std::net::Ipv6Addr::LOCALHOST)];
    for ip in proxy::egress::own_addresses() {
        // Link-local IPv6 addresses need a zone to be dialled; no client names them in a URL.
        let link_local_v6 = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if !addresses.contains(&ip) && !link_local_v6 {
            addresses.push(ip);
        }
    }
    names.extend(addresses.into_iter().map(SanType::IpAddress));
    Ok(names)
}

fn issue_server_certificate(
    issuer: &Issuer<'static, KeyPair>,
    names: &[SanType],
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("cannot generate the API certificate's key: {e}"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "OpenComputer appliance API");
    params.distinguished_name = dn;
    params.subject_alt_names = names.to_vec();
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + LEAF_LIFETIME;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer).map_err(|e| format!("cannot issue the API certificate: {e}"))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))))
}

/// SHA-256 of a DER certificate as colon-separated upper-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The first certificate block of a PEM text, as written.
fn first_pem_block(pem: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find(BEGIN)?;
    let end = start + pem[start..].find(END)? + END.len();
    Some(format!("{}\n", &pem[start..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_certificate_block_is_taken_whole() {
        let pem = "junk\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            first_pem_block(pem).as_deref(),
            Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        );
        assert_eq!(first_pem_block("-----BEGIN CERTIFICATE-----\nAAAA\n"), None);
    }

    fn handoff(dir: &Path, text: &str) -> Result<TlsChoice, String> {
        let path = dir.join("api-tls.json");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        TlsChoice::from_handoff(&path)
    }

    #[test]
    fn init_handoff_file_chooses_how_the_api_listens() {
        let dir = std::env::temp_dir().join(format!("oc-api-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert!(matches!(TlsChoice::from_handoff(&dir.join("absent.json")), Ok(TlsChoice::Generated)));
        assert!(matches!(handoff(&dir, r#"{"plainHttp": true}"#), Ok(TlsChoice::Plain)));
        assert!(matches!(handoff(&dir, r#"{"plainHttp": false}"#), Ok(TlsChoice::Generated)));
        let operator = handoff(&dir, r#"{"plainHttp": false, "certPem": "C", "keyPem": "K"}"#);
        assert!(
            matches!(operator, Ok(TlsChoice::Operator { ref cert_pem, ref key_pem }) if cert_pem == "C" && key_pem.as_str() == "K")
        );
        let half = handoff(&dir, r#"{"certPem": "C"}"#).err().unwrap_or_default();
        assert!(half.contains("must be given together"), "{half}");
        // A broken file names where, never what (it may hold a private key).
        let broken = handoff(&dir, r#"{"keyPem": "SECRET-KEY-TEXT"#).err().unwrap_or_default();
        assert!(broken.contains("invalid at line 1") && !broken.contains("SECRET"), "{broken}");
        let unknown = handoff(&dir, r#"{"keyPEM": "x"}"#).err().unwrap_or_default();
        assert!(unknown.contains("invalid"), "{unknown}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fingerprint_is_colon_hex_of_sha256() {
        // SHA-256("abc").
        assert_eq!(
            fingerprint(b"abc"),
            "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
        );
    }
}

//! Trusting the appliance API's certificate the way an operator does: the console prints the
//! SHA-256 fingerprint of the CA it generated; the client takes the certificate chain the API
//! presents (without trusting it yet), keeps the CA only if its fingerprint is the printed one,
//! and from then on verifies the API normally against that CA alone.

use crate::err;
use crate::error::{Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the appliance prints before the fingerprint (appliance/src/serve.rs).
pub const CONSOLE_MARKER: &str = "API TLS: API CA SHA-256 fingerprint ";

/// The fingerprint on the console's last such line.
pub fn fingerprint_on_console(console: &str) -> Option<String> {
    let line = console.lines().rev().find(|l| l.contains(CONSOLE_MARKER))?;
    let after = &line[line.find(CONSOLE_MARKER)? + CONSOLE_MARKER.len()..];
    let fingerprint: String = after.chars().take_while(|c| c.is_ascii_hexdigit() || *c == ':').collect();
    (fingerprint.len() == 32 * 3 - 1).then_some(fingerprint)
}

/// SHA-256 of DER bytes as `AB:CD:...`.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// Connects to the API on loopback `port`, finds the CA whose fingerprint is `expected` in the
/// chain it presents, writes that CA to `save_to` (PEM) and returns a client configuration
/// trusting only it.
pub fn trust_by_fingerprint(port: u16, expected: &str, save_to: &Path) -> Result<Arc<ClientConfig>> {
    let chain = presented_chain(port)?;
    let ca = chain.iter().find(|c| fingerprint(c.as_ref()) == expected).ok_or_else(|| {
        err!("the API on port {port} presents no certificate with the printed fingerprint {expected}")
    })?;
    std::fs::write(save_to, pem(ca.as_ref())).ctx(|| format!("write {}", save_to.display()))?;
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| err!("the API CA is not usable as a trust anchor: {e}"))?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts the server's certificate unverified and keeps its chain: only used to learn the
/// chain, which is then checked against the printed fingerprint.
#[derive(Debug)]
struct RecordChain {
    chain: Mutex<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for RecordChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = chain;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The certificate chain the API on loopback `port` presents, unverified (leaf first).
pub fn presented_chain(port: u16) -> Result<Vec<CertificateDer<'static>>> {
    let recorder = Arc::new(RecordChain { chain: Mutex::new(Vec::new()), provider: provider() });
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err!("TLS configuration: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").map_err(|e| err!("server name: {e}"))?;
    let mut conn = ClientConnection::new(Arc::new(config), name).map_err(|e| err!("TLS client: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).ctx(|| format!("connect to {addr}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).ctx(|| "set read timeout".into())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).ctx(|| format!("TLS handshake with {addr}"))?;
    }
    let chain = recorder.chain.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    Ok(chain)
}

fn pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_printed_fingerprint_is_found() {
        let a = ["AA"; 32].join(":");
        let b = ["0B"; 32].join(":");
        let console =
            format!("[ 1.0] appliance: {CONSOLE_MARKER}{a}\r\nnoise\r\n[ 9.0] appliance: {CONSOLE_MARKER}{b}\r\n");
        assert_eq!(fingerprint_on_console(&console), Some(b));
        assert_eq!(fingerprint_on_console("appliance: API TLS: API CA SHA-256 fingerprint AB:CD\n"), None);
        assert_eq!(fingerprint_on_console("nothing here"), None);
    }

    #[test]
    fn pem_wraps_base64_of_the_der() {
        assert_eq!(pem(b"foobar"), "-----BEGIN CERTIFICATE-----\nZm9vYmFy\n-----END CERTIFICATE-----\n");
    }

    #[test]
    fn fingerprint_is_sha256_in_colon_hex() {
        assert!(fingerprint(b"abc").starts_with("BA:78:16:BF"));
    }
}

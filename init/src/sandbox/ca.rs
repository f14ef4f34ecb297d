//! Trusting the appliance CA inside the sandbox: the CA certificate goes where Debian's
//! `update-ca-certificates` looks for local CAs, and a combined bundle (system roots plus the
//! appliance CA) is built at a fixed path that the usual TLS environment variables point at.

use super::error::OpError;
use super::files;
use std::path::PathBuf;

/// Variables that make common TLS stacks (OpenSSL, Python requests, Node, curl, git) use the bundle.
pub const TRUST_VARIABLES: [&str; 5] =
    ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO"];

const MAX_PEM: usize = 256 * 1024;
const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

#[derive(Debug, Clone)]
pub struct CaPaths {
    /// The appliance CA alone.
    pub cert: PathBuf,
    /// The distribution's bundle of public roots (read, never modified).
    pub system_bundle: PathBuf,
    /// System roots plus the appliance CA.
    pub bundle: PathBuf,
}

impl CaPaths {
    /// The locations in a Debian-based sandbox.
    pub fn debian() -> CaPaths {
        CaPaths {
            cert: "/usr/local/share/ca-certificates/opencomputer.crt".into(),
            system_bundle: "/etc/ssl/certs/ca-certificates.crt".into(),
            bundle: "/etc/ssl/opencomputer/ca-bundle.crt".into(),
        }
    }
}

/// Installs `pem`; returns the variables to set for later commands.
pub fn install(pem: &[u8], paths: &CaPaths) -> Result<Vec<(String, String)>, OpError> {
    let pem = validate(pem)?;
    files::write_all_atomic(&paths.cert, pem.as_bytes(), 0o644)?;
    let mut bundle = match std::fs::read_to_string(&paths.system_bundle) {
        Ok(roots) => roots,
        // A template without ca-certificates still gets a bundle with the appliance CA alone.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(OpError::io(paths.system_bundle.display(), &e)),
    };
    if !bundle.is_empty() && !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(&pem);
    files::write_all_atomic(&paths.bundle, bundle.as_bytes(), 0o644)?;
    let path = paths.bundle.to_string_lossy().into_owned();
    Ok(TRUST_VARIABLES.iter().map(|name| (name.to_string(), path.clone())).collect())
}

/// Accepts one or more PEM certificates and nothing else (in particular no private key);
/// returns the text with a final newline.
fn validate(pem: &[u8]) -> Result<String, OpError> {
    if pem.len() > MAX_PEM {
        return Err(OpError::bad_request(format!("CA PEM larger than {MAX_PEM} bytes")));
    }
    let text = std::str::from_utf8(pem).map_err(|_| OpError::bad_request("CA PEM is not text"))?;
    let mut certificates = 0;
    let mut inside = false;
    for line in text.lines().map(str::trim_end) {
        match line {
            BEGIN if !inside => inside = true,
            END if inside => {
                inside = false;
                certificates += 1;
            }
            _ if line.starts_with("-----") => {
                return Err(OpError::bad_request(format!(
                    "unexpected PEM line {line:?}: only certificates are accepted"
                )))
            }
            _ if inside && !line.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=') => {
                return Err(OpError::bad_request("CA PEM contains a line that is not base64"));
            }
            _ => {}
        }
    }
    if inside || certificates == 0 {
        return Err(OpError::bad_request("CA PEM contains no complete certificate"));
    }
    let mut text = text.to_string();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\nAbC+/=\n-----END CERTIFICATE-----";

    #[test]
    fn certificates_pass_and_get_a_final_newline() {
        assert_eq!(validate(CERT.as_bytes()).unwrap(), format!("{CERT}\n"));
        let two = format!("{CERT}\n{CERT}\n");
        assert_eq!(validate(two.as_bytes()).unwrap(), two);
    }

    #[test]
    fn keys_garbage_and_incomplete_blocks_are_refused() {
        let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(validate(key.as_bytes()).is_err());
        assert!(validate(format!("{CERT}\n{key}").as_bytes()).is_err());
        assert!(validate(b"hello").is_err());
        assert!(validate(b"-----BEGIN CERTIFICATE-----\nAAAA\n").is_err());
        assert!(validate(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").is_err());
        assert!(validate(&[0xff, 0xfe]).is_err());
    }
}

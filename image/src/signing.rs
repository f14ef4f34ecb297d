//! The key that signs disk images (Ed25519), and the signature statement written beside each
//! (`boot_disk::signature`). The image trusts the public key of the key that built it, so an
//! appliance installs upgrades signed the same way and nothing else.
//!
//! The key is the PKCS#8 PEM file named by `OC_SIGNING_KEY` (`openssl genpkey -algorithm
//! ed25519` makes one). Without it, a development key is generated once in the state directory
//! (`$OC_STATE_DIR/signing-key.pem`, 0600) and used from then on; the build always says which
//! key it used.

use crate::err;
use crate::error::{Context, Result};
use boot_disk::signature::{self, Statement};
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::path::{Path, PathBuf};

pub const KEY_ENV: &str = "OC_SIGNING_KEY";
/// Where the image ships the public keys it trusts (hex, one per line), read by the appliance.
pub const TRUSTED_KEYS_PATH: &str = "/etc/opencomputer/upgrade-keys";

pub struct SigningKey {
    pair: Ed25519KeyPair,
    /// Where it came from, for the build's log.
    pub source: PathBuf,
}

impl SigningKey {
    /// `OC_SIGNING_KEY`'s key, or the development key (generated on first use).
    pub fn load() -> Result<SigningKey> {
        if let Some(path) = std::env::var_os(KEY_ENV).filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            return Self::from_file(&path).map_err(|e| err!("{KEY_ENV}={}: {e}", path.display()));
        }
        let path = crate::run::state_dir().join("signing-key.pem");
        if !path.exists() {
            match generate(&path) {
                Ok(()) => eprintln!(
                    "[image] generated a development signing key at {} (set {KEY_ENV} to sign with your release key)",
                    path.display()
                ),
                // Another build made it at the same moment: use that one.
                Err(_) if path.exists() => {}
                Err(e) => return Err(e),
            }
        }
        Self::from_file(&path).map_err(|e| err!("{}: {e}", path.display()))
    }

    pub fn from_file(path: &Path) -> Result<SigningKey> {
        let text = std::fs::read_to_string(path).ctx(|| format!("read {}", path.display()))?;
        let pem = pem::parse(text.as_bytes()).map_err(|_| err!("not a PEM file"))?;
        if pem.tag() != "PRIVATE KEY" {
            return Err(err!("holds a {} block, expected PRIVATE KEY (Ed25519, PKCS#8)", pem.tag()));
        }
        // openssl writes PKCS#8 v1 (no public key inside); ring's own keys are v2.
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pem.contents())
            .map_err(|_| err!("not an Ed25519 private key in PKCS#8"))?;
        Ok(SigningKey { pair, source: path.to_path_buf() })
    }

    /// The public key, lowercase hex (what an appliance lists as trusted).
    pub fn public_hex(&self) -> String {
        signature::hex(self.pair.public_key().as_ref())
    }

    /// Signs `statement` (whose key must be this one) and returns the whole line.
    pub fn sign(&self, statement: &Statement) -> String {
        statement.render(self.pair.sign(statement.signed_text().as_bytes()).as_ref())
    }

    /// Writes `<image>.sig` for a built image; returns its path.
    pub fn sign_image(&self, image: &Path, image_sha256: &str, manifest: &Path, version: &str) -> Result<PathBuf> {
        let statement = Statement {
            image_sha256: image_sha256.to_string(),
            manifest_sha256: crate::disk_image::sha256_file(manifest)?,
            version: version.to_string(),
            key: self.public_hex(),
        };
        let path = signature_path(image);
        std::fs::write(&path, self.sign(&statement) + "\n").ctx(|| format!("write {}", path.display()))?;
        Ok(path)
    }
}

/// Where the build puts an image's signature statement.
pub fn signature_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(signature::FILE_SUFFIX);
    PathBuf::from(name)
}

/// A new Ed25519 key in PKCS#8 PEM at `path` (0600).
pub fn generate(path: &Path) -> Result<()> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| err!("cannot generate an Ed25519 key"))?;
    let text = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
    }
    crate::run::create_private_file(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_signs_statements_that_verify_with_its_public_key() {
        let dir = std::env::temp_dir().join(format!("oc-signing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("key.pem");
        generate(&path).expect("generate");
        assert!(generate(&path).is_err(), "an existing key is never overwritten");
        let key = SigningKey::from_file(&path).expect("load");
        let statement = Statement {
            image_sha256: "ab".repeat(32),
            manifest_sha256: "cd".repeat(32),
            version: "1".into(),
            key: key.public_hex(),
        };
        let line = key.sign(&statement);
        let (parsed, sig) = Statement::parse(&line).expect("parse");
        let public = signature::unhex(&parsed.key).expect("hex");
        let verifier = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public);
        assert!(verifier.verify(parsed.signed_text().as_bytes(), &sig).is_ok());
        std::fs::write(dir.join("not-a-key.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .expect("write");
        let e = SigningKey::from_file(&dir.join("not-a-key.pem")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("expected PRIVATE KEY"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Which upgrade images may be installed: those whose signature statement
//! (`boot_disk::signature`, sent in its header) verifies with an Ed25519 key this appliance
//! trusts, and whose uploaded bytes have the digest the statement names. The trusted keys are
//! the ones the image shipped plus any the operator added in `opencomputer.conf`.

use std::path::Path;

use boot_disk::signature::{unhex, Statement, HEADER};
use ring::signature::{UnparsedPublicKey, ED25519};

use crate::error::AppError;

/// Ed25519 public keys (32 bytes each) trusted to sign upgrade images.
#[derive(Debug, Default, Clone)]
pub struct TrustedKeys {
    keys: Vec<[u8; 32]>,
}

impl TrustedKeys {
    /// Reads hex keys, one per line (`#` comments), from each file that exists.
    pub fn load(files: &[&Path]) -> Result<TrustedKeys, String> {
        let mut trusted = TrustedKeys::default();
        for path in files {
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("cannot read upgrade keys {}: {e}", path.display())),
            };
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let key = unhex(line).and_then(|bytes| <[u8; 32]>::try_from(bytes).ok()).ok_or_else(|| {
                    format!("{} line {}: not a 64-hex-digit Ed25519 public key", path.display(), n + 1)
                })?;
                if !trusted.keys.contains(&key) {
                    trusted.keys.push(key);
                }
            }
        }
        Ok(trusted)
    }

    pub fn from_keys(keys: Vec<[u8; 32]>) -> TrustedKeys {
        TrustedKeys { keys }
    }

    /// The first 16 hex digits of each key, for the console.
    pub fn describe(&self) -> String {
        self.keys.iter().map(|k| short(&boot_disk::signature::hex(k))).collect::<Vec<_>>().join(", ")
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks the statement sent with an upload before any of the image is read: present,
    /// well formed, by a trusted key, and its signature verifies. Returns the statement, whose
    /// digest the received bytes must then match (`check_digest`).
    pub fn verify(&self, header: Option<&str>) -> Result<Statement, AppError> {
        // Missing input is the request's fault (400); an untrusted or false signature is a
        // refusal (403).
        let Some(line) = header else {
            return Err(AppError::bad_request(format!(
                "the upload is unsigned: send the image's signature (the .sig file its build wrote beside it) in the {HEADER} header"
            )));
        };
        let (statement, signature) = Statement::parse(line.trim())
            .map_err(|e| AppError::bad_request(format!("invalid {HEADER} header: {e}")))?;
        let key = unhex(&statement.key).and_then(|k| <[u8; 32]>::try_from(k).ok());
        let Some(key) = key.filter(|k| self.keys.contains(k)) else {
            return Err(AppError::forbidden(format!(
                "the image is signed by key {}, which this appliance does not trust (it trusts: {})",
                short(&statement.key),
                if self.keys.is_empty() { "no key".to_string() } else { self.describe() }
            )));
        };
        UnparsedPublicKey::new(&ED25519, key).verify(statement.signed_text().as_bytes(), &signature).map_err(|_| {
            AppError::forbidden(format!("the signature does not verify with key {}", short(&statement.key)))
        })?;
        Ok(statement)
    }
}

/// The uploaded image must be the signed one.
pub fn check_digest(statement: &Statement, received_sha256: &str) -> Result<(), AppError> {
    if statement.image_sha256 == received_sha256 {
        return Ok(());
    }
    Err(AppError::bad_request(format!(
        "the uploaded image's SHA-256 is {received_sha256}, but its signature is for {}: the image was modified or is not the signed one",
        statement.image_sha256
    )))
}

fn short(hex: &str) -> String {
    hex.get(..16).unwrap_or(hex).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn keypair() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("generate");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("load")
    }

    fn signed(pair: &Ed25519KeyPair, image_sha256: &str) -> String {
        let statement = Statement {
            image_sha256: image_sha256.into(),
            manifest_sha256: "cd".repeat(32),
            version: "2".into(),
            key: boot_disk::signature::hex(pair.public_key().as_ref()),
        };
        statement.render(pair.sign(statement.signed_text().as_bytes()).as_ref())
    }

    fn public(pair: &Ed25519KeyPair) -> [u8; 32] {
        pair.public_key().as_ref().try_into().expect("32 bytes")
    }

    #[test]
    fn unsigned_wrong_key_forged_modified_and_valid() {
        let (ours, theirs) = (keypair(), keypair());
        let trusted = TrustedKeys::from_keys(vec![public(&ours)]);
        let digest = "ab".repeat(32);

        let unsigned = trusted.verify(None).expect_err("unsigned");
        assert_eq!(unsigned.status, 400);
        assert!(unsigned.message.contains("unsigned"), "{}", unsigned.message);

        let wrong_key = trusted.verify(Some(&signed(&theirs, &digest))).expect_err("wrong key");
        assert_eq!(wrong_key.status, 403);
        assert!(wrong_key.message.contains("does not trust"), "{}", wrong_key.message);

        // Our key named, but the statement changed after signing (another digest).
        let forged = signed(&ours, &digest).replace(&digest, &"ef".repeat(32));
        let forged = trusted.verify(Some(&forged)).expect_err("forged");
        assert_eq!(forged.status, 403);
        assert!(forged.message.contains("does not verify"), "{}", forged.message);

        let garbled = trusted.verify(Some("oc-image-signature-v1 nonsense")).expect_err("garbled");
        assert_eq!(garbled.status, 400);

        let valid = trusted.verify(Some(&signed(&ours, &digest))).expect("valid");
        assert!(check_digest(&valid, &digest).is_ok());
        let modified = check_digest(&valid, &"00".repeat(32)).expect_err("modified image");
        assert_eq!(modified.status, 400);
        assert!(modified.message.contains("modified"), "{}", modified.message);
    }

    #[test]
    fn keys_load_from_files_and_bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("oc-upgrade-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, format!("# shipped\n{}\n\n", "11".repeat(32))).expect("write");
        std::fs::write(&b, format!("{}\n{}\n", "22".repeat(32), "11".repeat(32))).expect("write");
        let keys = TrustedKeys::load(&[&a, &b, &dir.join("absent")]).expect("load");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.describe(), format!("{}, {}", "11".repeat(8), "22".repeat(8)));
        std::fs::write(&b, "1234\n").expect("write");
        let e = TrustedKeys::load(&[&b]).expect_err("bad line");
        assert!(e.contains("line 1") && e.contains("64-hex-digit"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

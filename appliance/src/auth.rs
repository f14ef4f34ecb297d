//! API authentication: the admin key is read from a file the operator provides
//! (QEMU fw_cfg by default), only its hash is stored, and every route but healthz
//! requires a matching `X-API-Key`.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use zeroize::Zeroizing;

use crate::clock::now_unix;
use crate::crypto::{constant_time_eq, hash_api_key, hex};
use crate::error::AppError;
use crate::store::records::ApiKeyRecord;
use crate::store::Store;

const ADMIN_KEY_ID: &str = "admin";
/// Shorter keys get a warning: the stored hash is only as strong as the key.
pub const MIN_KEY_LEN: usize = 16;

pub struct Auth {
    admin_hash: Option<[u8; 32]>,
}

impl Auth {
    pub fn check(&self, presented: Option<&str>) -> Result<(), AppError> {
        let Some(expected) = &self.admin_hash else {
            return Err(AppError::unauthorized(
                "no admin API key is configured on this appliance; see the operator guide (admin-key fw_cfg entry)",
            ));
        };
        let Some(presented) = presented else {
            return Err(AppError::unauthorized("missing X-API-Key header"));
        };
        let hash = hash_api_key(presented.trim().as_bytes()).map_err(|e| AppError::internal(e.to_string()))?;
        if constant_time_eq(&hash, expected) {
            Ok(())
        } else {
            Err(AppError::unauthorized("invalid API key"))
        }
    }

    pub fn is_configured(&self) -> bool {
        self.admin_hash.is_some()
    }
}

/// Reads the admin key file if it exists and stores its hash (replacing an older
/// admin key); otherwise keeps the stored hash. Logs what it did, never the key.
pub fn configure_admin_key(store: &Store, key_file: Option<&Path>) -> Result<Auth, String> {
    let from_file = match key_file {
        Some(path) => read_key_file(path)?,
        None => None,
    };
    if let Some(key) = from_file {
        let hash = hash_api_key(key.as_bytes()).map_err(|e| e.to_string())?;
        let record = ApiKeyRecord { hash_hex: hex(&hash), created_at: now_unix() };
        let changed = store
            .write(move |wtxn, dbs| {
                let old = dbs.api_keys.get(wtxn, ADMIN_KEY_ID)?;
                if old.as_ref().map(|r| r.hash_hex.as_str()) == Some(record.hash_hex.as_str()) {
                    return Ok(false);
                }
                dbs.api_keys.put(wtxn, ADMIN_KEY_ID, &record)?;
                Ok(true)
            })
            .map_err(|e| e.message)?;
        let path = key_file.map(|p| p.display().to_string()).unwrap_or_default();
        if changed {
            println!("appliance: admin API key loaded from {path} and its hash stored");
        } else {
            println!("appliance: admin API key from {path} matches the stored hash");
        }
        return Ok(Auth { admin_hash: Some(hash) });
    }
    let stored = store.read(|rtxn, dbs| Ok(dbs.api_keys.get(rtxn, ADMIN_KEY_ID)?)).map_err(|e| e.message)?;
    if let Some(hash) = stored.and_then(|r| parse_hash(&r.hash_hex)) {
        println!("appliance: using the stored admin API key hash (no key file given)");
        Ok(Auth { admin_hash: Some(hash) })
    } else {
        println!(
            "appliance: no admin API key configured: every API call will answer 401. Set one by booting with \
             QEMU -fw_cfg name=opt/opencomputer/admin-key,string=<key of at least {MIN_KEY_LEN} characters> \
             (or pass --admin-key-file <file>), then restart the appliance"
        );
        Ok(Auth { admin_hash: None })
    }
}

fn read_key_file(path: &Path) -> Result<Option<Zeroizing<String>>, String> {
    let raw = match fs::read(path) {
        Ok(raw) => Zeroizing::new(raw),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read admin key file {}: {e}", path.display())),
    };
    let text = std::str::from_utf8(&raw).map_err(|_| format!("admin key file {} is not UTF-8", path.display()))?;
    let key = text.trim();
    if key.is_empty() {
        println!("appliance: admin key file {} is empty; ignoring it", path.display());
        return Ok(None);
    }
    if key.len() < MIN_KEY_LEN {
        // Accepted (refusing would leave the appliance unreachable), but said plainly.
        println!(
            "appliance: warning: the admin key in {} is shorter than {MIN_KEY_LEN} characters; use a long random key",
            path.display()
        );
    }
    Ok(Some(Zeroizing::new(key.to_string())))
}

fn parse_hash(hex_text: &str) -> Option<[u8; 32]> {
    if hex_text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex_text.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_distinguishes_missing_wrong_and_right_keys() {
        let auth = Auth { admin_hash: Some(hash_api_key(b"correct-horse-battery").expect("hash")) };
        assert!(auth.check(Some("correct-horse-battery")).is_ok());
        assert_eq!(auth.check(Some("wrong-key-wrong-key")).unwrap_err().status, 401);
        assert_eq!(auth.check(None).unwrap_err().message, "missing X-API-Key header");
        let none = Auth { admin_hash: None };
        assert_eq!(none.check(Some("anything")).unwrap_err().status, 401);
    }

    #[test]
    fn parses_stored_hash_hex() {
        let h = hash_api_key(b"k").expect("hash");
        assert_eq!(parse_hash(&hex(&h)), Some(h));
        assert_eq!(parse_hash("zz"), None);
    }
}

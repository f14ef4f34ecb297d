//! API authentication: the admin (operator) key is read from a file the operator provides
//! (QEMU fw_cfg by default), project keys are made through the API (`api::keys`); only
//! hashes of either are stored, and every route but healthz requires a matching
//! `X-API-Key`. What each kind of key may do is `api::scope`'s business.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use zeroize::Zeroizing;

use crate::clock::now_unix;
use crate::crypto::{constant_time_eq, hash_api_key, hex};
use crate::error::AppError;
use crate::store::records::{ApiKeyRecord, ProjectKeyRecord};
use crate::store::Store;

const ADMIN_KEY_ID: &str = "admin";
/// Shorter keys get a warning: the stored hash is only as strong as the key.
pub const MIN_KEY_LEN: usize = 16;

pub struct Auth {
    admin_hash: Option<[u8; 32]>,
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin key: every route.
    Operator,
    /// A project key: the sandboxes and secrets of its projects.
    Project(ProjectKeyRecord),
    /// No key: a signed file URL (`url_signing`), checked already. It grants its one operation
    /// on its one sandbox (`api::scope` refuses it everything else).
    SignedUrl(SignedGrant),
}

/// What a verified signed URL grants: one transfer on one sandbox (the path is in the query the
/// signature was checked against, and the file routes read it from there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedGrant {
    /// Canonical (validated) sandbox id.
    pub sandbox_id: String,
    pub transfer: crate::url_signing::Transfer,
}

/// How the audit trail names a request authorised by a signed URL (never the signature).
pub const SIGNED_URL_KEY_ID: &str = "signed-url";

impl Caller {
    /// The key's id as the audit trail and logs name it (never the key).
    pub fn key_id(&self) -> &str {
        match self {
            Self::Operator => ADMIN_KEY_ID,
            Self::Project(key) => &key.id,
            Self::SignedUrl(_) => SIGNED_URL_KEY_ID,
        }
    }
}

impl Auth {
    /// Finds the key presented: the admin key, or a project key in the store. A revoked key
    /// is gone from the store, so it fails from the next request on.
    pub fn identify(&self, store: &Store, presented: Option<&str>) -> Result<Caller, AppError> {
        let Some(presented) = presented else {
            return Err(AppError::unauthorized("missing X-API-Key header"));
        };
        let hash = hash_api_key(presented.trim().as_bytes()).map_err(|e| AppError::internal(e.to_string()))?;
        if self.admin_hash.as_ref().is_some_and(|expected| constant_time_eq(&hash, expected)) {
            return Ok(Caller::Operator);
        }
        // Looked up by the key's hash: a timing difference could only tell an attacker about
        // hashes, which say nothing about keys.
        let hash_hex = hex(&hash);
        match store.read(move |rtxn, dbs| Ok(dbs.project_keys.get(rtxn, &hash_hex)?))? {
            Some(key) => Ok(Caller::Project(key)),
            None if self.admin_hash.is_none() => Err(AppError::unauthorized(
                "no admin API key is configured on this appliance; see the operator guide (admin-key fw_cfg entry)",
            )),
            None => Err(AppError::unauthorized("invalid API key")),
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
    fn identify_tells_the_operator_a_project_key_and_bad_keys_apart() {
        let dir = std::env::temp_dir().join(format!("oc-auth-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::open(&dir).expect("store");
        let key =
            ProjectKeyRecord { id: "k1".into(), name: "ci".into(), project_ids: vec!["p1".into()], created_at: 1 };
        let (hash, record) = (hex(&hash_api_key(b"project-key-0123456789").expect("hash")), key.clone());
        store.write(move |wtxn, dbs| Ok(dbs.project_keys.put(wtxn, &hash, &record)?)).expect("put");

        let auth = Auth { admin_hash: Some(hash_api_key(b"correct-horse-battery").expect("hash")) };
        assert_eq!(auth.identify(&store, Some("correct-horse-battery")).expect("admin"), Caller::Operator);
        assert_eq!(auth.identify(&store, Some(" project-key-0123456789\n")).expect("project"), Caller::Project(key));
        assert_eq!(auth.identify(&store, Some("wrong-key-wrong-key")).unwrap_err().message, "invalid API key");
        assert_eq!(auth.identify(&store, None).unwrap_err().message, "missing X-API-Key header");
        let none = Auth { admin_hash: None };
        assert_eq!(none.identify(&store, Some("anything")).unwrap_err().status, 401);
        store.close();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_stored_hash_hex() {
        let h = hash_api_key(b"k").expect("hash");
        assert_eq!(parse_hash(&hex(&h)), Some(h));
        assert_eq!(parse_hash("zz"), None);
    }
}

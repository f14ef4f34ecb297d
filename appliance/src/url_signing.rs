//! Signed, expiring file URLs (`POST .../files/download-url` and `.../upload-url`): what is
//! signed, the key it is signed with, and the check of a signed request.
//!
//! A URL grants one operation (`GET .../files/download` or `PUT .../files/upload`) on one path of
//! one sandbox until its expiry, without an API key. Its signature is HMAC-SHA256 over
//! `canonical` (method, sandbox id, expiry, path), hex. The key is 32 random bytes made on first
//! use, kept in the store sealed under the master key like the CA key (`url_keys`, re-sealed by a
//! master-key rotation in `master_key::reseal`), so URLs signed before a restart or a rotation
//! still verify. The key, a signature and a signed URL's query are never logged or returned
//! (the URL itself goes only to the caller who asked for it).

use std::sync::Arc;

use ring::hmac;
use zeroize::Zeroizing;

use crate::crypto::{hex, random_bytes};
use crate::error::AppError;
use crate::master_key::live::LiveKeyring;
use crate::store::records::url_key_associated_data;
use crate::store::Store;

/// The one URL-signing key today, by its name in `url_keys`.
pub const FILE_URL_KEY: &str = "file-urls";
const KEY_LEN: usize = 32;
/// Domain separation: the MAC of a signed URL is never the MAC of anything else.
const DOMAIN: &str = "opencomputer-appliance/signed-file-url/v1";

/// The operation a signed URL grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// `GET /api/sandboxes/{id}/files/download`
    Download,
    /// `PUT /api/sandboxes/{id}/files/upload`
    Upload,
}

impl Transfer {
    /// The HTTP method the URL may be used with.
    pub fn method(self) -> &'static str {
        match self {
            Self::Download => "GET",
            Self::Upload => "PUT",
        }
    }

    /// The last segment of the URL's path.
    pub fn endpoint(self) -> &'static str {
        match self {
            Self::Download => "download",
            Self::Upload => "upload",
        }
    }
}

/// What is signed: the method, the sandbox id (canonical UUID), the expiry (unix seconds) and the
/// path, one per line, the path last: every field before it is of a fixed form without a newline,
/// so no two different grants have the same canonical bytes, whatever the path holds.
pub fn canonical(transfer: Transfer, sandbox_id: &str, expires: i64, path: &str) -> Vec<u8> {
    format!("{DOMAIN}\n{}\n{sandbox_id}\n{expires}\n{path}", transfer.method()).into_bytes()
}

fn sealed_error(e: crate::crypto::CryptoError) -> AppError {
    AppError::internal(format!("URL-signing key: {e}"))
}

fn open(keyring: &LiveKeyring, blob: &[u8]) -> Result<hmac::Key, AppError> {
    let plain = keyring.open(blob, &url_key_associated_data(FILE_URL_KEY)).map_err(sealed_error)?;
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &plain))
}

/// The URL-signing key if one was made (checking a signed request never makes one: without a
/// key, nothing was ever signed).
pub fn existing_key(store: &Store, keyring: &LiveKeyring) -> Result<Option<hmac::Key>, AppError> {
    let blob = store.read(|rtxn, dbs| Ok(dbs.url_keys.get(rtxn, FILE_URL_KEY)?.map(<[u8]>::to_vec)))?;
    blob.map(|blob| open(keyring, &blob)).transpose()
}

/// The URL-signing key, made and stored (sealed) on first use. Two requests making it at once
/// agree on one: the write keeps a key already stored.
pub fn signing_key(store: &Store, keyring: &Arc<LiveKeyring>) -> Result<hmac::Key, AppError> {
    if let Some(key) = existing_key(store, keyring)? {
        return Ok(key);
    }
    let mut fresh = Zeroizing::new([0u8; KEY_LEN]);
    random_bytes(fresh.as_mut()).map_err(sealed_error)?;
    let sealed = keyring.seal(fresh.as_ref(), &url_key_associated_data(FILE_URL_KEY)).map_err(sealed_error)?;
    let live = Arc::clone(keyring);
    let stored = store.write(move |wtxn, dbs| {
        if let Some(theirs) = dbs.url_keys.get(wtxn, FILE_URL_KEY)? {
            return Ok(theirs.to_vec());
        }
        // Sealed outside the transaction: a rotation in between is caught here (see live.rs).
        let sealed = live.keep_current(sealed, &url_key_associated_data(FILE_URL_KEY)).map_err(sealed_error)?;
        dbs.url_keys.put(wtxn, FILE_URL_KEY, &sealed)?;
        Ok(sealed)
    })?;
    open(keyring, &stored)
}

/// The hex signature of a grant.
pub fn sign(key: &hmac::Key, transfer: Transfer, sandbox_id: &str, expires: i64, path: &str) -> String {
    hex(hmac::sign(key, &canonical(transfer, sandbox_id, expires, path)).as_ref())
}

/// Why a signed request is refused: always 403, never saying more than which check failed.
pub fn refused(why: &str) -> AppError {
    AppError::forbidden(format!("this signed URL does not grant the request: {why}"))
}

/// Checks a signed request's grant: the signature (in constant time, `ring::hmac::verify`), then
/// the expiry against `now`. Every failure is 403.
pub fn verify(
    key: &hmac::Key,
    transfer: Transfer,
    sandbox_id: &str,
    expires: i64,
    path: &str,
    signature_hex: &str,
    now: i64,
) -> Result<(), AppError> {
    let tag = crate::ca_store::unhex(signature_hex).ok_or_else(|| refused("its signature is not hex"))?;
    hmac::verify(key, &canonical(transfer, sandbox_id, expires, path), &tag).map_err(|_| {
        refused("its signature does not match (it was signed for another sandbox, path, expiry or method)")
    })?;
    if now > expires {
        return Err(refused(&format!("it expired at {}", crate::clock::rfc3339(expires))));
    }
    Ok(())
}

/// Percent-encodes a query value: everything but unreserved characters and `/` (so `+` and
/// spaces survive a decoder that reads `+` as a space).
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Keyring, MasterKey};
    use crate::http::request::percent_decode;

    const SANDBOX: &str = "8d1f4c2e-6a0b-4c1d-9e2f-3a4b5c6d7e8f";

    fn key() -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &[7u8; KEY_LEN])
    }

    #[test]
    fn a_signature_verifies_only_for_what_was_signed_and_until_it_expires() {
        let k = key();
        let sig = sign(&k, Transfer::Download, SANDBOX, 1000, "/tmp/a b");
        assert_eq!(sig.len(), 64);
        verify(&k, Transfer::Download, SANDBOX, 1000, "/tmp/a b", &sig, 1000).expect("valid at its expiry");
        verify(&k, Transfer::Download, SANDBOX, 1000, "/tmp/a b", &sig.to_uppercase(), 999).expect("hex in any case");
        let other = "8d1f4c2e-6a0b-4c1d-9e2f-3a4b5c6d7e80";
        for (transfer, sandbox, expires, path, signature, now) in [
            (Transfer::Download, SANDBOX, 1000, "/tmp/a b", sig.as_str(), 1001),
            (Transfer::Upload, SANDBOX, 1000, "/tmp/a b", sig.as_str(), 0),
            (Transfer::Download, other, 1000, "/tmp/a b", sig.as_str(), 0),
            (Transfer::Download, SANDBOX, 1001, "/tmp/a b", sig.as_str(), 0),
            (Transfer::Download, SANDBOX, 1000, "/tmp/a c", sig.as_str(), 0),
            (Transfer::Download, SANDBOX, 1000, "/tmp/a b", &sig[..62], 0),
            (Transfer::Download, SANDBOX, 1000, "/tmp/a b", "zz", 0),
        ] {
            let e = verify(&k, transfer, sandbox, expires, path, signature, now).expect_err("refused");
            assert_eq!(e.status, 403, "{e:?}");
        }
        let other_key = hmac::Key::new(hmac::HMAC_SHA256, &[8u8; KEY_LEN]);
        assert!(verify(&other_key, Transfer::Download, SANDBOX, 1000, "/tmp/a b", &sig, 0).is_err());
    }

    #[test]
    fn a_path_with_newlines_cannot_forge_another_grant() {
        // The path comes last, after fields that hold no newline.
        assert_ne!(
            canonical(Transfer::Download, SANDBOX, 1, "/a\n2"),
            canonical(Transfer::Download, SANDBOX, 12, "/a")
        );
    }

    #[test]
    fn query_values_round_trip_through_the_decoder() {
        for path in ["/tmp/a b+c", "/home/ü/x?y=1&z#", "relative/%41"] {
            let encoded = encode_query_value(path);
            assert!(!encoded.contains(['+', ' ', '&', '?', '#']), "{encoded}");
            assert_eq!(percent_decode(&encoded, true).expect("decodes"), path);
        }
    }

    #[test]
    fn the_key_is_made_once_stored_sealed_and_opened_after_a_rotation() {
        let dir = std::env::temp_dir().join(format!("oc-url-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).expect("store");
        let old = || MasterKey::from_bytes(&[1u8; 32]).expect("key");
        let new = || MasterKey::from_bytes(&[2u8; 32]).expect("key");
        let live = Arc::new(LiveKeyring::new(Keyring::new(old())));
        let first = signing_key(&store, &live).expect("made");
        let sig = sign(&first, Transfer::Upload, SANDBOX, 5, "/f");
        let again = signing_key(&store, &live).expect("read");
        verify(&again, Transfer::Upload, SANDBOX, 5, "/f", &sig, 0).expect("the same key");
        let blob = store.read(|rtxn, dbs| Ok(dbs.url_keys.get(rtxn, FILE_URL_KEY)?.map(<[u8]>::to_vec)));
        let blob = blob.expect("read").expect("stored");
        assert!(Keyring::new(old()).is_current(&blob), "sealed under the master key");

        // A rotation re-seals it; the key inside is the same, so old signatures still verify.
        let (secrets, cas) =
            crate::master_key::reseal::reseal_all(&store, &Keyring::with_previous(new(), vec![old()])).expect("reseal");
        assert_eq!((secrets, cas), (0, 0));
        let blob = store.read(|rtxn, dbs| Ok(dbs.url_keys.get(rtxn, FILE_URL_KEY)?.map(<[u8]>::to_vec)));
        assert!(Keyring::new(new()).is_current(&blob.expect("read").expect("stored")), "re-sealed");
        let only_new = Arc::new(LiveKeyring::new(Keyring::new(new())));
        let after = signing_key(&store, &only_new).expect("opened with the new key alone");
        verify(&after, Transfer::Upload, SANDBOX, 5, "/f", &sig, 0).expect("still verifies");
        assert_eq!(crate::master_key::reseal::sealed_values(&store).expect("count"), 1);
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

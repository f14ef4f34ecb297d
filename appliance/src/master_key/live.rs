//! The keyring a running appliance seals and opens with, replaceable while requests run: a
//! master-key rotation (`POST /api/system/master-key/rotate`) swaps it without a restart.
//!
//! A writer seals outside the store's write transaction, so a value sealed just before a swap
//! could be committed just after the rotation re-sealed everything. Writers therefore pass their
//! blob through `keep_current` inside their transaction: the rotation swaps the keyring before
//! its own transaction starts, so a stale blob is either committed first (and re-sealed by the
//! rotation) or re-sealed by its writer.

use std::sync::{Arc, PoisonError, RwLock};

use zeroize::Zeroizing;

use crate::crypto::{CryptoError, Keyring};

pub struct LiveKeyring {
    ring: RwLock<Arc<Keyring>>,
}

impl LiveKeyring {
    pub fn new(ring: Keyring) -> Self {
        Self { ring: RwLock::new(Arc::new(ring)) }
    }

    /// The keyring in force now (held briefly by the caller; a swap does not wait for it).
    pub fn snapshot(&self) -> Arc<Keyring> {
        Arc::clone(&self.ring.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn replace(&self, ring: Keyring) {
        *self.ring.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ring);
    }

    pub fn seal(&self, plaintext: &[u8], associated: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.snapshot().seal(plaintext, associated)
    }

    pub fn open(&self, blob: &[u8], associated: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.snapshot().open(blob, associated)
    }

    /// `blob` itself when it is sealed under the current key, else re-sealed under it. Called
    /// inside the write transaction that stores it (see the module comment).
    pub fn keep_current(&self, blob: Vec<u8>, associated: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let ring = self.snapshot();
        if ring.is_current(&blob) {
            return Ok(blob);
        }
        let plain = ring.open(&blob, associated)?;
        ring.seal(&plain, associated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    fn key(byte: u8) -> MasterKey {
        MasterKey::from_bytes(&[byte; 32]).expect("key")
    }

    #[test]
    fn a_blob_sealed_before_a_swap_is_resealed_under_the_new_key() {
        let live = LiveKeyring::new(Keyring::new(key(1)));
        let stale = live.seal(b"value", b"aad").expect("seal");
        live.replace(Keyring::with_previous(key(2), vec![key(1)]));
        let kept = live.keep_current(stale.clone(), b"aad").expect("reseal");
        assert_ne!(kept, stale);
        let only_new = Keyring::new(key(2));
        assert!(only_new.is_current(&kept));
        assert_eq!(only_new.open(&kept, b"aad").expect("open").as_slice(), b"value");
        // Already current: unchanged.
        assert_eq!(live.keep_current(kept.clone(), b"aad").expect("same"), kept);
    }
}

//! Secret encryption under the appliance master key, API-key hashing and randomness.
//!
//! A sealed blob is `version (1) | key id (8) | nonce (24) | ciphertext | tag (16)`,
//! sealed with XChaCha20-Poly1305. The associated data names where the blob lives
//! (project and secret name), so a ciphertext copied to another record fails to open.

use std::fmt;

use orion::hazardous::aead::xchacha20poly1305::{Nonce, SecretKey, XChaCha20Poly1305 as XChaCha};
use zeroize::Zeroizing;

pub const MASTER_KEY_LEN: usize = 32;
pub const KEY_ID_LEN: usize = 8;
const BLOB_VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CryptoError {
    Random,
    BadKey,
    Malformed,
    UnknownKey(String),
    Authentication,
}

impl fmt::Display for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Random => f.write_str("the OS random number generator failed"),
            Self::BadKey => f.write_str("master key must be exactly 32 bytes"),
            Self::Malformed => f.write_str("sealed value is malformed"),
            Self::UnknownKey(id) => write!(f, "sealed value uses master key {id}, which is not loaded"),
            Self::Authentication => f.write_str("sealed value failed authentication (wrong key or tampered data)"),
        }
    }
}

impl std::error::Error for CryptoError {}

/// Fills `dst` from the OS CSPRNG.
pub fn random_bytes(dst: &mut [u8]) -> Result<(), CryptoError> {
    orion::util::secure_rand_bytes(dst).map_err(|_| CryptoError::Random)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// BLAKE2b-256 of an API key. Keys are high-entropy random strings, so a fast hash
/// is enough: there is nothing to brute-force that is easier than the key itself.
pub fn hash_api_key(key: &[u8]) -> Result<[u8; 32], CryptoError> {
    let digest = orion::hash::digest(key).map_err(|_| CryptoError::BadKey)?;
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Ok(out)
}

/// Constant-time equality for secrets and their hashes.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    orion::util::secure_cmp(a, b).is_ok()
}

/// One master key and its public identifier.
pub struct MasterKey {
    id: [u8; KEY_ID_LEN],
    key: SecretKey,
}

impl MasterKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != MASTER_KEY_LEN {
            return Err(CryptoError::BadKey);
        }
        let key = SecretKey::try_from(bytes).map_err(|_| CryptoError::BadKey)?;
        // The id is a hash of the key under a fixed label: it identifies the key without revealing it.
        let mut labelled = Zeroizing::new(Vec::with_capacity(32 + bytes.len()));
        labelled.extend_from_slice(b"opencomputer master key id v1\0");
        labelled.extend_from_slice(bytes);
        let digest = orion::hash::digest(&labelled).map_err(|_| CryptoError::BadKey)?;
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
        Ok(Self { id, key })
    }

    pub fn generate_bytes() -> Result<Zeroizing<[u8; MASTER_KEY_LEN]>, CryptoError> {
        let mut bytes = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        random_bytes(bytes.as_mut())?;
        Ok(bytes)
    }

    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        self.id
    }

    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }

    /// A second handle on the same key (a rotation's keyrings each hold the old and new key).
    pub fn duplicate(&self) -> Result<Self, CryptoError> {
        let key = SecretKey::try_from(self.key.unprotected_as_ref()).map_err(|_| CryptoError::BadKey)?;
        Ok(Self { id: self.id, key })
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id_hex())
    }
}

/// The key new values are sealed with, plus older keys that may still open values
/// (only while a rotation is being completed).
#[derive(Debug)]
pub struct Keyring {
    current: MasterKey,
    previous: Vec<MasterKey>,
}

impl Keyring {
    pub fn new(current: MasterKey) -> Self {
        Self { current, previous: Vec::new() }
    }

    pub fn with_previous(current: MasterKey, previous: Vec<MasterKey>) -> Self {
        Self { current, previous }
    }

    pub fn current(&self) -> &MasterKey {
        &self.current
    }

    pub fn seal(&self, plaintext: &[u8], associated: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce_bytes = [0u8; NONCE_LEN];
        random_bytes(&mut nonce_bytes)?;
        let nonce = Nonce::try_from(&nonce_bytes).map_err(|_| CryptoError::Malformed)?;
        let mut out = vec![0u8; HEADER_LEN + plaintext.len() + TAG_LEN];
        out[0] = BLOB_VERSION;
        out[1..=KEY_ID_LEN].copy_from_slice(&self.current.id);
        out[1 + KEY_ID_LEN..HEADER_LEN].copy_from_slice(&nonce_bytes);
        XChaCha::seal(&self.current.key, &nonce, plaintext, Some(associated), &mut out[HEADER_LEN..])
            .map_err(|_| CryptoError::Malformed)?;
        Ok(out)
    }

    pub fn open(&self, blob: &[u8], associated: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let id = blob_key_id(blob)?;
        let key = std::iter::once(&self.current)
            .chain(self.previous.iter())
            .find(|k| k.id == id)
            .ok_or_else(|| CryptoError::UnknownKey(hex(&id)))?;
        let nonce = Nonce::try_from(&blob[1 + KEY_ID_LEN..HEADER_LEN]).map_err(|_| CryptoError::Malformed)?;
        let ciphertext = &blob[HEADER_LEN..];
        let mut plain = Zeroizing::new(vec![0u8; ciphertext.len() - TAG_LEN]);
        XChaCha::open(&key.key, &nonce, ciphertext, Some(associated), &mut plain)
            .map_err(|_| CryptoError::Authentication)?;
        Ok(plain)
    }

    /// Whether `blob` is sealed with the current key (rotation skips those).
    pub fn is_current(&self, blob: &[u8]) -> bool {
        blob_key_id(blob).is_ok_and(|id| id == self.current.id)
    }
}

/// The key id a blob was sealed with.
pub fn blob_key_id(blob: &[u8]) -> Result<[u8; KEY_ID_LEN], CryptoError> {
    if blob.len() < HEADER_LEN + TAG_LEN || blob[0] != BLOB_VERSION {
        return Err(CryptoError::Malformed);
    }
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&blob[1..=KEY_ID_LEN]);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> MasterKey {
        MasterKey::from_bytes(&[byte; 32]).expect("32-byte key")
    }

    #[test]
    fn seal_open_round_trip_and_no_plaintext_in_blob() {
        let ring = Keyring::new(key(7));
        let blob = ring.seal(b"hunter2-hunter2", b"p1/API_KEY").expect("seal");
        assert!(!blob.windows(15).any(|w| w == b"hunter2-hunter2"));
        assert_eq!(ring.open(&blob, b"p1/API_KEY").expect("open").as_slice(), b"hunter2-hunter2");
        assert!(ring.is_current(&blob));
    }

    #[test]
    fn wrong_associated_data_or_tampering_fails() {
        let ring = Keyring::new(key(7));
        let mut blob = ring.seal(b"value", b"p1/A").expect("seal");
        assert_eq!(ring.open(&blob, b"p1/B").unwrap_err(), CryptoError::Authentication);
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert_eq!(ring.open(&blob, b"p1/A").unwrap_err(), CryptoError::Authentication);
        assert_eq!(ring.open(&blob[..10], b"p1/A").unwrap_err(), CryptoError::Malformed);
    }

    #[test]
    fn previous_keys_open_old_blobs_and_unknown_keys_are_named() {
        let old = Keyring::new(key(1));
        let blob = old.seal(b"v", b"ad").expect("seal");
        let rotated = Keyring::with_previous(key(2), vec![key(1)]);
        assert_eq!(rotated.open(&blob, b"ad").expect("open").as_slice(), b"v");
        assert!(!rotated.is_current(&blob));
        let other = Keyring::new(key(3));
        assert!(matches!(other.open(&blob, b"ad"), Err(CryptoError::UnknownKey(_))));
    }

    #[test]
    fn key_ids_differ_per_key_and_bad_lengths_are_rejected() {
        assert_ne!(key(1).id(), key(2).id());
        assert_eq!(MasterKey::from_bytes(&[0u8; 31]).unwrap_err(), CryptoError::BadKey);
    }

    #[test]
    fn api_key_hash_is_stable_and_distinct() {
        let a = hash_api_key(b"key-a").expect("hash");
        assert_eq!(a, hash_api_key(b"key-a").expect("hash"));
        assert_ne!(a, hash_api_key(b"key-b").expect("hash"));
        assert_eq!(hex(&[0x01, 0xab]), "01ab");
    }
}

//! Persistence of the appliance CA (for the sealing proxy): the certificate in the
//! clear, the private key sealed under the master key like a secret.

use zeroize::Zeroizing;

use crate::clock::now_unix;
use crate::crypto::{hex, Keyring};
use crate::error::AppError;
use crate::store::records::{ca_associated_data, CaRecord};
use crate::store::Store;

/// The one CA the appliance uses today.
pub const APPLIANCE_CA: &str = "appliance-ca";

pub fn save(store: &Store, keyring: &Keyring, name: &str, cert_pem: &str, key_pem: &[u8]) -> Result<(), AppError> {
    let sealed = keyring
        .seal(key_pem, &ca_associated_data(name))
        .map_err(|e| AppError::internal(format!("cannot encrypt CA key: {e}")))?;
    let record = CaRecord { cert_pem: cert_pem.to_string(), sealed_key_hex: hex(&sealed), created_at: now_unix() };
    let name = name.to_string();
    store.write(move |wtxn, dbs| Ok(dbs.ca.put(wtxn, &name, &record)?))
}

/// The certificate PEM and the decrypted private key PEM, if the CA was saved.
/// A CA certificate PEM and its decrypted private key PEM.
pub type CaMaterial = (String, Zeroizing<Vec<u8>>);

pub fn load(store: &Store, keyring: &Keyring, name: &str) -> Result<Option<CaMaterial>, AppError> {
    let Some(record) = store.read(|rtxn, dbs| Ok(dbs.ca.get(rtxn, name)?))? else { return Ok(None) };
    let sealed = unhex(&record.sealed_key_hex).ok_or_else(|| AppError::internal("stored CA key is corrupt"))?;
    let key = keyring
        .open(&sealed, &ca_associated_data(name))
        .map_err(|e| AppError::internal(format!("cannot decrypt CA key: {e}")))?;
    Ok(Some((record.cert_pem, key)))
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).ok().and_then(|s| u8::from_str_radix(s, 16).ok()))
        .collect()
}

//! Re-encrypts every value sealed under the master key (secrets, CA keys, running sandboxes'
//! stored tokens, the key that signs file URLs) under a keyring's current key, in one store
//! transaction.

use crate::crypto::{hex, Keyring};
use crate::error::AppError;
use crate::store::records::{
    ca_associated_data, sandbox_seal_associated_data, secret_associated_data, url_key_associated_data, CaRecord,
};
use crate::store::Store;

/// How many values in the store are sealed under some master key.
pub fn sealed_values(store: &Store) -> Result<u64, AppError> {
    store.read(|rtxn, dbs| {
        Ok(dbs.secrets.len(rtxn)? + dbs.ca.len(rtxn)? + dbs.sandbox_seals.len(rtxn)? + dbs.url_keys.len(rtxn)?)
    })
}

/// Re-seals every value not already under `ring`'s current key, in one transaction.
pub fn reseal_all(store: &Store, ring: &Keyring) -> Result<(usize, usize), AppError> {
    store.write_exclusive(|wtxn, dbs| {
        let mut secrets = Vec::new();
        for item in dbs.secrets.iter(wtxn)? {
            let (key, blob) = item?;
            if !ring.is_current(blob) {
                secrets.push((key.to_string(), blob.to_vec()));
            }
        }
        let mut resealed_secrets = 0;
        for (key, blob) in secrets {
            let (project_id, name) = key
                .split_once('/')
                .ok_or_else(|| AppError::internal(format!("malformed secret key {key:?} in store")))?;
            let aad = secret_associated_data(project_id, name);
            let plain = ring.open(&blob, &aad).map_err(|e| AppError::internal(format!("secret {key}: {e}")))?;
            let fresh = ring.seal(&plain, &aad).map_err(|e| AppError::internal(e.to_string()))?;
            dbs.secrets.put(wtxn, &key, &fresh)?;
            resealed_secrets += 1;
        }
        let mut cas: Vec<(String, CaRecord)> = Vec::new();
        for item in dbs.ca.iter(wtxn)? {
            let (name, record) = item?;
            cas.push((name.to_string(), record));
        }
        let mut resealed_ca = 0;
        for (name, mut record) in cas {
            let blob = crate::ca_store::unhex(&record.sealed_key_hex)
                .ok_or_else(|| AppError::internal(format!("CA {name}: stored key is corrupt")))?;
            if ring.is_current(&blob) {
                continue;
            }
            let aad = ca_associated_data(&name);
            let plain = ring.open(&blob, &aad).map_err(|e| AppError::internal(format!("CA {name}: {e}")))?;
            record.sealed_key_hex = hex(&ring.seal(&plain, &aad).map_err(|e| AppError::internal(e.to_string()))?);
            dbs.ca.put(wtxn, &name, &record)?;
            resealed_ca += 1;
        }
        // Running sandboxes' stored tokens (`seal_sync`) move to the new key too; they are not
        // counted in the report, being as short-lived as the sandboxes.
        let mut seals = Vec::new();
        for item in dbs.sandbox_seals.iter(wtxn)? {
            let (id, blob) = item?;
            if !ring.is_current(blob) {
                seals.push((id.to_string(), blob.to_vec()));
            }
        }
        for (id, blob) in seals {
            let aad = sandbox_seal_associated_data(&id);
            let plain = ring.open(&blob, &aad).map_err(|e| AppError::internal(format!("sandbox {id} tokens: {e}")))?;
            let fresh = ring.seal(&plain, &aad).map_err(|e| AppError::internal(e.to_string()))?;
            dbs.sandbox_seals.put(wtxn, &id, &fresh)?;
        }
        // The URL-signing key (`url_signing`): re-sealed, its bytes unchanged, so URLs signed
        // before the rotation still verify. Not counted in the report either.
        let mut url_keys = Vec::new();
        for item in dbs.url_keys.iter(wtxn)? {
            let (name, blob) = item?;
            if !ring.is_current(blob) {
                url_keys.push((name.to_string(), blob.to_vec()));
            }
        }
        for (name, blob) in url_keys {
            let aad = url_key_associated_data(&name);
            let plain =
                ring.open(&blob, &aad).map_err(|e| AppError::internal(format!("URL-signing key {name}: {e}")))?;
            let fresh = ring.seal(&plain, &aad).map_err(|e| AppError::internal(e.to_string()))?;
            dbs.url_keys.put(wtxn, &name, &fresh)?;
        }
        Ok((resealed_secrets, resealed_ca))
    })
}

//! Master key rotation: re-encrypts every secret, the CA key and running sandboxes' stored
//! tokens under a new key.
//!
//! With the default key file the steps are crash-safe: the new key is first written
//! durably to `master.key.next`, then one store transaction re-seals everything,
//! then `master.key.next` is renamed over `master.key`. A crash at any point leaves
//! either the old state or a finished store with the next key still on disk, and the
//! next start (or the next `rotate-key`) completes the rename.

use std::fs;
use std::path::Path;

use crate::crypto::{hex, Keyring, MasterKey};
use crate::error::AppError;
use crate::keyfiles::{
    create_master_key, master_key_path, next_master_key_path, read_master_key, sync_parent_dir, DataDirLock,
};
use crate::store::records::{ca_associated_data, sandbox_seal_associated_data, secret_associated_data, CaRecord};
use crate::store::Store;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RotationReport {
    pub secrets: usize,
    pub ca_keys: usize,
    pub new_key_id: String,
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
        Ok((resealed_secrets, resealed_ca))
    })
}

/// Finishes (or performs) a rotation of the data directory's own `master.key`.
/// `store` must be open on `data_dir` and the caller must hold its lock.
pub fn rotate_default_key(data_dir: &Path, store: &Store) -> Result<(RotationReport, Keyring), String> {
    let current_path = master_key_path(data_dir);
    let next_path = next_master_key_path(data_dir);
    let current = read_master_key(&current_path)?;
    let next = if next_path.exists() { read_master_key(&next_path)? } else { create_master_key(&next_path)? };
    let new_key_id = next.id_hex();
    let ring = Keyring::with_previous(next, vec![current]);
    let (secrets, ca_keys) = reseal_all(store, &ring).map_err(|e| e.message)?;
    fs::rename(&next_path, &current_path).map_err(|e| format!("cannot install the new master key: {e}"))?;
    sync_parent_dir(&current_path)?;
    let installed = read_master_key(&current_path)?;
    Ok((RotationReport { secrets, ca_keys, new_key_id }, Keyring::new(installed)))
}

/// `appliance rotate-key`: with no key files, rotates `<data-dir>/master.key`; with
/// `--master-key-file OLD --new-master-key-file NEW` (operator-managed keys),
/// re-seals everything under NEW and leaves swapping the files to the operator.
pub fn run(data_dir: &Path, old_key: Option<&Path>, new_key: Option<&Path>) -> Result<RotationReport, String> {
    let _lock = DataDirLock::acquire(data_dir)?;
    let store = Store::open(data_dir)?;
    let result = match (old_key, new_key) {
        (None, None) => rotate_default_key(data_dir, &store).map(|(report, _)| report),
        (Some(old), Some(new)) => {
            let current: MasterKey = read_master_key(old)?;
            let next = read_master_key(new)?;
            if current.id() == next.id() {
                return Err("the new master key is the same as the current one".into());
            }
            let new_key_id = next.id_hex();
            let ring = Keyring::with_previous(next, vec![current]);
            reseal_all(&store, &ring)
                .map(|(secrets, ca_keys)| RotationReport { secrets, ca_keys, new_key_id })
                .map_err(|e| e.message)
        }
        _ => Err("give both --master-key-file and --new-master-key-file, or neither".into()),
    };
    store.close();
    result
}

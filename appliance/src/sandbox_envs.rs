//! The environment a sandbox was created with (its sealed tokens and the caller's `envs`), kept
//! sealed under the master key while the sandbox lives, so that a restarted guest gets it back:
//! the agent holds it only in the guest's memory. Stored in `sandbox_seals` under `<id>/env`,
//! beside the sandbox's token registration, so a master-key rotation re-seals it with them and
//! it goes when they go.

use zeroize::Zeroizing;

use crate::app::App;
use crate::error::AppError;
use crate::runtime::EnvVars;
use crate::store::records::sandbox_seal_associated_data;

/// The store key of sandbox `id`'s environment.
pub fn key(id: &str) -> String {
    format!("{id}/env")
}

/// Seals and stores `envs` for sandbox `id`, replacing what was stored.
pub fn store(app: &App, id: &str, envs: &EnvVars) -> Result<(), AppError> {
    let pairs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let json = Zeroizing::new(serde_json::to_vec(&pairs).map_err(|e| AppError::internal(e.to_string()))?);
    let key = key(id);
    let blob = app
        .keyring
        .seal(&json, &sandbox_seal_associated_data(&key))
        .map_err(|e| AppError::internal(format!("cannot seal the environment of sandbox {id}: {e}")))?;
    let keyring = std::sync::Arc::clone(&app.keyring);
    app.store.write(move |wtxn, dbs| {
        // A master-key rotation may have run since it was sealed.
        let blob = keyring
            .keep_current(blob, &sandbox_seal_associated_data(&key))
            .map_err(|e| AppError::internal(format!("cannot seal the environment of {key}: {e}")))?;
        Ok(dbs.sandbox_seals.put(wtxn, &key, &blob)?)
    })
}

/// The environment stored for sandbox `id` (empty if none was).
pub fn load(app: &App, id: &str) -> Result<EnvVars, AppError> {
    let key = key(id);
    let lookup = key.clone();
    let Some(blob) = app.store.read(move |rtxn, dbs| Ok(dbs.sandbox_seals.get(rtxn, &lookup)?.map(<[u8]>::to_vec)))?
    else {
        return Ok(EnvVars::new());
    };
    let json = Zeroizing::new(
        app.keyring
            .open(&blob, &sandbox_seal_associated_data(&key))
            .map_err(|e| AppError::internal(format!("cannot open the stored environment of sandbox {id}: {e}")))?,
    );
    let pairs: Vec<(String, String)> = serde_json::from_slice(&json)
        .map_err(|e| AppError::internal(format!("the stored environment of sandbox {id} is corrupt: {e}")))?;
    Ok(pairs.into_iter().map(|(k, v)| (k, Zeroizing::new(v))).collect())
}

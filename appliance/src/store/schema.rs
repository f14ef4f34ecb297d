//! Schema version of the store and the ordered steps that migrate older stores.

use heed::RwTxn;

use super::Dbs;

pub const CURRENT_SCHEMA_VERSION: u32 = 1;
const VERSION_KEY: &str = "schema_version";

/// One migration step: upgrades a store at version `from` to `from + 1`.
struct Step {
    from: u32,
    run: fn(&mut RwTxn, &Dbs) -> Result<(), String>,
}

/// Version 0 is a store written before the version key existed: its databases are
/// the same as version 1's, so the step only records the version. New steps are
/// appended here when a record layout changes.
const STEPS: &[Step] = &[Step { from: 0, run: |_, _| Ok(()) }];

pub fn read_version(wtxn: &RwTxn, dbs: &Dbs) -> Result<Option<u32>, String> {
    let raw = dbs.meta.get(wtxn, VERSION_KEY).map_err(|e| format!("store: {e}"))?;
    match raw {
        None => Ok(None),
        Some(bytes) => {
            let arr: [u8; 4] = bytes.try_into().map_err(|_| "store: schema version record is corrupt".to_string())?;
            Ok(Some(u32::from_be_bytes(arr)))
        }
    }
}

fn write_version(wtxn: &mut RwTxn, dbs: &Dbs, version: u32) -> Result<(), String> {
    dbs.meta.put(wtxn, VERSION_KEY, &version.to_be_bytes()).map_err(|e| format!("store: {e}"))
}

/// Brings the store to `CURRENT_SCHEMA_VERSION` inside the caller's transaction, so a
/// crash mid-migration leaves the old version intact.
pub fn migrate(wtxn: &mut RwTxn, dbs: &Dbs) -> Result<(), String> {
    let found = read_version(wtxn, dbs)?;
    let mut version = match found {
        Some(v) => v,
        None if store_is_empty(wtxn, dbs)? => {
            return write_version(wtxn, dbs, CURRENT_SCHEMA_VERSION);
        }
        None => 0,
    };
    if version > CURRENT_SCHEMA_VERSION {
        return Err(format!(
            "store schema version {version} is newer than this appliance supports ({CURRENT_SCHEMA_VERSION}); refusing to touch it"
        ));
    }
    while version < CURRENT_SCHEMA_VERSION {
        let step = STEPS
            .iter()
            .find(|s| s.from == version)
            .ok_or_else(|| format!("no migration from store schema version {version}"))?;
        (step.run)(wtxn, dbs)?;
        version += 1;
        write_version(wtxn, dbs, version)?;
        println!("appliance: store migrated to schema version {version}");
    }
    Ok(())
}

fn store_is_empty(wtxn: &RwTxn, dbs: &Dbs) -> Result<bool, String> {
    let e = |e: heed::Error| format!("store: {e}");
    Ok(dbs.projects.is_empty(wtxn).map_err(e)?
        && dbs.secrets.is_empty(wtxn).map_err(e)?
        && dbs.sandboxes.is_empty(wtxn).map_err(e)?
        && dbs.api_keys.is_empty(wtxn).map_err(e)?)
}

#[cfg(test)]
pub fn force_version(wtxn: &mut RwTxn, dbs: &Dbs, version: Option<u32>) -> Result<(), String> {
    match version {
        Some(v) => write_version(wtxn, dbs, v),
        None => dbs.meta.delete(wtxn, VERSION_KEY).map(|_| ()).map_err(|e| format!("store: {e}")),
    }
}

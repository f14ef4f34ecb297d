//! The one LMDB environment at `<data-dir>/store`: typed databases, schema version,
//! reads on the caller's thread and writes through the group committer.

mod commit;
pub mod records;
mod schema;

use std::fs;
use std::path::{Path, PathBuf};

use heed::types::{Bytes, SerdeJson, Str};
use heed::{Database, Env, EnvOpenOptions, RoTxn, RwTxn};

use crate::error::AppError;
use records::{
    ApiKeyRecord, AuditRecord, CaRecord, CheckpointRecord, ProjectKeyRecord, ProjectRecord, SandboxRecord,
    SecretHostsRecord, TemplateRecord,
};

pub use commit::Committer;

/// Every record of a JSON-valued database, in key order.
pub fn values<T>(db: &Database<Str, SerdeJson<T>>, rtxn: &RoTxn) -> Result<Vec<T>, AppError>
where
    T: serde::de::DeserializeOwned + 'static,
{
    let mut out = Vec::new();
    for item in db.iter(rtxn)? {
        out.push(item?.1);
    }
    Ok(out)
}
pub use schema::CURRENT_SCHEMA_VERSION;

/// Sparse: LMDB only uses disk for pages actually written.
const MAP_SIZE: usize = 8 << 30;
const MAX_READERS: u32 = 1024;

/// Every database of the environment. `Database` handles are plain ids, so this is `Copy`.
#[derive(Clone, Copy)]
pub struct Dbs {
    pub meta: Database<Str, Bytes>,
    pub projects: Database<Str, SerdeJson<ProjectRecord>>,
    pub project_names: Database<Str, Str>,
    /// `<project id>/<NAME>` -> sealed blob (see `crypto`).
    pub secrets: Database<Str, Bytes>,
    /// `<project id>/<NAME>` -> the hosts that secret may reach, when it has its own. A
    /// database of its own (not a new `secrets` layout) so stores written before it existed
    /// read as "no hosts set", and an older appliance booted after a rollback still reads
    /// `secrets` unchanged.
    pub secret_hosts: Database<Str, SerdeJson<SecretHostsRecord>>,
    pub sandboxes: Database<Str, SerdeJson<SandboxRecord>>,
    /// Sandbox id -> sealed blob of its project, allowlist and tokens (`seal_sync`), so a
    /// restarted appliance can register a running sandbox's tokens with the proxy again.
    pub sandbox_seals: Database<Str, Bytes>,
    pub api_keys: Database<Str, SerdeJson<ApiKeyRecord>>,
    /// Hex hash of a project key -> its id, name and projects.
    pub project_keys: Database<Str, SerdeJson<ProjectKeyRecord>>,
    /// Audit trail: zero-padded sequence number -> entry, oldest first.
    pub audit: Database<Str, SerdeJson<AuditRecord>>,
    pub ca: Database<Str, SerdeJson<CaRecord>>,
    /// Name -> sealed blob of a key that signs file URLs (`url_signing`), made on first use. A
    /// database of its own, so stores written before it existed read as "no key yet" and an
    /// older appliance booted after a rollback never sees it.
    pub url_keys: Database<Str, Bytes>,
    /// Checkpoint id -> its record (`checkpoints`). A database of its own, so stores written
    /// before checkpoints existed read as "none", and an older appliance never sees it.
    pub checkpoints: Database<Str, SerdeJson<CheckpointRecord>>,
    /// Template name -> the record of a template made on the appliance (`templates`); a
    /// database of its own for the same reasons.
    pub templates: Database<Str, SerdeJson<TemplateRecord>>,
}

pub struct Store {
    env: Env,
    dbs: Dbs,
    committer: Committer,
    path: PathBuf,
}

pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("store")
}

impl Store {
    /// Opens (creating if needed) the store under `data_dir` and brings its schema
    /// to the current version. The caller must hold the data directory lock.
    pub fn open(data_dir: &Path) -> Result<Self, String> {
        let path = store_path(data_dir);
        fs::create_dir_all(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let mut options = EnvOpenOptions::new();
        options.map_size(MAP_SIZE).max_dbs(16).max_readers(MAX_READERS);
        // SAFETY: the environment's files live in our data directory, which this process
        // holds locked (DataDirLock); nothing else maps or truncates them, and LMDB's own
        // lock file coordinates readers. No unsafe flags (NO_SYNC etc.) are set.
        let env = unsafe { options.open(&path) }.map_err(|e| format!("cannot open store {}: {e}", path.display()))?;
        let mut wtxn = env.write_txn().map_err(|e| format!("store: {e}"))?;
        let dbs = Dbs {
            meta: create(&env, &mut wtxn, "meta")?,
            projects: create(&env, &mut wtxn, "projects")?,
            project_names: create(&env, &mut wtxn, "project_names")?,
            secrets: create(&env, &mut wtxn, "secrets")?,
            secret_hosts: create(&env, &mut wtxn, "secret_hosts")?,
            sandboxes: create(&env, &mut wtxn, "sandboxes")?,
            sandbox_seals: create(&env, &mut wtxn, "sandbox_seals")?,
            api_keys: create(&env, &mut wtxn, "api_keys")?,
            project_keys: create(&env, &mut wtxn, "project_keys")?,
            audit: create(&env, &mut wtxn, "audit")?,
            ca: create(&env, &mut wtxn, "ca")?,
            url_keys: create(&env, &mut wtxn, "url_keys")?,
            checkpoints: create(&env, &mut wtxn, "checkpoints")?,
            templates: create(&env, &mut wtxn, "templates")?,
        };
        schema::migrate(&mut wtxn, &dbs)?;
        wtxn.commit().map_err(|e| format!("store: cannot commit schema: {e}"))?;
        let committer = Committer::start(env.clone(), dbs);
        Ok(Self { env, dbs, committer, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dbs(&self) -> &Dbs {
        &self.dbs
    }

    /// Runs `f` in a read transaction on this thread.
    pub fn read<R>(&self, f: impl FnOnce(&RoTxn, &Dbs) -> Result<R, AppError>) -> Result<R, AppError> {
        let rtxn = self.env.read_txn()?;
        f(&rtxn, &self.dbs)
    }

    /// Runs `f` as one atomic transaction that is durable (fsynced) when this returns
    /// `Ok`. If `f` fails, none of its writes are kept.
    pub fn write<R, F>(&self, f: F) -> Result<R, AppError>
    where
        R: Send + 'static,
        F: FnOnce(&mut RwTxn, &Dbs) -> Result<R, AppError> + Send + 'static,
    {
        self.committer.submit(f)
    }

    /// Queues `f` for the next group commit and returns at once; a failure of `f` is only
    /// logged by the committer. For records nobody waits on (the audit trail).
    pub fn write_detached<F>(&self, f: F) -> Result<(), AppError>
    where
        F: FnOnce(&mut RwTxn, &Dbs) -> Result<(), AppError> + Send + 'static,
    {
        self.committer.submit_detached(f)
    }

    /// A plain write transaction on this thread, for offline tools (key rotation)
    /// that must not share a commit with anything else.
    pub fn write_exclusive<R>(&self, f: impl FnOnce(&mut RwTxn, &Dbs) -> Result<R, AppError>) -> Result<R, AppError> {
        let mut wtxn = self.env.write_txn()?;
        let out = f(&mut wtxn, &self.dbs)?;
        wtxn.commit()?;
        Ok(out)
    }

    /// Stops the committer after it has flushed what was submitted, then closes the
    /// environment and waits until LMDB has released it.
    pub fn close(self) {
        let Store { env, committer, .. } = self;
        committer.shutdown();
        env.prepare_for_closing().wait();
    }
}

fn create<K: 'static, D: 'static>(env: &Env, wtxn: &mut RwTxn, name: &str) -> Result<Database<K, D>, String> {
    env.create_database(wtxn, Some(name)).map_err(|e| format!("store: cannot open database {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("appliance-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn project(id: &str, name: &str) -> ProjectRecord {
        ProjectRecord {
            id: id.into(),
            name: name.into(),
            template: "base".into(),
            cpu_count: 1,
            memory_mb: 512,
            timeout_sec: 300,
            egress_allowlist: vec![],
            auto_hibernate: true,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn failed_job_leaves_nothing_and_others_in_the_batch_commit() {
        let dir = temp_dir("atomic");
        let store = Arc::new(Store::open(&dir).expect("open"));
        let mut handles = Vec::new();
        for i in 0..20 {
            let store = Arc::clone(&store);
            handles.push(std::thread::spawn(move || {
                store.write(move |wtxn, dbs| {
                    dbs.projects.put(wtxn, &format!("p{i}"), &project(&format!("p{i}"), "n"))?;
                    if i % 2 == 1 {
                        return Err(AppError::conflict("odd jobs fail after writing"));
                    }
                    Ok(())
                })
            }));
        }
        let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("thread")).collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 10);
        let stored = store
            .read(|rtxn, dbs| {
                let mut ids = Vec::new();
                for item in dbs.projects.iter(rtxn)? {
                    ids.push(item?.0.to_string());
                }
                Ok(ids)
            })
            .expect("read");
        assert_eq!(stored.len(), 10);
        assert!(stored.iter().all(|id| id[1..].parse::<u32>().expect("num") % 2 == 0));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn schema_version_is_set_migrated_and_guarded() {
        let dir = temp_dir("schema");
        let store = Store::open(&dir).expect("open");
        store
            .write_exclusive(|wtxn, dbs| {
                dbs.projects.put(wtxn, "a", &project("a", "a"))?;
                schema::force_version(wtxn, dbs, None).map_err(AppError::internal)
            })
            .expect("write");
        store.close();
        // An unversioned store with data is migrated from version 0.
        let store = Store::open(&dir).expect("reopen");
        let version = store
            .write_exclusive(|wtxn, dbs| schema::read_version(wtxn, dbs).map_err(AppError::internal))
            .expect("read");
        assert_eq!(version, Some(CURRENT_SCHEMA_VERSION));
        store
            .write_exclusive(|wtxn, dbs| schema::force_version(wtxn, dbs, Some(99)).map_err(AppError::internal))
            .expect("write");
        store.close();
        let err = Store::open(&dir).err().expect("newer schema refused");
        assert!(err.contains("newer"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}

//! Keeps every running sandbox's registration with the sealing proxy equal to what the store
//! holds now. It remembers, per running sandbox, its project and the sealed token it was given
//! for each secret name, and re-publishes the sandbox's bindings after every committed change
//! to that project's secrets or egress allowlist. Tokens are never re-minted: the sandbox keeps
//! the tokens in its environment and only what they stand for changes.
//!
//! Rules (README, "Where real secrets go"): a changed secret maps the same token to the new
//! value and hosts; a deleted secret's token is dropped for good; a sandbox never gains tokens
//! for secrets added after it was created; when the project is deleted all tokens are dropped
//! and the egress allowlist last published stays.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::app::App;
use crate::error::AppError;
use crate::seal::{SandboxSeal, SealPublisher, SealedBinding};
use crate::store::records::{sandbox_seal_associated_data, secret_associated_data, secret_key, ProjectRecord};

/// What the appliance published for one running sandbox, minus the secret values (those are
/// read from the store each time, so they are never kept here). Also what is kept in the store
/// for it, sealed under the master key like a secret, to register it with the proxy again after
/// the appliance restarts; the CID is not stored (the sandbox's record has it).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    #[serde(skip)]
    cid: u32,
    /// The project it was created from (by id, so renames do not matter); `None` for
    /// sandboxes without one, which are never re-published.
    project_id: Option<String>,
    /// The allowlist last published; kept as it was when the project is deleted.
    egress_allowlist: Vec<String>,
    /// Secret name -> the token in the sandbox's environment. Never logged.
    tokens: BTreeMap<String, String>,
}

/// Writes `entry` (sealed) to the store under the sandbox's id.
fn persist(app: &App, sandbox_id: &str, entry: &Entry) -> Result<(), AppError> {
    let json = Zeroizing::new(serde_json::to_vec(entry).map_err(|e| AppError::internal(e.to_string()))?);
    let blob = app
        .keyring
        .seal(&json, &sandbox_seal_associated_data(sandbox_id))
        .map_err(|e| AppError::internal(format!("cannot seal the tokens of sandbox {sandbox_id}: {e}")))?;
    let id = sandbox_id.to_string();
    let keyring = std::sync::Arc::clone(&app.keyring);
    app.store.write(move |wtxn, dbs| {
        // A master-key rotation may have run since the tokens were sealed.
        let blob = keyring
            .keep_current(blob, &sandbox_seal_associated_data(&id))
            .map_err(|e| AppError::internal(format!("cannot seal the tokens of sandbox {id}: {e}")))?;
        Ok(dbs.sandbox_seals.put(wtxn, &id, &blob)?)
    })
}

/// Registers a running sandbox found after a restart with the proxy again, from what `attach`
/// stored; returns how many tokens stand for secrets again (None when nothing was stored).
pub fn restore(
    app: &App,
    publisher: &dyn SealPublisher,
    sandbox_id: &str,
    cid: u32,
) -> Result<Option<usize>, AppError> {
    let Some(blob) = app.store.read(|rtxn, dbs| Ok(dbs.sandbox_seals.get(rtxn, sandbox_id)?.map(<[u8]>::to_vec)))?
    else {
        return Ok(None);
    };
    let json = app
        .keyring
        .open(&blob, &sandbox_seal_associated_data(sandbox_id))
        .map_err(|e| AppError::internal(format!("cannot open the stored tokens of sandbox {sandbox_id}: {e}")))?;
    let mut entry: Entry = serde_json::from_slice(&json)
        .map_err(|e| AppError::internal(format!("the stored tokens of sandbox {sandbox_id} are corrupt: {e}")))?;
    entry.cid = cid;
    let book = app.lifecycle.seals();
    let mut sandboxes = book.lock();
    let before = entry.tokens.len();
    publish(publisher, build(app, sandbox_id, &mut entry)?)?;
    if entry.tokens.len() != before {
        // Secrets deleted while the appliance was down: their tokens are gone for good.
        persist(app, sandbox_id, &entry)?;
    }
    let count = entry.tokens.len();
    sandboxes.insert(sandbox_id.to_string(), entry);
    Ok(Some(count))
}

/// Running sandboxes' registrations. Every publish and withdraw happens under this one lock,
/// and each publish reads the store inside it. A handler commits first and re-publishes
/// second, so whichever of a concurrent create and a change takes the lock last publishes
/// state at least as new as the change: a create that read the secrets before a change
/// cannot publish an old value after it.
#[derive(Default)]
pub struct SealBook {
    sandboxes: Mutex<HashMap<String, Entry>>,
}

impl SealBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every critical section leaves the map consistent (single inserts and removals), so a
    /// panic elsewhere while holding it does not make its content wrong.
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.sandboxes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Publishes a new sandbox's bindings and remembers them. `tokens` maps secret names of
/// `project` to the tokens minted for them; values and hosts are read from the store here,
/// under the lock, not from what the caller saw before booting.
pub fn attach(
    app: &App,
    publisher: &dyn SealPublisher,
    sandbox_id: &str,
    cid: u32,
    project: Option<&ProjectRecord>,
    tokens: BTreeMap<String, String>,
) -> Result<(), AppError> {
    let book = app.lifecycle.seals();
    let mut sandboxes = book.lock();
    let mut entry = Entry {
        cid,
        project_id: project.map(|p| p.id.clone()),
        egress_allowlist: project.map(|p| p.egress_allowlist.clone()).unwrap_or_default(),
        tokens,
    };
    let seal = build(app, sandbox_id, &mut entry)?;
    // Stored before it is published, so a sandbox whose tokens work can always be restored.
    persist(app, sandbox_id, &entry)?;
    publish(publisher, seal)?;
    sandboxes.insert(sandbox_id.to_string(), entry);
    Ok(())
}

fn publish(publisher: &dyn SealPublisher, seal: SandboxSeal) -> Result<(), AppError> {
    publisher
        .publish(seal)
        .map_err(|e| AppError::internal(format!("cannot register sealed tokens with the proxy: {e}")))
}

/// What the proxy applies to running sandbox `sandbox_id` now: its egress allowlist and the
/// names of the secrets it holds tokens for. None when it is not registered (not running).
pub fn published(app: &App, sandbox_id: &str) -> Option<(Vec<String>, Vec<String>)> {
    let sandboxes = app.lifecycle.seals().lock();
    sandboxes.get(sandbox_id).map(|e| (e.egress_allowlist.clone(), e.tokens.keys().cloned().collect()))
}

/// Withdraws a sandbox's registration and forgets it; unknown sandboxes are fine.
pub fn detach(app: &App, publisher: &dyn SealPublisher, sandbox_id: &str) {
    let mut sandboxes = app.lifecycle.seals().lock();
    sandboxes.remove(sandbox_id);
    publisher.withdraw(sandbox_id);
}

/// Re-publishes every running sandbox of `project_id` from the store's current state. Call it
/// after the change has committed. A sandbox that cannot be re-published is withdrawn (no
/// egress until the next successful change) rather than left substituting an old value, and the
/// error names it.
pub fn republish_project(app: &App, project_id: &str) -> Result<(), AppError> {
    // Without a runtime no sandbox runs, so there is nothing to update.
    let Ok(backend) = app.lifecycle.backend() else { return Ok(()) };
    let mut sandboxes = app.lifecycle.seals().lock();
    let mut failed = Vec::new();
    for (id, entry) in sandboxes.iter_mut().filter(|(_, e)| e.project_id.as_deref() == Some(project_id)) {
        let before = entry.tokens.len();
        let outcome = build(app, id, entry)
            .and_then(|seal| backend.publisher.publish(seal).map_err(AppError::internal))
            // A dropped token must stay dropped after a restart too.
            .and_then(|()| if entry.tokens.len() == before { Ok(()) } else { persist(app, id, entry) });
        if let Err(e) = outcome {
            backend.publisher.withdraw(id);
            println!(
                "appliance: sandbox {id}: could not update its sealed tokens ({}); its egress is withdrawn",
                e.message
            );
            failed.push(format!("{id}: {}", e.message));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(AppError::internal(format!(
            "the change is stored, but {} running sandbox(es) could not be updated and have no egress until the next change: {}",
            failed.len(),
            failed.join("; ")
        )))
    }
}

/// The bindings `entry`'s sandbox should have now. Tokens of secrets that no longer exist are
/// forgotten, so re-creating a deleted secret does not revive them.
fn build(app: &App, sandbox_id: &str, entry: &mut Entry) -> Result<SandboxSeal, AppError> {
    let mut seal = SandboxSeal {
        sandbox_id: sandbox_id.to_string(),
        cid: entry.cid,
        egress_allowlist: Vec::new(),
        bindings: Vec::new(),
    };
    let Some(project_id) = entry.project_id.clone() else {
        seal.egress_allowlist.clone_from(&entry.egress_allowlist);
        return Ok(seal);
    };
    let names: Vec<String> = entry.tokens.keys().cloned().collect();
    let (project, found) = app.store.read(|rtxn, dbs| {
        let Some(project) = dbs.projects.get(rtxn, &project_id)? else { return Ok((None, Vec::new())) };
        let mut found = Vec::with_capacity(names.len());
        for name in names {
            let key = secret_key(&project_id, &name);
            if let Some(blob) = dbs.secrets.get(rtxn, &key)? {
                let hosts = dbs.secret_hosts.get(rtxn, &key)?.map(|r| r.allowed_hosts).unwrap_or_default();
                found.push((name, blob.to_vec(), hosts));
            }
        }
        Ok((Some(project), found))
    })?;
    if let Some(project) = project {
        entry.egress_allowlist = project.egress_allowlist;
    }
    entry.tokens.retain(|name, _| found.iter().any(|(n, _, _)| n == name));
    seal.egress_allowlist.clone_from(&entry.egress_allowlist);
    for (name, blob, hosts) in found {
        let Some(token) = entry.tokens.get(&name) else { continue };
        let value = app
            .keyring
            .open(&blob, &secret_associated_data(&project_id, &name))
            .map_err(|e| AppError::internal(format!("cannot decrypt secret {name}: {e}")))?;
        // A secret with its own hosts reaches exactly those (the proxy still requires the egress
        // allowlist to admit the host); one without follows its project's allowlist. Empty
        // means nowhere: the proxy fails closed.
        let allowed_hosts = if hosts.is_empty() { entry.egress_allowlist.clone() } else { hosts };
        seal.bindings.push(SealedBinding { token: token.clone(), secret_name: name, value, allowed_hosts });
    }
    Ok(seal)
}

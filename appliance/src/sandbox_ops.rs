//! Operations on sandboxes: create (secret names -> sealed tokens -> boot -> publish -> env ->
//! record), stop at `endAt` (or hibernate, `hibernation`) or on DELETE, timeout changes, and
//! reconciliation after a restart. Every failure path undoes what was already done, so nothing
//! is half-made; the capacity a create reserved is handed back on every path that ends a
//! sandbox. Changes of one sandbox's state hold its `Lifecycle::transition`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use heed::RwTxn;
use zeroize::Zeroizing;

use crate::app::App;
use crate::clock::now_unix;
use crate::error::AppError;
use crate::hibernation;
use crate::lifecycle::{new_id, runtime_error, Backend};
use crate::runtime::{BootSpec, Booted, EnvVars, RuntimeError, SandboxRuntime};
use crate::sandbox_envs;
use crate::seal::mint_token;
use crate::seal_sync;
use crate::store::records::{ProjectRecord, SandboxRecord, SandboxStatus, NO_DEADLINE};
use crate::store::Dbs;

/// A fully resolved create request (defaults already merged).
pub struct CreateSpec {
    pub template: String,
    pub cpu_count: u32,
    pub memory_mb: u32,
    /// Root disk size; None keeps the template's.
    pub disk_mb: Option<u32>,
    pub timeout_sec: u64,
    pub envs: BTreeMap<String, Zeroizing<String>>,
    pub metadata: BTreeMap<String, String>,
    pub project: Option<ProjectRecord>,
    /// What the idle timeout does: hibernate (true) or stop.
    pub hibernate_on_idle: bool,
}

/// Mints a sealed token for each of the project's secrets, except those the request's own
/// `envs` override. Returns the sandbox environment and secret name -> token; the values are
/// read when the bindings are published (`seal_sync::attach`), after the boot.
fn mint_project_tokens(
    app: &App,
    project: &ProjectRecord,
    overridden: &BTreeMap<String, Zeroizing<String>>,
) -> Result<(EnvVars, BTreeMap<String, String>), AppError> {
    let names: Vec<String> = app.store.read(|rtxn, dbs| {
        let prefix = format!("{}/", project.id);
        let mut out = Vec::new();
        for item in dbs.secrets.prefix_iter(rtxn, &prefix)? {
            let name = item?.0[prefix.len()..].to_string();
            if !overridden.contains_key(&name) {
                out.push(name);
            }
        }
        Ok(out)
    })?;
    let mut envs = EnvVars::new();
    let mut tokens = BTreeMap::new();
    for name in names {
        let token = mint_token().map_err(|e| AppError::internal(e.to_string()))?;
        envs.push((name.clone(), Zeroizing::new(token.clone())));
        tokens.insert(name, token);
    }
    Ok((envs, tokens))
}

/// A new sandbox's environment; later entries win: its template's (an image's `Env`), then the
/// project's tokens, then the request's envs.
fn initial_env(app: &App, spec: &CreateSpec, tokens: EnvVars) -> Result<EnvVars, AppError> {
    let mut envs: EnvVars = crate::templates::defaults(app, &spec.template)?
        .env
        .into_iter()
        .map(|(name, value)| (name, Zeroizing::new(value)))
        .collect();
    envs.extend(tokens);
    for (name, value) in &spec.envs {
        envs.push((name.clone(), value.clone()));
    }
    Ok(envs)
}

pub fn create(app: &App, spec: CreateSpec) -> Result<SandboxRecord, AppError> {
    create_with(app, spec, &|runtime, boot_spec| runtime.boot(boot_spec))
}

/// A create whose guest is started by `start` (a boot, or a fork of a checkpoint); the rest (its
/// record, tokens, environment, capacity, undoing on failure) is the same.
pub(crate) fn create_with(
    app: &App,
    spec: CreateSpec,
    start: &dyn Fn(&dyn SandboxRuntime, &BootSpec) -> Result<Booted, RuntimeError>,
) -> Result<SandboxRecord, AppError> {
    let backend = app.lifecycle.backend()?.clone();
    // Admitted before anything is minted or booted; every early return below drops the
    // reservation, which hands its memory back.
    let reservation = app.capacity.admit(spec.cpu_count, spec.memory_mb)?;
    if let Some(disk_mb) = spec.disk_mb {
        // Sparse until written, but one sandbox must be able to fill it without filling the disk.
        app.capacity.check_disk_for(u64::from(disk_mb), &format!("a {disk_mb} MiB root disk"))?;
    }
    let id = new_id()?;
    let (tokens_env, tokens) = match &spec.project {
        Some(project) => mint_project_tokens(app, project, &spec.envs)?,
        None => (EnvVars::new(), BTreeMap::new()),
    };
    let envs = initial_env(app, &spec, tokens_env)?;

    let now = now_unix();
    let deadline = |now: i64| idle_deadline(now, Some(spec.timeout_sec));
    let mut record = SandboxRecord {
        id: id.clone(),
        template: spec.template.clone(),
        status: SandboxStatus::Starting,
        started_at: now,
        end_at: deadline(now),
        idle_timeout_sec: Some(spec.timeout_sec),
        cpu_count: spec.cpu_count,
        memory_mb: spec.memory_mb,
        disk_mb: spec.disk_mb.unwrap_or(0),
        metadata: spec.metadata.clone(),
        project: spec.project.as_ref().map(|p| p.name.clone()),
        project_id: spec.project.as_ref().map(|p| p.id.clone()),
        cid: 0,
        hibernate_on_idle: spec.hibernate_on_idle,
    };
    // Recorded before the VMM exists: a restart at any later point finds the record (reconcile).
    store_record(app, &record)?;
    let forget_record = || {
        let id = id.clone();
        if let Err(e) = app.store.write(move |wtxn, dbs| remove_record(wtxn, dbs, &id).map(|_| ())) {
            println!("appliance: sandbox {}: cannot remove the record of a failed create: {}", record.id, e.message);
        }
        backend.runtime.forget(&record.id);
    };

    let boot_spec = BootSpec {
        sandbox_id: id.clone(),
        template: spec.template.clone(),
        cpu_count: spec.cpu_count,
        memory_mb: spec.memory_mb,
        disk_mb: spec.disk_mb,
    };
    let started = Instant::now();
    let booted = match start(&*backend.runtime, &boot_spec) {
        Ok(b) => b,
        Err(e) => {
            app.metrics.record_boot_failure();
            println!("appliance: sandbox {id} boot failed: {e}");
            forget_record();
            return Err(runtime_error(e));
        }
    };
    app.metrics.record_boot(started.elapsed());

    let undo = |publish_done: bool| {
        if publish_done {
            seal_sync::detach(app, &*backend.publisher, &id);
        }
        if let Err(e) = backend.runtime.stop(&id) {
            println!("appliance: sandbox {id}: cleanup stop failed: {e}");
        }
        forget_record();
    };
    if let Err(e) = seal_sync::attach(app, &*backend.publisher, &id, booted.cid, spec.project.as_ref(), tokens) {
        undo(false);
        return Err(e);
    }
    if let Err(e) = hand_over_env(app, &*backend.runtime, &id, &envs) {
        undo(true);
        return Err(e);
    }
    drop(envs);

    // Times count from when the sandbox is ready, as before records were written early.
    let now = now_unix();
    record.status = SandboxStatus::Running;
    record.started_at = now;
    record.end_at = deadline(now);
    record.cid = booted.cid;
    record.disk_mb = booted.disk_mb;
    // Held under the id before the record says running, so a DELETE or reaper stop that finds
    // it always finds something to release.
    reservation.commit(&id);
    if let Err(e) = store_record(app, &record) {
        undo(true);
        app.capacity.release(&id);
        return Err(e);
    }
    app.lifecycle.track(&id, record.end_at, record.idle_timeout_sec);
    println!(
        "appliance: sandbox {id} running (template {}, {} vCPU, {} MiB, {} MiB disk, cid {}, ends {})",
        record.template,
        record.cpu_count,
        record.memory_mb,
        record.disk_mb,
        record.cid,
        if record.end_at == NO_DEADLINE { "never".into() } else { crate::clock::rfc3339(record.end_at) }
    );
    Ok(record)
}

/// Stops a sandbox's VMM (or drops its hibernation snapshot), withdraws its tokens and records
/// `status`. Safe to call for a sandbox that is already gone.
pub fn stop(app: &App, id: &str, status: SandboxStatus, why: &str) -> Result<(), AppError> {
    let _changing = app.lifecycle.transition(id);
    stop_locked(app, id, status, why)
}

/// `stop`, for a caller that holds the sandbox's transition.
pub(crate) fn stop_locked(app: &App, id: &str, status: SandboxStatus, why: &str) -> Result<(), AppError> {
    // Untracked first, so the reaper does not report this VMM's end as a crash.
    app.lifecycle.untrack(id);
    if let Ok(backend) = app.lifecycle.backend() {
        if let Err(e) = backend.runtime.stop(id) {
            println!("appliance: sandbox {id}: stop failed: {e}");
        }
        seal_sync::detach(app, &*backend.publisher, id);
    }
    // The VMM is gone, so is its guest memory; a no-op for a sandbox already released.
    app.capacity.release(id);
    app.exec_sessions.forget_sandbox(id);
    let id_owned = id.to_string();
    app.store.write(move |wtxn, dbs| record_end(wtxn, dbs, &id_owned, status))?;
    println!("appliance: sandbox {id} {} ({why})", status.as_str());
    Ok(())
}

/// Hands the guest its environment, and keeps a sealed copy for a restart of the guest
/// (`restart`), which comes back without it.
fn hand_over_env(app: &App, runtime: &dyn SandboxRuntime, id: &str, envs: &EnvVars) -> Result<(), AppError> {
    runtime.set_env(id, envs).map_err(runtime_error)?;
    sandbox_envs::store(app, id, envs)
}

/// The machine a stored sandbox runs on (for a restart or a wake: the record's resources).
pub(crate) fn boot_spec_of(record: &SandboxRecord) -> BootSpec {
    BootSpec {
        sandbox_id: record.id.clone(),
        template: record.template.clone(),
        cpu_count: record.cpu_count,
        memory_mb: record.memory_mb,
        disk_mb: Some(record.disk_mb).filter(|d| *d != 0),
    }
}

/// Restarts a running sandbox's guest from its own root disk (`POST .../reboot`): the files
/// stay, processes and memory do not. The guest gets back the environment it was created with
/// and keeps its vsock CID, so its tokens stay registered with the proxy as they were. A
/// restart that fails leaves the sandbox stopped with the error.
pub fn restart(app: &App, id: &str) -> Result<SandboxRecord, AppError> {
    let _changing = app.lifecycle.transition(id);
    let (backend, record) = require_running(app, id)?;
    let envs = sandbox_envs::load(app, id)?;
    let spec = boot_spec_of(&record);
    // Untracked meanwhile, so the reaper does not take the old VMM's end for a crash.
    app.lifecycle.untrack(id);
    app.exec_sessions.forget_sandbox(id);
    let started = Instant::now();
    let restarted = backend.runtime.restart(&spec).map_err(runtime_error).and_then(|booted| {
        if booted.cid != record.cid {
            return Err(AppError::internal(format!(
                "the restarted guest got CID {} instead of {}",
                booted.cid, record.cid
            )));
        }
        backend.runtime.set_env(id, &envs).map_err(runtime_error)
    });
    drop(envs);
    if let Err(e) = restarted {
        app.metrics.record_boot_failure();
        println!("appliance: sandbox {id}: restart failed: {}", e.message);
        stop_locked(app, id, SandboxStatus::Error, "restart failed")?;
        return Err(e);
    }
    app.metrics.record_boot(started.elapsed());
    // The idle timeout starts again from the restart; a sandbox without one stays without.
    let now = now_unix();
    let end_at = match record.idle_timeout_sec {
        Some(0) => NO_DEADLINE,
        Some(idle) => now.saturating_add(i64::try_from(idle).unwrap_or(i64::MAX)),
        None => record.end_at,
    };
    app.lifecycle.track(id, end_at, record.idle_timeout_sec);
    println!("appliance: sandbox {id} restarted in {:.1}s", started.elapsed().as_secs_f64());
    get(app, id)
}

/// DELETE: stops the sandbox (or drops its hibernation snapshot) if needed and removes its
/// record.
pub fn delete(app: &App, id: &str) -> Result<(), AppError> {
    let _changing = app.lifecycle.transition(id);
    let record = get(app, id)?;
    if matches!(record.status, SandboxStatus::Running | SandboxStatus::Hibernated) {
        stop_locked(app, id, SandboxStatus::Stopped, "deleted")?;
    }
    let id_owned = id.to_string();
    app.store.write(move |wtxn, dbs| {
        if !remove_record(wtxn, dbs, &id_owned)? {
            return Err(AppError::not_found(format!("sandbox {id_owned} not found")));
        }
        Ok(())
    })?;
    if let Ok(backend) = app.lifecycle.backend() {
        backend.runtime.forget(id);
    }
    Ok(())
}

pub(crate) fn store_record(app: &App, record: &SandboxRecord) -> Result<(), AppError> {
    let record = record.clone();
    app.store.write(move |wtxn, dbs| Ok(dbs.sandboxes.put(wtxn, &record.id, &record)?))
}

/// Removes a sandbox's record and its stored tokens; false if there was no record.
fn remove_record(wtxn: &mut RwTxn, dbs: &Dbs, id: &str) -> Result<bool, AppError> {
    let existed = dbs.sandboxes.delete(wtxn, id)?;
    dbs.sandbox_seals.delete(wtxn, id)?;
    dbs.sandbox_seals.delete(wtxn, &sandbox_envs::key(id))?;
    Ok(existed)
}

/// Records that a sandbox ended with `status` (unless its record already says it ended) and
/// drops its stored tokens, which mean nothing any more.
fn record_end(wtxn: &mut RwTxn, dbs: &Dbs, id: &str, status: SandboxStatus) -> Result<(), AppError> {
    if let Some(mut record) = dbs.sandboxes.get(wtxn, id)? {
        if !record.status.has_ended() {
            record.status = status;
            // endAt says when it ended, which may be before its timeout.
            record.end_at = record.end_at.min(now_unix());
            dbs.sandboxes.put(wtxn, id, &record)?;
        }
    }
    dbs.sandbox_seals.delete(wtxn, id)?;
    dbs.sandbox_seals.delete(wtxn, &sandbox_envs::key(id))?;
    Ok(())
}

pub fn get(app: &App, id: &str) -> Result<SandboxRecord, AppError> {
    app.store
        .read(|rtxn, dbs| Ok(dbs.sandboxes.get(rtxn, id)?))?
        .ok_or_else(|| AppError::not_found(format!("sandbox {id} not found")))
}

/// The record and backend of a sandbox that must be running for the operation.
pub fn require_running<'a>(app: &'a App, id: &str) -> Result<(&'a Backend, SandboxRecord), AppError> {
    let record = get(app, id)?;
    let backend = app.lifecycle.backend()?;
    if record.status != SandboxStatus::Running {
        return Err(AppError::conflict(format!("sandbox {id} is {}", record.status.as_str())));
    }
    Ok((backend, record))
}

/// When a sandbox with idle timeout `idle_sec` (0 or None: none) that is used at `now` ends.
pub(crate) fn idle_deadline(now: i64, idle_sec: Option<u64>) -> i64 {
    match idle_sec {
        None | Some(0) => NO_DEADLINE,
        Some(t) => now.saturating_add(i64::try_from(t).unwrap_or(i64::MAX)),
    }
}

/// Makes `timeout_sec` the sandbox's idle timeout, counted from now (0: no automatic stop). A
/// hibernated sandbox keeps it for when it is woken (its timeout does not run meanwhile).
pub fn set_timeout(app: &App, id: &str, timeout_sec: u64) -> Result<SandboxRecord, AppError> {
    let _changing = app.lifecycle.transition(id);
    set_timeout_locked(app, id, timeout_sec)
}

/// `set_timeout`, for a caller that holds the sandbox's transition.
pub(crate) fn set_timeout_locked(app: &App, id: &str, timeout_sec: u64) -> Result<SandboxRecord, AppError> {
    let end_at = idle_deadline(now_unix(), Some(timeout_sec));
    let id_owned = id.to_string();
    let record = app.store.write(move |wtxn, dbs| {
        let mut record = dbs
            .sandboxes
            .get(wtxn, &id_owned)?
            .ok_or_else(|| AppError::not_found(format!("sandbox {id_owned} not found")))?;
        match record.status {
            SandboxStatus::Running => record.end_at = end_at,
            SandboxStatus::Hibernated => {}
            other => return Err(AppError::conflict(format!("sandbox {id_owned} is {}", other.as_str()))),
        }
        record.idle_timeout_sec = Some(timeout_sec);
        dbs.sandboxes.put(wtxn, &id_owned, &record)?;
        Ok(record)
    })?;
    if record.status == SandboxStatus::Running {
        app.lifecycle.track(id, record.end_at, record.idle_timeout_sec);
    }
    Ok(record)
}

/// After a restart, the one reconcile of the store with the VMMs and hibernation snapshots the
/// runtime found, both ways:
/// - a running record whose VMM lives is adopted: its memory is committed, its timeout tracked,
///   and its sealed tokens registered with the proxy again (from the store);
/// - a running record without a VMM but with a complete snapshot (the appliance stopped between
///   keeping the snapshot and recording it) is hibernated; without a snapshot it is `stopped`;
/// - a hibernated record keeps its snapshot and its tokens are registered again (no VMM, no
///   memory); without its snapshot it is `stopped`; with a VMM (a wake cut short, whose guest
///   has run on from the snapshot, which is therefore stale) it is `error` and the VMM stopped;
/// - a record still `starting` (the appliance stopped in the middle of its create, whose client
///   got no answer) is marked `error` and its VMM, if any, stopped;
/// - a VMM without a running record is stopped, a snapshot without a hibernated record dropped.
pub fn reconcile_after_start(app: &App) -> Result<(), AppError> {
    let records: Vec<SandboxRecord> = app.store.read(|rtxn, dbs| {
        let mut out = Vec::new();
        for item in dbs.sandboxes.iter(rtxn)? {
            let (_, record) = item?;
            if !record.status.has_ended() {
                out.push(record);
            }
        }
        Ok(out)
    })?;
    let backend = app.lifecycle.backend().ok();
    let snapshots: std::collections::HashSet<String> =
        backend.map(|b| b.runtime.hibernated_ids().into_iter().collect()).unwrap_or_default();
    let mut adopted = std::collections::HashSet::new();
    let mut kept_hibernated = std::collections::HashSet::new();
    let mut ended = Vec::new();
    for record in records {
        let alive = backend.is_some_and(|b| b.runtime.is_alive(&record.id));
        let snapshot = snapshots.contains(&record.id);
        match (record.status, backend) {
            (SandboxStatus::Running, Some(b)) if alive => {
                app.capacity.adopt(&record.id, record.cpu_count, record.memory_mb);
                // Activity while the appliance was down is unknown: an idle clock starts again.
                app.lifecycle.track(&record.id, record.end_at, record.idle_timeout_sec);
                app.lifecycle.touch(&record.id, now_unix());
                register_again(app, b, &record, "adopted");
                adopted.insert(record.id);
            }
            (SandboxStatus::Running | SandboxStatus::Hibernated, Some(b)) if !alive && snapshot => {
                if record.status == SandboxStatus::Running {
                    hibernation::record_hibernated(app, record.clone())?;
                    println!(
                        "appliance: sandbox {}: its VMM had written its snapshot when the appliance stopped; hibernated",
                        record.id
                    );
                }
                register_again(app, b, &record, "hibernated");
                kept_hibernated.insert(record.id);
            }
            (SandboxStatus::Hibernated, Some(b)) if alive => {
                println!(
                    "appliance: sandbox {}: a wake was cut short by the restart; its guest ran on from a snapshot that is now stale, so it ends as error",
                    record.id
                );
                if let Err(e) = b.runtime.stop(&record.id) {
                    println!("appliance: sandbox {}: cannot stop its half-woken VMM: {e}", record.id);
                }
                ended.push((record.id, SandboxStatus::Error));
            }
            (SandboxStatus::Hibernated, _) => {
                println!(
                    "appliance: sandbox {}: hibernated, but no complete snapshot of it was found on the data disk; marked stopped",
                    record.id
                );
                ended.push((record.id, SandboxStatus::Stopped));
            }
            (SandboxStatus::Starting, _) => {
                if let (true, Some(b)) = (alive, backend) {
                    if let Err(e) = b.runtime.stop(&record.id) {
                        println!("appliance: sandbox {}: cannot stop its half-created VMM: {e}", record.id);
                    }
                }
                ended.push((record.id, SandboxStatus::Error));
            }
            _ => ended.push((record.id, SandboxStatus::Stopped)),
        }
    }
    if let Some(b) = backend {
        for id in b.runtime.running_ids() {
            if !adopted.contains(&id) {
                println!("appliance: sandbox {id}: its VMM has no running record; stopping it");
                if let Err(e) = b.runtime.stop(&id) {
                    println!("appliance: sandbox {id}: stop failed: {e}");
                }
            }
        }
        for id in snapshots.iter().filter(|id| !kept_hibernated.contains(*id)) {
            println!("appliance: sandbox {id}: its hibernation snapshot has no hibernated record; removing it");
            if let Err(e) = b.runtime.stop(id) {
                println!("appliance: sandbox {id}: cannot remove its snapshot: {e}");
            }
        }
    }
    if ended.is_empty() {
        return Ok(());
    }
    let count = ended.len();
    app.store.write(move |wtxn, dbs| ended.iter().try_for_each(|(id, status)| record_end(wtxn, dbs, id, *status)))?;
    println!("appliance: {count} sandbox(es) from before the restart have no VMM or snapshot any more or never finished starting; marked ended");
    Ok(())
}

/// Registers a sandbox found after a restart (running, or hibernated and so woken with the same
/// CID) with the proxy again, from its sealed tokens in the store.
fn register_again(app: &App, backend: &Backend, record: &SandboxRecord, what: &str) {
    match seal_sync::restore(app, &*backend.publisher, &record.id, record.cid) {
        Ok(Some(tokens)) => println!(
            "appliance: sandbox {}: {what}, {tokens} sealed token(s) registered with the proxy again",
            record.id
        ),
        Ok(None) => println!(
            "appliance: sandbox {}: {what}; no sealed tokens were stored for it (created by an older version), so it has no egress",
            record.id
        ),
        Err(e) => println!(
            "appliance: sandbox {}: {what}, but its sealed tokens could not be registered ({}); it has no egress",
            record.id, e.message
        ),
    }
}

/// One pass of the reaper: sandboxes past `endAt` are stopped, or hibernated on threads of their
/// own (returned, so the reaper can wait for them before it ends) when their record says so;
/// VMMs that died are recorded.
pub fn reap(app: &Arc<App>) -> Vec<std::thread::JoinHandle<()>> {
    let mut hibernating = Vec::new();
    for id in app.lifecycle.expired(now_unix()) {
        let hibernates = get(app, &id).is_ok_and(|r| r.hibernate_on_idle && r.status == SandboxStatus::Running);
        if hibernates {
            // Held from here, so the next passes leave it alone while its snapshot is written.
            let Some(changing) = app.lifecycle.try_transition(&id) else { continue };
            let worker = Arc::clone(app);
            let spawned = std::thread::Builder::new()
                .name("idle-hibernate".into())
                .spawn(move || hibernation::on_idle(&worker, &id, changing));
            match spawned {
                Ok(handle) => hibernating.push(handle),
                Err(e) => println!("appliance: cannot start an idle hibernation: {e}; retried at the next pass"),
            }
            continue;
        }
        if let Err(e) = stop(app, &id, SandboxStatus::Stopped, "timeout reached") {
            println!("appliance: sandbox {id}: could not record timeout stop: {}", e.message);
        }
    }
    let Ok(backend) = app.lifecycle.backend() else { return hibernating };
    for id in app.lifecycle.live_ids() {
        if !backend.runtime.is_alive(&id) {
            let (status, why) = match backend.runtime.exit_description(&id) {
                Some((true, why)) => (SandboxStatus::Stopped, why),
                Some((false, why)) => (SandboxStatus::Error, why),
                None => (SandboxStatus::Error, "VMM exited unexpectedly".to_string()),
            };
            if let Err(e) = stop(app, &id, status, &why) {
                println!("appliance: sandbox {id}: could not record exit: {}", e.message);
            }
        }
    }
    hibernating
}

/// Deletes the records of sandboxes that ended more than `retention` ago; returns how many.
pub fn purge_stopped(app: &App, now: i64, retention: Duration) -> Result<usize, AppError> {
    let cutoff = now.saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
    let old = app.store.write(move |wtxn, dbs| {
        let mut old = Vec::new();
        for item in dbs.sandboxes.iter(wtxn)? {
            let (id, record) = item?;
            if record.status.has_ended() && record.end_at <= cutoff {
                old.push(id.to_string());
            }
        }
        for id in &old {
            dbs.sandboxes.delete(wtxn, id)?;
        }
        Ok(old)
    })?;
    // Their kept console logs go with them.
    if let Ok(backend) = app.lifecycle.backend() {
        for id in &old {
            backend.runtime.forget(id);
        }
    }
    Ok(old.len())
}

/// How often the reaper looks for stopped sandboxes to forget.
const PURGE_PERIOD: Duration = Duration::from_secs(5);

/// Runs `reap` every `period`, and `purge_stopped` every few seconds, until `stop_flag` is set.
pub fn spawn_reaper(
    app: Arc<App>,
    stop_flag: Arc<AtomicBool>,
    period: Duration,
    retention: Duration,
) -> Option<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("sandbox-reaper".into())
        .spawn(move || {
            let mut last_purge = std::time::Instant::now();
            let mut hibernating: Vec<std::thread::JoinHandle<()>> = Vec::new();
            while !stop_flag.load(Ordering::Relaxed) {
                hibernating.retain(|h| !h.is_finished());
                hibernating.extend(reap(&app));
                if last_purge.elapsed() >= PURGE_PERIOD {
                    last_purge = std::time::Instant::now();
                    match purge_stopped(&app, now_unix(), retention) {
                        Ok(0) => {}
                        Ok(n) => println!(
                            "appliance: forgot {n} sandbox record(s) that ended over {}s ago",
                            retention.as_secs()
                        ),
                        Err(e) => println!("appliance: could not purge stopped sandboxes: {}", e.message),
                    }
                }
                std::thread::sleep(period);
            }
            // Each is bounded by the runtime's deadlines; the store must not close under them.
            for handle in hibernating {
                let _ = handle.join();
            }
        })
        .ok()
}

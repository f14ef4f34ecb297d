//! Checkpoints of sandboxes (named, per sandbox), restoring one in place, and forks: new
//! sandboxes started from one. A checkpoint is written while its sandbox's transition is held
//! (so no hibernation or other snapshot shares the VMM's snapshot files with it); its files are
//! complete and durable before its record is stored, so every record has usable files, and files
//! without a record (a crash between the two) are removed at the next start (`reconcile`).
//!
//! A fork is a create whose guest resumes the checkpoint instead of booting (`sandbox_ops::
//! create_with`): a new id and vsock CID, a copy-on-write clone of the checkpoint's disk, and
//! tokens minted for it. The checkpointed guest's memory still holds its sandbox's tokens, but
//! the proxy substitutes a token only for the CID it was minted for, so those mean nothing in
//! the fork; its environment gets its own under the same names.

use std::time::Instant;

use crate::app::App;
use crate::clock::now_unix;
use crate::error::AppError;
use crate::hibernation;
use crate::lifecycle::{new_id, runtime_error};
use crate::sandbox_envs;
use crate::sandbox_ops::{self, idle_deadline, CreateSpec};
use crate::store::records::{CheckpointKind, CheckpointRecord, SandboxRecord, SandboxStatus};

/// How many checkpoints of each kind a sandbox may have, as OpenComputer allows.
pub fn limit(kind: CheckpointKind) -> usize {
    match kind {
        CheckpointKind::Full => 10,
        CheckpointKind::DiskOnly => 100,
    }
}

pub struct NewCheckpoint {
    pub name: String,
    pub kind: CheckpointKind,
    /// At the limit, delete the oldest of the same kind first (`retentionPolicy` `delete_oldest`)
    /// so that at most this many remain, the new one included.
    pub keep_at_most: Option<usize>,
}

/// Writes a checkpoint of a running (or hibernated: woken first) sandbox.
pub fn create(app: &App, sandbox_id: &str, new: NewCheckpoint) -> Result<CheckpointRecord, AppError> {
    let _changing = app.lifecycle.transition(sandbox_id);
    let mut record = sandbox_ops::get(app, sandbox_id)?;
    if record.status == SandboxStatus::Hibernated {
        record = hibernation::wake_locked(app, sandbox_id, None)?;
    }
    let backend = sandbox_ops::require_running(app, sandbox_id)?.0;
    let existing = list(app, sandbox_id)?;
    if existing.iter().any(|c| c.name == new.name) {
        return Err(AppError::conflict(format!("sandbox {sandbox_id} already has a checkpoint named {:?}", new.name)));
    }
    let same_kind: Vec<&CheckpointRecord> = existing.iter().filter(|c| c.kind == new.kind).collect();
    let allowed = new.keep_at_most.unwrap_or(limit(new.kind)).min(limit(new.kind));
    if same_kind.len() >= allowed {
        if new.keep_at_most.is_none() {
            return Err(AppError::bad_request(format!(
                "sandbox {sandbox_id} has {} {} checkpoints, the most it may have; delete one, or pass retentionPolicy {{\"mode\": \"delete_oldest\"}}",
                same_kind.len(),
                new.kind.as_str()
            )));
        }
        // `list` is oldest first.
        for old in &same_kind[..=same_kind.len() - allowed] {
            delete_locked(app, old)?;
        }
    }
    // Memory as much as the guest has, and what of the disk diverges later.
    let size_mb = match new.kind {
        CheckpointKind::Full => u64::from(record.memory_mb),
        CheckpointKind::DiskOnly => 0,
    };
    app.capacity.check_disk_for(size_mb, &format!("a checkpoint of sandbox {sandbox_id}"))?;
    let id = new_id()?;
    let started = Instant::now();
    let size_bytes = backend.runtime.checkpoint(sandbox_id, &id, new.kind).map_err(runtime_error)?;
    let checkpoint = CheckpointRecord {
        id: id.clone(),
        sandbox_id: sandbox_id.to_string(),
        name: new.name,
        kind: new.kind,
        size_bytes,
        created_at: now_unix(),
        created_at_ns: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
        template: record.template.clone(),
        cpu_count: record.cpu_count,
        memory_mb: record.memory_mb,
        disk_mb: record.disk_mb,
        project: record.project.clone(),
        project_id: record.project_id.clone(),
        hibernate_on_idle: record.hibernate_on_idle,
        metadata: record.metadata.clone(),
    };
    let stored = checkpoint.clone();
    if let Err(e) = app.store.write(move |wtxn, dbs| Ok(dbs.checkpoints.put(wtxn, &stored.id, &stored)?)) {
        let _ = backend.runtime.delete_checkpoint(&id);
        return Err(e);
    }
    println!(
        "appliance: sandbox {sandbox_id}: checkpoint {id} ({}, {} KiB) written in {:.1}s",
        checkpoint.kind.as_str(),
        size_bytes >> 10,
        started.elapsed().as_secs_f64()
    );
    Ok(checkpoint)
}

/// The checkpoints of a sandbox (which may be gone), oldest first.
pub fn list(app: &App, sandbox_id: &str) -> Result<Vec<CheckpointRecord>, AppError> {
    let mut all = app.store.read(|rtxn, dbs| {
        let mut out = Vec::new();
        for item in dbs.checkpoints.iter(rtxn)? {
            let (_, record) = item?;
            if record.sandbox_id == sandbox_id {
                out.push(record);
            }
        }
        Ok(out)
    })?;
    all.sort_by_key(|c| c.created_at_ns);
    Ok(all)
}

pub fn get(app: &App, checkpoint_id: &str) -> Result<CheckpointRecord, AppError> {
    let lookup = checkpoint_id.to_string();
    app.store
        .read(move |rtxn, dbs| Ok(dbs.checkpoints.get(rtxn, &lookup)?))?
        .ok_or_else(|| AppError::not_found(format!("checkpoint {checkpoint_id} not found")))
}

/// Checkpoint `checkpoint_id` of sandbox `sandbox_id` (another sandbox's is not found here).
pub fn get_of(app: &App, sandbox_id: &str, checkpoint_id: &str) -> Result<CheckpointRecord, AppError> {
    get(app, checkpoint_id)
        .ok()
        .filter(|c| c.sandbox_id == sandbox_id)
        .ok_or_else(|| AppError::not_found(format!("sandbox {sandbox_id} has no checkpoint {checkpoint_id}")))
}

pub fn delete(app: &App, sandbox_id: &str, checkpoint_id: &str) -> Result<(), AppError> {
    let _changing = app.lifecycle.transition(sandbox_id);
    let checkpoint = get_of(app, sandbox_id, checkpoint_id)?;
    delete_locked(app, &checkpoint)
}

/// The record goes first: files without a record are removed at the next start, a record
/// without files would be a checkpoint that cannot be restored.
fn delete_locked(app: &App, checkpoint: &CheckpointRecord) -> Result<(), AppError> {
    let id = checkpoint.id.clone();
    app.store.write(move |wtxn, dbs| Ok(dbs.checkpoints.delete(wtxn, &id).map(|_| ())?))?;
    if let Ok(backend) = app.lifecycle.backend() {
        if let Err(e) = backend.runtime.delete_checkpoint(&checkpoint.id) {
            println!("appliance: checkpoint {}: its files stay until the next start: {e}", checkpoint.id);
        }
    }
    Ok(())
}

/// Puts a sandbox back to one of its checkpoints: everything since is lost; its id, CID, tokens
/// and idle timeout stay. A hibernated sandbox is woken first. A restore that fails leaves the
/// sandbox stopped with the error.
pub fn restore(app: &App, sandbox_id: &str, checkpoint_id: &str) -> Result<SandboxRecord, AppError> {
    let _changing = app.lifecycle.transition(sandbox_id);
    let checkpoint = get_of(app, sandbox_id, checkpoint_id)?;
    if sandbox_ops::get(app, sandbox_id)?.status == SandboxStatus::Hibernated {
        hibernation::wake_locked(app, sandbox_id, None)?;
    }
    let (backend, record) = sandbox_ops::require_running(app, sandbox_id)?;
    let spec = sandbox_ops::boot_spec_of(&record);
    app.lifecycle.untrack(sandbox_id);
    app.exec_sessions.forget_sandbox(sandbox_id);
    let started = Instant::now();
    let restored =
        backend.runtime.restore_checkpoint(&spec, checkpoint_id, checkpoint.kind).map_err(runtime_error).and_then(
            |booted| {
                if booted.cid != record.cid {
                    return Err(AppError::internal(format!(
                        "the restored guest got CID {} instead of {}",
                        booted.cid, record.cid
                    )));
                }
                match checkpoint.kind {
                    // The checkpointed guest's memory holds its environment.
                    CheckpointKind::Full => Ok(()),
                    // A booted guest gets it as after a restart.
                    CheckpointKind::DiskOnly => {
                        let envs = sandbox_envs::load(app, sandbox_id)?;
                        backend.runtime.set_env(sandbox_id, &envs).map_err(runtime_error)
                    }
                }
            },
        );
    if let Err(e) = restored {
        println!("appliance: sandbox {sandbox_id}: restoring checkpoint {checkpoint_id} failed: {}", e.message);
        sandbox_ops::stop_locked(app, sandbox_id, SandboxStatus::Error, "checkpoint restore failed")?;
        return Err(e);
    }
    let mut record = record;
    record.end_at = idle_deadline(now_unix(), record.idle_timeout_sec);
    sandbox_ops::store_record(app, &record)?;
    app.lifecycle.track(sandbox_id, record.end_at, record.idle_timeout_sec);
    println!(
        "appliance: sandbox {sandbox_id}: checkpoint {checkpoint_id} restored in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(record)
}

/// A fork request, resolved: the checkpoint, and what the caller set.
pub struct ForkSpec {
    pub checkpoint: CheckpointRecord,
    pub timeout_sec: u64,
    pub envs: std::collections::BTreeMap<String, zeroize::Zeroizing<String>>,
    /// The project its tokens are minted for: the checkpoint's, or the one the caller named.
    pub project: Option<crate::store::records::ProjectRecord>,
}

/// Starts a new sandbox from a checkpoint, with the checkpoint's machine (a resumed guest must
/// find the memory and vCPUs it had).
pub fn fork(app: &App, fork: ForkSpec) -> Result<SandboxRecord, AppError> {
    let checkpoint = fork.checkpoint;
    let spec = CreateSpec {
        template: checkpoint.template.clone(),
        cpu_count: checkpoint.cpu_count,
        memory_mb: checkpoint.memory_mb,
        disk_mb: Some(checkpoint.disk_mb).filter(|d| *d != 0),
        timeout_sec: fork.timeout_sec,
        envs: fork.envs,
        metadata: checkpoint.metadata.clone(),
        hibernate_on_idle: fork.project.as_ref().map_or(checkpoint.hibernate_on_idle, |p| p.auto_hibernate),
        project: fork.project,
    };
    let record =
        sandbox_ops::create_with(app, spec, &|runtime, boot| runtime.fork(boot, &checkpoint.id, checkpoint.kind))?;
    println!(
        "appliance: sandbox {} forked from checkpoint {} of sandbox {}",
        record.id, checkpoint.id, checkpoint.sandbox_id
    );
    Ok(record)
}

/// After a start: drops checkpoint files without a record (a crash between writing them and
/// storing it), and records whose files are gone (they could never be restored).
pub fn reconcile(app: &App) -> Result<(), AppError> {
    let Ok(backend) = app.lifecycle.backend() else { return Ok(()) };
    let on_disk = backend.runtime.checkpoint_ids();
    let records: Vec<String> = app.store.read(|rtxn, dbs| {
        let mut ids = Vec::new();
        for item in dbs.checkpoints.iter(rtxn)? {
            ids.push(item?.0.to_string());
        }
        Ok(ids)
    })?;
    for id in on_disk.iter().filter(|id| !records.contains(id)) {
        println!("appliance: checkpoint {id}: files without a record (written when the appliance stopped); removed");
        if let Err(e) = backend.runtime.delete_checkpoint(id) {
            println!("appliance: checkpoint {id}: {e}");
        }
    }
    let missing: Vec<String> = records.into_iter().filter(|id| !on_disk.contains(id)).collect();
    if !missing.is_empty() {
        for id in &missing {
            println!("appliance: checkpoint {id}: its files are gone from the data disk; its record is removed");
        }
        app.store.write(move |wtxn, dbs| {
            for id in &missing {
                dbs.checkpoints.delete(wtxn, id)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

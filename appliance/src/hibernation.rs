//! Hibernate and wake: on request (`POST .../hibernate`, `.../wake`), when the idle timeout of a
//! sandbox whose record says so passes, and transparently before any request that needs the
//! guest. A hibernated sandbox keeps its record, root disk, vsock CID, stored environment and
//! sealed tokens (still registered with the proxy under its CID, so they follow secret changes
//! and work again the moment it wakes); it holds no VMM and no guest memory (its capacity is
//! released), and its idle timeout does not run. Waking is admitted like a create.

use std::time::Instant;

use crate::api::validate;
use crate::app::App;
use crate::clock::now_unix;
use crate::error::AppError;
use crate::lifecycle::{runtime_error, InUse, Transition};
use crate::runtime::Snapshot;
use crate::sandbox_ops::{self, idle_deadline};
use crate::store::records::{SandboxRecord, SandboxStatus, NO_DEADLINE};

/// Hibernates a running sandbox; a hibernated one is left as it is (`None`: nothing written).
pub fn hibernate(app: &App, id: &str) -> Result<(SandboxRecord, Option<Snapshot>), AppError> {
    let _changing = app.lifecycle.transition(id);
    hibernate_locked(app, id, "requested")
}

fn hibernate_locked(app: &App, id: &str, why: &str) -> Result<(SandboxRecord, Option<Snapshot>), AppError> {
    let record = sandbox_ops::get(app, id)?;
    let backend = app.lifecycle.backend()?;
    match record.status {
        SandboxStatus::Hibernated => return Ok((record, None)),
        SandboxStatus::Running => {}
        other => {
            return Err(AppError::conflict(format!(
                "sandbox {id} is {}: only a running sandbox can be hibernated",
                other.as_str()
            )))
        }
    }
    // The snapshot holds at most the guest's memory; it must leave the data disk's reserve free.
    app.capacity.check_disk_for(u64::from(record.memory_mb), &format!("the hibernation snapshot of sandbox {id}"))?;
    let deadline = app.lifecycle.deadline(id);
    // Untracked meanwhile, so the reaper does not take the VMM's end for a crash.
    app.lifecycle.untrack(id);
    let started = Instant::now();
    let snapshot = match backend.runtime.hibernate(id) {
        Ok(snapshot) => snapshot,
        Err(e) => {
            // It runs on; if its VMM died meanwhile, the reaper records how it ended.
            if let Some(end_at) = deadline {
                app.lifecycle.track(id, end_at, record.idle_timeout_sec);
            }
            println!("appliance: sandbox {id}: hibernation failed ({why}): {e}");
            return Err(AppError::internal(format!("sandbox {id} was not hibernated and keeps running: {e}")));
        }
    };
    // Its VMM is gone, so is its guest memory.
    app.capacity.release(id);
    let record = record_hibernated(app, record)?;
    println!(
        "appliance: sandbox {id} hibernated ({why}; {} MiB of memory and {} KiB of state kept, guest paused {} ms, {:.1}s)",
        snapshot.memory_bytes >> 20,
        snapshot.state_bytes >> 10,
        snapshot.paused_ms,
        started.elapsed().as_secs_f64()
    );
    Ok((record, Some(snapshot)))
}

/// Records a sandbox whose complete snapshot is kept as hibernated: no deadline while it holds
/// nothing (`endAt` is null until it wakes).
pub(crate) fn record_hibernated(app: &App, mut record: SandboxRecord) -> Result<SandboxRecord, AppError> {
    record.status = SandboxStatus::Hibernated;
    record.end_at = NO_DEADLINE;
    sandbox_ops::store_record(app, &record)?;
    Ok(record)
}

/// Wakes a hibernated sandbox; `timeout_sec` (if given) becomes its idle timeout. A running one
/// is left running (with the new timeout, if one is given).
pub fn wake(app: &App, id: &str, timeout_sec: Option<u64>) -> Result<SandboxRecord, AppError> {
    let _changing = app.lifecycle.transition(id);
    wake_locked(app, id, timeout_sec)
}

pub(crate) fn wake_locked(app: &App, id: &str, timeout_sec: Option<u64>) -> Result<SandboxRecord, AppError> {
    let mut record = sandbox_ops::get(app, id)?;
    let backend = app.lifecycle.backend()?;
    match record.status {
        SandboxStatus::Running => {
            return match timeout_sec {
                Some(t) => sandbox_ops::set_timeout_locked(app, id, t),
                None => Ok(record),
            }
        }
        SandboxStatus::Hibernated => {}
        other => {
            return Err(AppError::conflict(format!(
                "sandbox {id} is {}: only a hibernated sandbox can be woken",
                other.as_str()
            )))
        }
    }
    // Admitted like a create: a wake that does not fit leaves it hibernated (503).
    let reservation = app.capacity.admit(record.cpu_count, record.memory_mb)?;
    let spec = sandbox_ops::boot_spec_of(&record);
    let started = Instant::now();
    let woken = backend.runtime.wake(&spec).map_err(runtime_error).and_then(|booted| {
        // Its tokens are registered with the proxy under its CID.
        if booted.cid == record.cid {
            Ok(())
        } else {
            Err(AppError::internal(format!("the woken guest got CID {} instead of {}", booted.cid, record.cid)))
        }
    });
    if let Err(e) = woken {
        // Its snapshot cannot be trusted once a guest may have run on from it.
        println!("appliance: sandbox {id}: wake failed: {}", e.message);
        drop(reservation);
        sandbox_ops::stop_locked(app, id, SandboxStatus::Error, "wake failed")?;
        return Err(e);
    }
    // Held under the id before the record says running, as at create.
    reservation.commit(id);
    if let Some(t) = timeout_sec {
        record.idle_timeout_sec = Some(t);
    }
    record.status = SandboxStatus::Running;
    record.end_at = idle_deadline(now_unix(), record.idle_timeout_sec);
    if let Err(e) = sandbox_ops::store_record(app, &record) {
        sandbox_ops::stop_locked(app, id, SandboxStatus::Error, "its wake could not be recorded")?;
        return Err(e);
    }
    app.lifecycle.track(id, record.end_at, record.idle_timeout_sec);
    println!("appliance: sandbox {id} woken in {:.1}s", started.elapsed().as_secs_f64());
    Ok(record)
}

/// The reaper found sandbox `id` idle past its deadline and its record says it hibernates:
/// hibernate it if possible, otherwise stop it (as OpenComputer's idle timeout does).
pub fn on_idle(app: &App, id: &str, changing: Transition) {
    // A request may have used it since the reaper looked, or it may be gone.
    let running = sandbox_ops::get(app, id).is_ok_and(|r| r.status == SandboxStatus::Running);
    if !running || !app.lifecycle.is_expired(id, now_unix()) {
        return;
    }
    if let Err(e) = hibernate_locked(app, id, "idle timeout reached") {
        println!("appliance: sandbox {id}: idle, and it could not be hibernated ({}); stopping it", e.message);
        if let Err(e) = sandbox_ops::stop_locked(app, id, SandboxStatus::Stopped, "timeout reached") {
            println!("appliance: sandbox {id}: could not record timeout stop: {}", e.message);
        }
    }
    drop(changing);
}

/// Whether a request on sandbox `raw_id` would have to wake it (or wait for a change of its
/// state) first: such requests are served off the request workers.
pub fn must_wait(app: &App, raw_id: &str) -> bool {
    let Ok(id) = validate::uuid("sandbox", raw_id) else { return false };
    app.lifecycle.in_transition(&id) || status_of(app, &id) == Some(SandboxStatus::Hibernated)
}

/// Before a request that needs the guest (commands, sessions, terminals, files): wakes the
/// sandbox if it is hibernated, then marks it in use, both while holding its transition, so an
/// idle hibernation cannot slip in between. An invalid or unknown id is left to the handler.
pub fn awake_in_use<'a>(app: &'a App, raw_id: &str) -> Result<InUse<'a>, AppError> {
    let Ok(id) = validate::uuid("sandbox", raw_id) else { return Ok(app.lifecycle.in_use(raw_id)) };
    let _changing = app.lifecycle.transition(&id);
    if status_of(app, &id) == Some(SandboxStatus::Hibernated) {
        wake_locked(app, &id, None)?;
    }
    Ok(app.lifecycle.in_use(&id))
}

fn status_of(app: &App, id: &str) -> Option<SandboxStatus> {
    app.store.read(|rtxn, dbs| Ok(dbs.sandboxes.get(rtxn, id)?.map(|r| r.status))).ok().flatten()
}

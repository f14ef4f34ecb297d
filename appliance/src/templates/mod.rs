//! Templates made on the appliance, beside the ones its image ships: imported from an image
//! archive (`docker save`, OCI layout) or a root filesystem tarball carried in by the operator,
//! or saved from a sandbox's disk. Each is an ext4 disk the runtime keeps with the shipped ones
//! (sandboxes clone it copy-on-write) and a record in the store (where it came from, the image's
//! defaults). Our sandbox PID 1 and agent are never part of a template: the guest boots them from
//! the appliance's own initramfs, so any root filesystem with a shell works.
//!
//! Only the operator makes or deletes templates: a template is visible to every project.

mod ext4;
mod import;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::app::App;
use crate::clock::now_unix;
use crate::error::AppError;
use crate::lifecycle::runtime_error;
use crate::runtime::TemplateDisk;
use crate::store::records::{SandboxStatus, TemplateDefaults, TemplateRecord, TemplateSource};

pub use import::{import, Upload, UploadKind, MAX_ARCHIVE_BYTES};

/// Where imports and saves do their work on the data disk, one directory each, removed when
/// they end (and at start, after a crash).
const WORK_DIR: &str = "template-work";

pub struct Templates {
    work: PathBuf,
    /// One template change at a time: imports are disk-heavy, and a name is checked then taken.
    busy: Mutex<()>,
}

impl Templates {
    /// Clears what a crash left of an import or a save.
    pub fn open(data_dir: &Path) -> Templates {
        let work = data_dir.join(WORK_DIR);
        if work.exists() {
            if let Err(e) = std::fs::remove_dir_all(&work) {
                println!("appliance: cannot remove {}: {e}", work.display());
            }
        }
        Templates { work, busy: Mutex::new(()) }
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // Guards no data: a panic while holding it leaves nothing inconsistent.
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new, empty work directory (removed with `WorkDir`'s drop).
    fn work_dir(&self) -> Result<WorkDir, AppError> {
        let dir = self.work.join(crate::lifecycle::new_id()?);
        std::fs::create_dir_all(&dir)
            .map_err(|e| AppError::internal(format!("cannot create {}: {e}", dir.display())))?;
        Ok(WorkDir(dir))
    }
}

/// A work directory, removed with everything in it when dropped: a refused or failed import
/// leaves nothing on the data disk.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                println!("appliance: cannot remove {}: {e}", self.0.display());
            }
        }
    }
}

/// A template as the API shows it: its disk, and its record when made here.
pub struct TemplateView {
    pub disk: TemplateDisk,
    pub record: Option<TemplateRecord>,
}

fn records(app: &App) -> Result<Vec<TemplateRecord>, AppError> {
    app.store.read(|rtxn, dbs| crate::store::values(&dbs.templates, rtxn))
}

fn record(app: &App, name: &str) -> Result<Option<TemplateRecord>, AppError> {
    let name = name.to_string();
    app.store.read(move |rtxn, dbs| Ok(dbs.templates.get(rtxn, &name)?))
}

pub fn list(app: &App) -> Result<Vec<TemplateView>, AppError> {
    let backend = app.lifecycle.backend()?;
    let mut records = records(app)?;
    Ok(backend
        .runtime
        .templates()
        .into_iter()
        .map(|disk| {
            let record = records.iter().position(|r| r.name == disk.name && !disk.built_in).map(|i| records.remove(i));
            TemplateView { disk, record }
        })
        .collect())
}

pub fn get(app: &App, name: &str) -> Result<TemplateView, AppError> {
    list(app)?
        .into_iter()
        .find(|t| t.disk.name == name)
        .ok_or_else(|| AppError::not_found(format!("template {name:?} not found")))
}

/// What sandboxes of template `name` get by default (nothing for shipped templates).
pub fn defaults(app: &App, name: &str) -> Result<TemplateDefaults, AppError> {
    Ok(record(app, name)?.map(|r| r.defaults).unwrap_or_default())
}

/// Makes a template of sandbox `sandbox_id`'s root disk as it is now (a running guest's file
/// systems are flushed, then it stands still for the copy). Its processes are not part of it;
/// the defaults of the sandbox's own template carry over.
pub fn save_sandbox(app: &App, sandbox_id: &str, name: &str, tag: &str) -> Result<TemplateView, AppError> {
    let backend = app.lifecycle.backend()?;
    let _busy = app.templates.lock();
    ensure_free(app, name)?;
    let sandbox = crate::sandbox_ops::get(app, sandbox_id)?;
    if !matches!(sandbox.status, SandboxStatus::Running | SandboxStatus::Hibernated) {
        return Err(AppError::conflict(format!(
            "sandbox {sandbox_id} is {}: only a running or hibernated sandbox has a disk to save",
            sandbox.status.as_str()
        )));
    }
    let work = app.templates.work_dir()?;
    let disk = work.0.join("disk.ext4");
    let started = std::time::Instant::now();
    // The copy shares its blocks with the sandbox's disk, as the sandbox's shares with its template's.
    backend.runtime.copy_root_disk(sandbox_id, &disk).map_err(runtime_error)?;
    let copied = started.elapsed();
    let now = now_unix();
    let record = TemplateRecord {
        name: name.to_string(),
        tag: tag.to_string(),
        source: TemplateSource::Sandbox,
        source_digest: format!("sandbox:{sandbox_id}"),
        created_at: now,
        defaults: defaults(app, &sandbox.template)?,
    };
    let content_id = format!("sandbox:{sandbox_id}:{now}");
    let view = install(app, &disk, &content_id, record)?;
    println!(
        "appliance: template {name} saved from sandbox {sandbox_id} (disk copied in {:.1}s, ready in {:.1}s)",
        copied.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(view)
}

/// Deletes made template `name`: refused for a shipped one and while any sandbox that is not
/// stopped was made from it.
pub fn delete(app: &App, name: &str) -> Result<(), AppError> {
    let backend = app.lifecycle.backend()?;
    let _busy = app.templates.lock();
    let template = get(app, name)?;
    if template.disk.built_in {
        return Err(AppError::forbidden(format!(
            "template {name} is shipped with the appliance's image and cannot be deleted"
        )));
    }
    let users = sandboxes_using(app, name)?;
    if !users.is_empty() {
        let shown: Vec<&str> = users.iter().take(5).map(String::as_str).collect();
        return Err(AppError::conflict(format!(
            "template {name} is in use by {} sandbox(es) ({}{}); delete them first",
            users.len(),
            shown.join(", "),
            if users.len() > shown.len() { ", ..." } else { "" }
        )));
    }
    backend.runtime.remove_template(name).map_err(runtime_error)?;
    let key = name.to_string();
    app.store.write(move |wtxn, dbs| Ok(dbs.templates.delete(wtxn, &key).map(|_| ())?))?;
    println!("appliance: template {name} deleted");
    Ok(())
}

/// Sandboxes made from template `name` that still have a disk (running, starting, hibernated).
fn sandboxes_using(app: &App, name: &str) -> Result<Vec<String>, AppError> {
    let all = app.store.read(|rtxn, dbs| crate::store::values(&dbs.sandboxes, rtxn))?;
    Ok(all
        .into_iter()
        .filter(|s| s.template == name && !matches!(s.status, SandboxStatus::Stopped | SandboxStatus::Error))
        .map(|s| s.id)
        .collect())
}

/// Refuses a name that a template (shipped or made) or an alias already has.
fn ensure_free(app: &App, name: &str) -> Result<(), AppError> {
    crate::api::validate::template(name)?;
    if name == "default" || get(app, name).is_ok() {
        return Err(AppError::conflict(format!(
            "a template named {name:?} exists already; delete it or choose another name"
        )));
    }
    Ok(())
}

/// Hands `disk` to the runtime as template `record.name`, then writes the record; answers the
/// template as listed.
fn install(app: &App, disk: &Path, content_id: &str, record: TemplateRecord) -> Result<TemplateView, AppError> {
    let backend = app.lifecycle.backend()?;
    let name = record.name.clone();
    backend.runtime.install_template(&name, disk, content_id).map_err(runtime_error)?;
    let stored = record.clone();
    if let Err(e) = app.store.write(move |wtxn, dbs| Ok(dbs.templates.put(wtxn, &stored.name, &stored)?)) {
        // Without its record it would pass for a shipped template: take it back out.
        let _ = backend.runtime.remove_template(&name);
        return Err(e);
    }
    get(app, &name)
}

/// At start: made templates whose record is missing (a crash between the disk and the record)
/// are removed, and records whose disk is gone are dropped.
pub fn reconcile(app: &App) -> Result<(), AppError> {
    let Ok(backend) = app.lifecycle.backend() else { return Ok(()) };
    let disks = backend.runtime.templates();
    let records = records(app)?;
    for disk in disks.iter().filter(|d| !d.built_in && !records.iter().any(|r| r.name == d.name)) {
        println!(
            "appliance: template {}: a disk without a record (made when the appliance stopped); removed",
            disk.name
        );
        if let Err(e) = backend.runtime.remove_template(&disk.name) {
            println!("appliance: template {}: {e}", disk.name);
        }
    }
    let gone: Vec<String> = records
        .into_iter()
        .filter(|r| !disks.iter().any(|d| d.name == r.name && !d.built_in))
        .map(|r| r.name)
        .collect();
    if !gone.is_empty() {
        for name in &gone {
            println!("appliance: template {name}: its disk is gone from the data disk (or the image now ships one of this name); its record is removed");
        }
        app.store.write(move |wtxn, dbs| {
            for name in &gone {
                dbs.templates.delete(wtxn, name)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

//! What each kind of key may do. The operator key may do everything. A project key may read
//! its projects, manage their secrets, and create and use sandboxes in them; it may not change
//! a project (its allowlist decides where secrets may go), see other projects or their
//! sandboxes, manage keys, read metrics, or touch `/api/system`. A signed file URL (no key) grants
//! only the one transfer it was signed for. A refusal is `403` naming the scope that is missing.

use tiny_http::Method;

use crate::api::validate;
use crate::app::App;
use crate::auth::{Caller, SignedGrant};
use crate::error::AppError;
use crate::http::route::Route;
use crate::store::records::ProjectKeyRecord;
use crate::url_signing::Transfer;

/// Checks `route` and `method` against the caller's scope. Lists and creates are narrowed
/// further by their handlers (`visible`, `project_allowed`).
pub fn authorize(app: &App, caller: &Caller, route: &Route, method: &Method) -> Result<(), AppError> {
    let key = match caller {
        Caller::Operator => return Ok(()),
        Caller::Project(key) => key,
        Caller::SignedUrl(grant) => return signed_allowed(grant, route, method),
    };
    match (route, method) {
        // An unsupported route touches nothing: its 501 says why to any key.
        (Route::Healthz | Route::Sandboxes | Route::Unsupported(_), _)
        | (Route::Projects | Route::SecretStores, Method::Get) => Ok(()),
        (Route::Project(id) | Route::SecretStore(id), Method::Get)
        | (
            Route::ProjectSecrets(id)
            | Route::ProjectSecret(id, _)
            | Route::SecretStoreSecrets(id)
            | Route::SecretStoreSecret(id, _),
            _,
        ) => project_allowed(key, id),
        (Route::Projects, _) => Err(operator_only(key, "creating projects")),
        (Route::SecretStores, _) => Err(operator_only(key, "creating secret stores")),
        (Route::Project(_), _) => {
            Err(operator_only(key, "changing or deleting a project (its allowlist and defaults)"))
        }
        (Route::SecretStore(_), _) => Err(operator_only(key, "changing or deleting a secret store (its allowlist)")),
        (Route::SandboxMemoryDump(_), _) => Err(operator_only(key, "memory dumps")),
        // Every project's sandboxes may be created from any template, so a project key may read
        // them; a template it made would carry its sandbox's files to every other project.
        (Route::Templates | Route::Template(_), Method::Get) => Ok(()),
        (Route::Templates | Route::Template(_), _) => Err(operator_only(key, "importing or deleting templates")),
        (Route::SandboxTemplate(_), _) => {
            Err(operator_only(key, "saving a sandbox as a template (templates are shared by every project)"))
        }
        // The checkpoint's project is checked by the handler, which reads it anyway.
        (Route::FromCheckpoint(_), _) => Ok(()),
        (
            Route::Sandbox(id)
            | Route::SandboxTimeout(id)
            | Route::SandboxRestart(id)
            | Route::SandboxHibernate(id)
            | Route::SandboxWake(id)
            | Route::Checkpoints(id)
            | Route::Checkpoint(id, _)
            | Route::CheckpointRestore(id, _)
            | Route::ExecRun(id)
            | Route::ExecRunAsync(id)
            | Route::ExecResult(id, _)
            | Route::Commands(id)
            | Route::ExecSessions(id)
            | Route::ExecSession(id, _)
            | Route::ExecKill(id, _)
            | Route::Pty(id)
            | Route::PtySession(id, _)
            | Route::PtyResize(id, _)
            | Route::Files(id)
            | Route::FilesList(id)
            | Route::FilesMkdir(id)
            | Route::FilesStat(id)
            | Route::FilesRename(id)
            | Route::FilesDownload(id)
            | Route::FilesUpload(id)
            | Route::FilesDownloadUrl(id)
            | Route::FilesUploadUrl(id)
            | Route::SandboxLogs(id)
            | Route::SandboxAllowedHosts(id),
            _,
        ) => sandbox_allowed(app, key, id),
        (Route::Metrics, _) => Err(operator_only(key, "metrics")),
        (
            Route::System
            | Route::SystemUpgrade
            | Route::SystemReboot
            | Route::SystemPoweroff
            | Route::SystemMasterKeyRotate,
            _,
        ) => Err(operator_only(key, "the /api/system routes")),
        (Route::Keys | Route::Key(_), _) => Err(operator_only(key, "managing API keys")),
        (Route::Audit, _) => Err(operator_only(key, "the audit trail")),
    }
}

fn operator_only(key: &ProjectKeyRecord, what: &str) -> AppError {
    AppError::forbidden(format!(
        "{what} needs the operator scope; this key ({:?}, {}) has the project scope",
        key.name, key.id
    ))
}

/// Whether the caller may use the project with id `raw_id`.
pub fn project_allowed(key: &ProjectKeyRecord, raw_id: &str) -> Result<(), AppError> {
    let id = validate::uuid("project", raw_id)?;
    if key.project_ids.contains(&id) {
        Ok(())
    } else {
        Err(AppError::forbidden(format!("project {id} is not in the scope of this key ({:?}, {})", key.name, key.id)))
    }
}

/// A sandbox is in scope when it was created in one of the key's projects. One that does not
/// exist is left to the handler's 404.
fn sandbox_allowed(app: &App, key: &ProjectKeyRecord, raw_id: &str) -> Result<(), AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let lookup = id.clone();
    let Some(record) = app.store.read(move |rtxn, dbs| Ok(dbs.sandboxes.get(rtxn, &lookup)?))? else {
        return Ok(());
    };
    if record.project_id.as_ref().is_some_and(|p| key.project_ids.contains(p)) {
        Ok(())
    } else {
        Err(AppError::forbidden(format!(
            "sandbox {id} is not in the scope of this key ({:?}, {}): it belongs to none of its projects",
            key.name, key.id
        )))
    }
}

/// A signed URL (already verified) reaches only the transfer it was signed for, on its sandbox:
/// anything else is refused, whatever route it is presented to.
fn signed_allowed(grant: &SignedGrant, route: &Route, method: &Method) -> Result<(), AppError> {
    let target = match (route, method, grant.transfer) {
        (Route::FilesDownload(id), Method::Get, Transfer::Download)
        | (Route::FilesUpload(id), Method::Put, Transfer::Upload) => validate::uuid("sandbox", id).ok(),
        _ => None,
    };
    if target.as_deref() == Some(grant.sandbox_id.as_str()) {
        Ok(())
    } else {
        Err(AppError::forbidden(format!(
            "a signed URL grants only {} /api/sandboxes/{}/files/{}; other requests need an API key",
            grant.transfer.method(),
            grant.sandbox_id,
            grant.transfer.endpoint()
        )))
    }
}

/// Whether a caller sees a record of project `project_id` in a list.
pub fn visible(caller: &Caller, project_id: Option<&str>) -> bool {
    match caller {
        Caller::Operator => true,
        Caller::Project(key) => project_id.is_some_and(|p| key.project_ids.iter().any(|k| k == p)),
        Caller::SignedUrl(_) => false,
    }
}

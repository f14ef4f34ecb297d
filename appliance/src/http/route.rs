//! Maps a URL path to a route of the wire contract. Path parameters are percent-decoded.

use crate::api::unsupported::{self, Unsupported};
use crate::error::AppError;
use crate::http::request::percent_decode;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Metrics,
    Projects,
    Project(String),
    ProjectSecrets(String),
    ProjectSecret(String, String),
    /// Projects as today's OpenComputer SDKs see them: secret stores.
    SecretStores,
    SecretStore(String),
    SecretStoreSecrets(String),
    SecretStoreSecret(String, String),
    Sandboxes,
    Sandbox(String),
    SandboxTimeout(String),
    /// Restart the sandbox's guest from its own disk (`reboot`, and `power-cycle`, which is the
    /// same here: every restart is a fresh VMM).
    SandboxRestart(String),
    /// Operator diagnostics: write the sandbox's guest memory to its directory on the data disk.
    SandboxMemoryDump(String),
    /// Snapshot the guest and end its VMM: it holds no memory until woken.
    SandboxHibernate(String),
    /// Resume a hibernated sandbox from its snapshot.
    SandboxWake(String),
    /// A sandbox's checkpoints: take one (POST), list them (GET).
    Checkpoints(String),
    /// One checkpoint of a sandbox: delete it.
    Checkpoint(String, String),
    /// Put the sandbox back to one of its checkpoints.
    CheckpointRestore(String, String),
    /// A new sandbox from a checkpoint (a fork).
    FromCheckpoint(String),
    /// Save the sandbox's disk as a new template.
    SandboxTemplate(String),
    /// Templates: list (GET), import an archive (POST).
    Templates,
    /// One template: get, delete.
    Template(String),
    ExecRun(String),
    /// Start a command and answer at once (its result polled with `ExecResult`).
    ExecRunAsync(String),
    /// The result of a command started with `ExecRunAsync`.
    ExecResult(String, String),
    Commands(String),
    ExecSessions(String),
    ExecSession(String, String),
    ExecKill(String, String),
    /// Start an interactive terminal.
    Pty(String),
    /// A terminal: its WebSocket (GET) or its end (DELETE).
    PtySession(String, String),
    PtyResize(String, String),
    Files(String),
    FilesList(String),
    FilesMkdir(String),
    /// One file's metadata (`?path=`).
    FilesStat(String),
    /// Move a file or directory within the sandbox (JSON `oldPath`, `newPath`).
    FilesRename(String),
    /// Sign a URL that downloads one file without a key (JSON `path`, `expiresIn`).
    FilesDownloadUrl(String),
    /// Sign a URL that uploads one file without a key (JSON `path`, `expiresIn`).
    FilesUploadUrl(String),
    /// A file's bytes (`GET`, `?path=`): by a signed URL (`&expires=&signature=`) or a key.
    FilesDownload(String),
    /// Write a file (`PUT`, `?path=`): by a signed URL (`&expires=&signature=`) or a key.
    FilesUpload(String),
    /// The tail of the sandbox's guest console.
    SandboxLogs(String),
    /// The egress allowlist and per-secret hosts the proxy applies to the sandbox.
    SandboxAllowedHosts(String),
    /// A route of the hosted service this appliance cannot honour (answers 501).
    Unsupported(Unsupported),
    /// The running slot and version, and a staged upgrade.
    System,
    /// Stage an A/B upgrade from a disk image in the request body.
    SystemUpgrade,
    /// Reboot the appliance (e.g. into a staged upgrade).
    SystemReboot,
    /// Power the appliance off.
    SystemPoweroff,
    /// Rotate the master key: every sealed value re-encrypted under a fresh key.
    SystemMasterKeyRotate,
    /// Project keys: create and list (operator only).
    Keys,
    /// One project key: revoke.
    Key(String),
    /// The audit trail (operator only).
    Audit,
}

impl Route {
    /// The sandbox a route uses (commands, sessions, files: what needs the guest, so a hibernated
    /// sandbox is woken for it, and what renews its idle timeout), as given in the path. Reading
    /// its record or setting its timeout is not use: a dashboard polling status must not keep
    /// sandboxes alive (nor wake them).
    pub fn sandbox_in_use(&self) -> Option<&str> {
        match self {
            Self::ExecRun(id)
            | Self::ExecRunAsync(id)
            | Self::ExecResult(id, _)
            | Self::Commands(id)
            | Self::ExecSessions(id)
            | Self::ExecSession(id, _)
            | Self::ExecKill(id, _)
            | Self::Pty(id)
            | Self::PtySession(id, _)
            | Self::PtyResize(id, _)
            | Self::Files(id)
            | Self::FilesList(id)
            | Self::FilesMkdir(id)
            | Self::FilesStat(id)
            | Self::FilesRename(id)
            | Self::FilesDownload(id)
            | Self::FilesUpload(id) => Some(id),
            _ => None,
        }
    }

    /// Route pattern, used as the metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Healthz => "/api/healthz",
            Self::Metrics => "/metrics",
            Self::Projects => "/api/projects",
            Self::Project(_) => "/api/projects/{id}",
            Self::ProjectSecrets(_) => "/api/projects/{id}/secrets",
            Self::ProjectSecret(..) => "/api/projects/{id}/secrets/{name}",
            Self::SecretStores => "/api/secret-stores",
            Self::SecretStore(_) => "/api/secret-stores/{id}",
            Self::SecretStoreSecrets(_) => "/api/secret-stores/{id}/secrets",
            Self::SecretStoreSecret(..) => "/api/secret-stores/{id}/secrets/{name}",
            Self::Sandboxes => "/api/sandboxes",
            Self::Sandbox(_) => "/api/sandboxes/{id}",
            Self::SandboxTimeout(_) => "/api/sandboxes/{id}/timeout",
            Self::SandboxRestart(_) => "/api/sandboxes/{id}/reboot",
            Self::SandboxMemoryDump(_) => "/api/sandboxes/{id}/diagnostics/memory-dump",
            Self::SandboxHibernate(_) => "/api/sandboxes/{id}/hibernate",
            Self::SandboxWake(_) => "/api/sandboxes/{id}/wake",
            Self::Checkpoints(_) => "/api/sandboxes/{id}/checkpoints",
            Self::Checkpoint(..) => "/api/sandboxes/{id}/checkpoints/{checkpointId}",
            Self::CheckpointRestore(..) => "/api/sandboxes/{id}/checkpoints/{checkpointId}/restore",
            Self::FromCheckpoint(_) => "/api/sandboxes/from-checkpoint/{checkpointId}",
            Self::SandboxTemplate(_) => "/api/sandboxes/{id}/template",
            Self::Templates => "/api/templates",
            Self::Template(_) => "/api/templates/{name}",
            Self::ExecRun(_) => "/api/sandboxes/{id}/exec/run",
            Self::ExecRunAsync(_) => "/api/sandboxes/{id}/exec/run-async",
            Self::ExecResult(..) => "/api/sandboxes/{id}/exec/{execId}/result",
            Self::Commands(_) => "/api/sandboxes/{id}/commands",
            Self::ExecSessions(_) => "/api/sandboxes/{id}/exec",
            Self::ExecSession(..) => "/api/sandboxes/{id}/exec/{sid}",
            Self::ExecKill(..) => "/api/sandboxes/{id}/exec/{sid}/kill",
            Self::Pty(_) => "/api/sandboxes/{id}/pty",
            Self::PtySession(..) => "/api/sandboxes/{id}/pty/{sid}",
            Self::PtyResize(..) => "/api/sandboxes/{id}/pty/{sid}/resize",
            Self::Files(_) => "/api/sandboxes/{id}/files",
            Self::FilesList(_) => "/api/sandboxes/{id}/files/list",
            Self::FilesMkdir(_) => "/api/sandboxes/{id}/files/mkdir",
            Self::FilesStat(_) => "/api/sandboxes/{id}/files/stat",
            Self::FilesRename(_) => "/api/sandboxes/{id}/files/rename",
            Self::FilesDownloadUrl(_) => "/api/sandboxes/{id}/files/download-url",
            Self::FilesUploadUrl(_) => "/api/sandboxes/{id}/files/upload-url",
            Self::FilesDownload(_) => "/api/sandboxes/{id}/files/download",
            Self::FilesUpload(_) => "/api/sandboxes/{id}/files/upload",
            Self::SandboxLogs(_) => "/api/sandboxes/{id}/logs",
            Self::SandboxAllowedHosts(_) => "/api/sandboxes/{id}/allowed-hosts",
            Self::Unsupported(u) => u.label(),
            Self::System => "/api/system",
            Self::SystemUpgrade => "/api/system/upgrade",
            Self::SystemReboot => "/api/system/reboot",
            Self::SystemPoweroff => "/api/system/poweroff",
            Self::SystemMasterKeyRotate => "/api/system/master-key/rotate",
            Self::Keys => "/api/keys",
            Self::Key(_) => "/api/keys/{id}",
            Self::Audit => "/api/audit",
        }
    }
}

/// Label for requests that match no route.
pub const UNMATCHED: &str = "unmatched";

/// The route of a request. Outside `/api` only a terminal's WebSocket is served: the Python SDK
/// opens it at `/sandboxes/{id}/pty/{sid}`, so that path is a route only for an upgrade.
pub fn match_request(path: &str, websocket_upgrade: bool) -> Result<Option<Route>, AppError> {
    let trimmed = path.strip_suffix('/').filter(|p| !p.is_empty()).unwrap_or(path);
    let Some(rest) = trimmed.strip_prefix("/sandboxes/") else { return match_route(path) };
    if !websocket_upgrade {
        return Ok(None);
    }
    let seg = segments(rest)?;
    match seg.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [id, "pty", sid] => Ok(Some(Route::PtySession((*id).to_string(), (*sid).to_string()))),
        _ => Ok(None),
    }
}

/// The segments of a path (after its prefix), percent-decoded.
fn segments(rest: &str) -> Result<Vec<String>, AppError> {
    rest.split('/').map(|s| percent_decode(s, false)).collect()
}

pub fn match_route(path: &str) -> Result<Option<Route>, AppError> {
    let trimmed = path.strip_suffix('/').filter(|p| !p.is_empty()).unwrap_or(path);
    if trimmed == "/metrics" {
        return Ok(Some(Route::Metrics));
    }
    let Some(rest) = trimmed.strip_prefix("/api/") else { return Ok(None) };
    let seg = segments(rest)?;
    let s: Vec<&str> = seg.iter().map(String::as_str).collect();
    let route = match s.as_slice() {
        ["healthz"] => Route::Healthz,
        ["projects"] => Route::Projects,
        ["projects", id] => Route::Project(id.to_string()),
        ["projects", id, "secrets"] => Route::ProjectSecrets(id.to_string()),
        ["projects", id, "secrets", name] => Route::ProjectSecret(id.to_string(), name.to_string()),
        ["secret-stores"] => Route::SecretStores,
        ["secret-stores", id] => Route::SecretStore(id.to_string()),
        ["secret-stores", id, "secrets"] => Route::SecretStoreSecrets(id.to_string()),
        ["secret-stores", id, "secrets", name] => Route::SecretStoreSecret(id.to_string(), name.to_string()),
        ["sandboxes"] => Route::Sandboxes,
        ["sandboxes", id] => Route::Sandbox(id.to_string()),
        ["sandboxes", "from-checkpoint", cp] => Route::FromCheckpoint(cp.to_string()),
        ["sandboxes", id, "timeout"] => Route::SandboxTimeout(id.to_string()),
        ["sandboxes", id, "reboot" | "power-cycle"] => Route::SandboxRestart(id.to_string()),
        ["sandboxes", id, "diagnostics", "memory-dump"] => Route::SandboxMemoryDump(id.to_string()),
        ["sandboxes", id, "hibernate"] => Route::SandboxHibernate(id.to_string()),
        ["sandboxes", id, "wake"] => Route::SandboxWake(id.to_string()),
        ["sandboxes", id, "checkpoints"] => Route::Checkpoints(id.to_string()),
        ["sandboxes", id, "template"] => Route::SandboxTemplate(id.to_string()),
        ["templates"] => Route::Templates,
        ["templates", name] => Route::Template(name.to_string()),
        ["sandboxes", id, "checkpoints", cp] => Route::Checkpoint(id.to_string(), cp.to_string()),
        ["sandboxes", id, "checkpoints", cp, "restore"] => Route::CheckpointRestore(id.to_string(), cp.to_string()),
        ["sandboxes", id, "exec", "run"] => Route::ExecRun(id.to_string()),
        ["sandboxes", id, "exec", "run-async"] => Route::ExecRunAsync(id.to_string()),
        ["sandboxes", id, "exec", exec_id, "result"] => Route::ExecResult(id.to_string(), exec_id.to_string()),
        ["sandboxes", id, "commands"] => Route::Commands(id.to_string()),
        ["sandboxes", id, "exec"] => Route::ExecSessions(id.to_string()),
        ["sandboxes", id, "exec", sid] => Route::ExecSession(id.to_string(), sid.to_string()),
        ["sandboxes", id, "exec", sid, "kill"] => Route::ExecKill(id.to_string(), sid.to_string()),
        ["sandboxes", id, "pty"] => Route::Pty(id.to_string()),
        ["sandboxes", id, "pty", sid] => Route::PtySession(id.to_string(), sid.to_string()),
        ["sandboxes", id, "pty", sid, "resize"] => Route::PtyResize(id.to_string(), sid.to_string()),
        ["sandboxes", id, "files"] => Route::Files(id.to_string()),
        ["sandboxes", id, "files", "list"] => Route::FilesList(id.to_string()),
        ["sandboxes", id, "files", "mkdir"] => Route::FilesMkdir(id.to_string()),
        ["sandboxes", id, "files", "stat"] => Route::FilesStat(id.to_string()),
        ["sandboxes", id, "files", "rename"] => Route::FilesRename(id.to_string()),
        ["sandboxes", id, "files", "download-url"] => Route::FilesDownloadUrl(id.to_string()),
        ["sandboxes", id, "files", "upload-url"] => Route::FilesUploadUrl(id.to_string()),
        ["sandboxes", id, "files", "download"] => Route::FilesDownload(id.to_string()),
        ["sandboxes", id, "files", "upload"] => Route::FilesUpload(id.to_string()),
        ["sandboxes", id, "logs"] => Route::SandboxLogs(id.to_string()),
        ["sandboxes", id, "allowed-hosts"] => Route::SandboxAllowedHosts(id.to_string()),
        ["system"] => Route::System,
        ["system", "upgrade"] => Route::SystemUpgrade,
        ["system", "reboot"] => Route::SystemReboot,
        ["system", "poweroff"] => Route::SystemPoweroff,
        ["system", "master-key", "rotate"] => Route::SystemMasterKeyRotate,
        ["keys"] => Route::Keys,
        ["keys", id] => Route::Key(id.to_string()),
        ["audit"] => Route::Audit,
        other => match unsupported::feature(other) {
            Some(feature) => Route::Unsupported(feature),
            None => return Ok(None),
        },
    };
    Ok(Some(route))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_contract_paths() {
        assert_eq!(match_route("/api/healthz").expect("ok"), Some(Route::Healthz));
        assert_eq!(match_route("/api/projects/").expect("ok"), Some(Route::Projects));
        assert_eq!(
            match_route("/api/projects/abc/secrets/API_KEY").expect("ok"),
            Some(Route::ProjectSecret("abc".into(), "API_KEY".into()))
        );
        assert_eq!(match_route("/api/sandboxes/s1/exec/run").expect("ok"), Some(Route::ExecRun("s1".into())));
        assert_eq!(
            match_route("/api/sandboxes/s1/exec/run-async").expect("ok"),
            Some(Route::ExecRunAsync("s1".into()))
        );
        assert_eq!(
            match_route("/api/sandboxes/s1/exec/e1/result").expect("ok"),
            Some(Route::ExecResult("s1".into(), "e1".into()))
        );
        assert_eq!(
            match_route("/api/sandboxes/s1/exec/x%2Fy/kill").expect("ok"),
            Some(Route::ExecKill("s1".into(), "x/y".into()))
        );
        assert_eq!(match_route("/api/system/upgrade").expect("ok"), Some(Route::SystemUpgrade));
        assert_eq!(match_route("/api/system/reboot").expect("ok"), Some(Route::SystemReboot));
        assert_eq!(match_route("/api/system/poweroff").expect("ok"), Some(Route::SystemPoweroff));
        assert_eq!(match_route("/api/system/master-key/rotate").expect("ok"), Some(Route::SystemMasterKeyRotate));
        assert_eq!(
            match_route("/api/secret-stores/s1/secrets/K").expect("ok"),
            Some(Route::SecretStoreSecret("s1".into(), "K".into()))
        );
        assert_eq!(match_route("/api/sandboxes/s1/logs").expect("ok"), Some(Route::SandboxLogs("s1".into())));
        assert_eq!(
            match_route("/api/sandboxes/s1/files/download-url").expect("ok"),
            Some(Route::FilesDownloadUrl("s1".into()))
        );
        assert_eq!(match_route("/api/sandboxes/s1/files/upload").expect("ok"), Some(Route::FilesUpload("s1".into())));
        assert_eq!(match_route("/api/sandboxes/s1/hibernate").expect("ok"), Some(Route::SandboxHibernate("s1".into())));
        assert_eq!(match_route("/api/sandboxes/s1/wake").expect("ok"), Some(Route::SandboxWake("s1".into())));
        assert_eq!(match_route("/api/sandboxes/s1/checkpoints").expect("ok"), Some(Route::Checkpoints("s1".into())));
        assert_eq!(
            match_route("/api/sandboxes/s1/checkpoints/c1/restore").expect("ok"),
            Some(Route::CheckpointRestore("s1".into(), "c1".into()))
        );
        assert_eq!(
            match_route("/api/sandboxes/from-checkpoint/c1").expect("ok"),
            Some(Route::FromCheckpoint("c1".into()))
        );
        assert_eq!(
            match_route("/api/sandboxes/checkpoints/c1/patches").expect("ok"),
            Some(Route::Unsupported(Unsupported::CheckpointPatches))
        );
        assert_eq!(match_route("/api/sandboxes/s1/no-such-thing").expect("ok"), None);
        assert_eq!(match_route("/api/nothing").expect("ok"), None);
        assert_eq!(match_route("/other").expect("ok"), None);
        assert!(match_route("/api/projects/%zz").is_err());
    }

    #[test]
    fn terminals_are_served_under_api_and_their_websocket_also_without_it() {
        assert_eq!(match_route("/api/sandboxes/s1/pty").expect("ok"), Some(Route::Pty("s1".into())));
        assert_eq!(
            match_route("/api/sandboxes/s1/pty/7/resize").expect("ok"),
            Some(Route::PtyResize("s1".into(), "7".into()))
        );
        let terminal = Some(Route::PtySession("s1".into(), "7".into()));
        for upgrade in [false, true] {
            assert_eq!(match_request("/api/sandboxes/s1/pty/7", upgrade).expect("ok"), terminal);
        }
        // The Python SDK's path: a route only for the WebSocket, and nothing else lives there.
        assert_eq!(match_request("/sandboxes/s1/pty/7", true).expect("ok"), terminal);
        assert_eq!(match_request("/sandboxes/s1/pty/7", false).expect("ok"), None);
        assert_eq!(match_request("/sandboxes/s1/exec/7", true).expect("ok"), None);
        assert_eq!(match_request("/sandboxes/s1/pty/7/resize", true).expect("ok"), None);
        assert_eq!(match_request("/metrics", false).expect("ok"), Some(Route::Metrics));
        assert!(match_request("/sandboxes/%zz/pty/7", true).is_err());
    }
}

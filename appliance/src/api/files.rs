//! Sandbox files through the agent; `?path=` names the file inside the sandbox.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::Request;

use crate::api::validate;
use crate::app::App;
use crate::clock::rfc3339;
use crate::error::AppError;
use crate::http::download;
use crate::http::reply::{Answered, Reply};
use crate::http::request::{parse_json, query_param, read_body, MAX_JSON_BODY};
use crate::http::upload::UploadBody;
use crate::lifecycle::runtime_error;
use crate::runtime::MAX_FILE_SIZE;
use crate::sandbox_ops::require_running;

fn target(app: &App, raw_id: &str, query: &str) -> Result<(String, String), AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let path = validate::sandbox_path(query_param(query, "path")?)?;
    let _ = require_running(app, &id)?;
    Ok((id, path))
}

/// `GET .../files?path=`: the file's bytes, streamed (`http::download`): a failure before the
/// first byte is a JSON error, one after it cuts the body.
pub fn read(app: &App, raw_id: &str, query: &str, request: Request) -> Answered {
    let (id, path) = match target(app, raw_id, query) {
        Ok(target) => target,
        Err(e) => return Answered::Reply(Reply::error(&e), Box::new(request)),
    };
    download(app, id, path, request)
}

/// Streams file `path` of sandbox `id` (already checked) to the client.
pub fn download(app: &App, id: String, path: String, request: Request) -> Answered {
    let runtime = match app.lifecycle.backend() {
        Ok(backend) => Arc::clone(&backend.runtime),
        Err(e) => return Answered::Reply(Reply::error(&e), Box::new(request)),
    };
    download::stream(request, move |sink| runtime.read_file_to(&id, &path, sink).map_err(runtime_error))
}

/// `PUT .../files?path=` with the file as the body (`Content-Length` required, at most
/// `MAX_FILE_SIZE`): streamed into the sandbox; 204.
pub fn write(app: &App, raw_id: &str, query: &str, request: &mut Request) -> Result<Reply, AppError> {
    let mut body = UploadBody::open(request, MAX_FILE_SIZE)?;
    let written = target(app, raw_id, query).and_then(|(id, path)| upload(app, &id, &path, &mut body));
    if written.is_err() {
        body.discard_rest();
    }
    written
}

/// Streams `body` into file `path` of sandbox `id` (already checked).
pub fn upload(app: &App, id: &str, path: &str, body: &mut UploadBody) -> Result<Reply, AppError> {
    let backend = app.lifecycle.backend()?;
    match backend.runtime.write_file_from(id, path, body) {
        Ok(_) => Ok(Reply::no_content()),
        // A body that broke off explains the failure better than the agent's view of it.
        Err(e) => Err(body.problem().unwrap_or_else(|| runtime_error(e))),
    }
}

pub fn remove(app: &App, raw_id: &str, query: &str) -> Result<Reply, AppError> {
    let (id, path) = target(app, raw_id, query)?;
    let backend = app.lifecycle.backend()?;
    backend.runtime.remove_file(&id, &path).map_err(runtime_error)?;
    Ok(Reply::no_content())
}

pub fn list(app: &App, raw_id: &str, query: &str) -> Result<Reply, AppError> {
    let (id, path) = target(app, raw_id, query)?;
    let backend = app.lifecycle.backend()?;
    let entries = backend.runtime.list_dir(&id, &path).map_err(runtime_error)?;
    let body: Vec<Value> =
        entries.iter().map(|e| json!({"name": e.name, "isDir": e.is_dir, "path": e.path, "size": e.size})).collect();
    Ok(Reply::json(200, &body))
}

pub fn mkdir(app: &App, raw_id: &str, query: &str) -> Result<Reply, AppError> {
    let (id, path) = target(app, raw_id, query)?;
    let backend = app.lifecycle.backend()?;
    backend.runtime.make_dir(&id, &path).map_err(runtime_error)?;
    Ok(Reply::no_content())
}

/// `GET .../files/stat?path=`: `{name, path, isDir, isSymlink, size, mode, modifiedAt}`; a
/// symlink is described by what it points to, with `isSymlink` true.
pub fn stat(app: &App, raw_id: &str, query: &str) -> Result<Reply, AppError> {
    let (id, path) = target(app, raw_id, query)?;
    let backend = app.lifecycle.backend()?;
    let info = backend.runtime.stat_file(&id, &path).map_err(runtime_error)?;
    Ok(Reply::json(
        200,
        &json!({
            "name": info.name,
            "path": info.path,
            "isDir": info.is_dir,
            "isSymlink": info.is_symlink,
            "size": info.size,
            "mode": info.mode,
            // Clamped to 1970..9999: the time comes from the guest.
            "modifiedAt": rfc3339(info.modified_ms.div_euclid(1000).clamp(0, 253_402_300_799)),
        }),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RenameBody {
    old_path: Option<String>,
    new_path: Option<String>,
}

/// `POST .../files/rename` with `{"oldPath", "newPath"}`: moves a file or directory in one step
/// (a file at `newPath` is replaced; missing parents are not created). 204.
pub fn rename(app: &App, raw_id: &str, request: &mut Request) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let body: RenameBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    let field = |name: &str, value: Option<String>| {
        let value = value.ok_or_else(|| AppError::bad_request(format!("{name} is required")))?;
        validate::sandbox_path(Some(value)).map_err(|e| AppError::new(e.status, format!("{name}: {}", e.message)))
    };
    let from = field("oldPath", body.old_path)?;
    let to = field("newPath", body.new_path)?;
    let _ = require_running(app, &id)?;
    let backend = app.lifecycle.backend()?;
    backend.runtime.rename_file(&id, &from, &to).map_err(runtime_error)?;
    Ok(Reply::no_content())
}

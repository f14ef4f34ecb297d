//! Sandbox files through the agent; `?path=` names the file inside the sandbox.

use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::Request;

use crate::api::validate;
use crate::app::App;
use crate::clock::rfc3339;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{parse_json, query_param, read_body, MAX_FILE_BODY, MAX_JSON_BODY};
use crate::lifecycle::runtime_error;
use crate::sandbox_ops::require_running;

fn target(app: &App, raw_id: &str, query: &str) -> Result<(String, String), AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let path = validate::sandbox_path(query_param(query, "path")?)?;
    let _ = require_running(app, &id)?;
    Ok((id, path))
}

pub fn read(app: &App, raw_id: &str, query: &str) -> Result<Reply, AppError> {
    let (id, path) = target(app, raw_id, query)?;
    let backend = app.lifecycle.backend()?;
    let data = backend.runtime.read_file(&id, &path).map_err(runtime_error)?;
    Ok(Reply::bytes(data))
}

pub fn write(app: &App, raw_id: &str, query: &str, request: &mut Request) -> Result<Reply, AppError> {
    let (id, path) = target(app, raw_id, query)?;
    let data = read_body(request, MAX_FILE_BODY)?;
    let backend = app.lifecycle.backend()?;
    backend.runtime.write_file(&id, &path, &data).map_err(runtime_error)?;
    Ok(Reply::no_content())
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

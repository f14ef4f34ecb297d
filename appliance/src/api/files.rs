//! Sandbox files through the agent; `?path=` names the file inside the sandbox.

use serde_json::{json, Value};
use tiny_http::Request;

use crate::api::validate;
use crate::app::App;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{query_param, read_body, MAX_FILE_BODY};
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

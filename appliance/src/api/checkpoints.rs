//! Checkpoints and forks with the wire format of OpenComputer's API (docs/client-wire-contract.md
//! §8): take (201, `status` `ready`: the checkpoint is complete when answered), list, restore in
//! place, delete (204), and `POST /api/sandboxes/from-checkpoint/{id}` (201, the new sandbox).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::Request;
use zeroize::Zeroizing;

use crate::api::projects;
use crate::api::sandboxes::{check_envs, idle_timeout_of, project_named, sandbox_json};
use crate::api::{scope, validate};
use crate::app::App;
use crate::auth::Caller;
use crate::checkpoints::{self as ops, ForkSpec, NewCheckpoint};
use crate::clock::rfc3339;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{parse_json, read_body, MAX_JSON_BODY};
use crate::store::records::{CheckpointKind, CheckpointRecord};

const MAX_NAME_BYTES: usize = 256;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    name: Option<String>,
    kind: Option<String>,
    promote_to_full: Option<bool>,
    retention_policy: Option<RetentionPolicy>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RetentionPolicy {
    mode: String,
    max_count: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ForkBody {
    timeout: Option<u64>,
    envs: Option<BTreeMap<String, Zeroizing<String>>>,
    secret_store: Option<String>,
    /// Accepted alias of `secretStore`, as at create.
    project: Option<String>,
    #[serde(rename = "memoryMB")]
    memory_mb: Option<u32>,
}

fn checkpoint_json(c: &CheckpointRecord) -> Value {
    json!({
        "id": c.id,
        "sandboxID": c.sandbox_id,
        "name": c.name,
        "kind": c.kind.as_str(),
        "status": "ready",
        "sizeBytes": c.size_bytes,
        "createdAt": rfc3339(c.created_at),
    })
}

fn kind_of(raw: Option<&str>) -> Result<CheckpointKind, AppError> {
    match raw.unwrap_or("full") {
        "" | "full" => Ok(CheckpointKind::Full),
        "disk_only" => Ok(CheckpointKind::DiskOnly),
        other => Err(AppError::bad_request(format!(
            "kind {other:?} is not a checkpoint kind: give \"full\" or \"disk_only\""
        ))),
    }
}

pub fn create(app: &App, raw_id: &str, request: &mut Request) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let body: CreateBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    let name = body.name.unwrap_or_default();
    if name.trim().is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(AppError::bad_request(format!(
            "name is required: 1-{MAX_NAME_BYTES} bytes without control characters"
        )));
    }
    let kind = kind_of(body.kind.as_deref())?;
    if body.promote_to_full == Some(true) {
        return Err(AppError::bad_request(
            "promoteToFull is not supported by this appliance: take a checkpoint of kind \"full\" instead",
        ));
    }
    let keep_at_most = match body.retention_policy {
        None => None,
        Some(policy) if policy.mode == "delete_oldest" => {
            let most = ops::limit(kind);
            match policy.max_count.unwrap_or(most) {
                n @ 1.. if n <= most => Some(n),
                n => {
                    return Err(AppError::bad_request(format!(
                        "retentionPolicy.maxCount {n} is out of range: 1-{most} for {} checkpoints",
                        kind.as_str()
                    )))
                }
            }
        }
        Some(policy) => {
            return Err(AppError::bad_request(format!(
                "retentionPolicy.mode {:?} is not supported: give \"delete_oldest\"",
                policy.mode
            )))
        }
    };
    let checkpoint = ops::create(app, &id, NewCheckpoint { name, kind, keep_at_most })?;
    Ok(Reply::json(201, &checkpoint_json(&checkpoint)))
}

pub fn list(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let all = ops::list(app, &id)?;
    Ok(Reply::json(200, &all.iter().map(checkpoint_json).collect::<Vec<_>>()))
}

pub fn delete(app: &App, raw_id: &str, raw_checkpoint: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let checkpoint = validate::uuid("checkpoint", raw_checkpoint)?;
    ops::delete(app, &id, &checkpoint)?;
    Ok(Reply::no_content())
}

/// Answers the restored sandbox (both SDKs read it again with a GET afterwards).
pub fn restore(app: &App, raw_id: &str, raw_checkpoint: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let checkpoint = validate::uuid("checkpoint", raw_checkpoint)?;
    let record = ops::restore(app, &id, &checkpoint)?;
    Ok(Reply::json(200, &sandbox_json(&record, app.lifecycle.deadline(&id))))
}

pub fn fork(app: &App, caller: &Caller, raw_checkpoint: &str, request: &mut Request) -> Result<Reply, AppError> {
    let checkpoint_id = validate::uuid("checkpoint", raw_checkpoint)?;
    let raw = read_body(request, MAX_JSON_BODY)?;
    let body: ForkBody = if raw.iter().all(u8::is_ascii_whitespace) { ForkBody::default() } else { parse_json(&raw)? };
    let checkpoint = ops::get(app, &checkpoint_id)?;
    if let Caller::Project(key) = caller {
        // Another project's checkpoint is not found, as its sandbox would not be.
        if !checkpoint.project_id.as_ref().is_some_and(|p| key.project_ids.contains(p)) {
            return Err(AppError::not_found(format!("checkpoint {checkpoint_id} not found")));
        }
    }
    let named = project_named(body.project, body.secret_store)?;
    let project = match (named, &checkpoint.project_id) {
        (Some(name), _) => Some(projects::load_by_name(app, &name)?),
        // The checkpointed sandbox's project, unless it was deleted since.
        (None, Some(id)) => projects::load(app, id).ok(),
        (None, None) => None,
    };
    if let (Caller::Project(key), Some(project)) = (caller, &project) {
        scope::project_allowed(key, &project.id)?;
    }
    // A resumed guest has the memory it was checkpointed with; a disk-only fork boots and could
    // have any, but keeps the checkpoint's too, as OpenComputer clamps up to it.
    if let Some(asked) = body.memory_mb.filter(|m| *m > checkpoint.memory_mb) {
        return Err(AppError::bad_request(format!(
            "memoryMB {asked} is more than checkpoint {checkpoint_id} was taken with ({} MiB); a fork has its memory",
            checkpoint.memory_mb
        )));
    }
    let envs = body.envs.unwrap_or_default();
    check_envs(&envs)?;
    let timeout_sec = idle_timeout_of(body.timeout, project.as_ref())?;
    let record = ops::fork(app, ForkSpec { checkpoint, timeout_sec, envs, project })?;
    Ok(Reply::json(201, &sandbox_json(&record, app.lifecycle.deadline(&record.id))))
}

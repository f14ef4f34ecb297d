//! Projects: named defaults (template, resources, timeout, egress allowlist, whether the idle
//! timeout hibernates or stops) for sandboxes.

use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::Request;

use crate::api::{scope, validate};
use crate::app::App;
use crate::auth::Caller;
use crate::clock::{now_unix, rfc3339};
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{parse_json, read_body, MAX_JSON_BODY};
use crate::lifecycle::new_id;
use crate::seal_sync;
use crate::store::records::ProjectRecord;
use crate::store::values;

pub const DEFAULT_TEMPLATE: &str = "base";
pub const DEFAULT_CPU_COUNT: u32 = 1;
pub const DEFAULT_MEMORY_MB: u32 = 512;
pub const DEFAULT_TIMEOUT_SEC: u64 = 300;
/// OpenComputer's idle timeout hibernates a sandbox ("auto-hibernate"), so a project's does too
/// unless it says otherwise.
pub const DEFAULT_AUTO_HIBERNATE: bool = true;

/// Body of create and update; on update, absent or zero/empty fields keep their value.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProjectBody {
    name: Option<String>,
    template: Option<String>,
    cpu_count: Option<u32>,
    #[serde(rename = "memoryMB")]
    memory_mb: Option<u32>,
    timeout_sec: Option<u64>,
    egress_allowlist: Option<Vec<String>>,
    auto_hibernate: Option<bool>,
}

pub fn project_json(p: &ProjectRecord) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "template": p.template,
        "cpuCount": p.cpu_count,
        "memoryMB": p.memory_mb,
        "timeoutSec": p.timeout_sec,
        "egressAllowlist": p.egress_allowlist,
        "autoHibernate": p.auto_hibernate,
        "createdAt": rfc3339(p.created_at),
        "updatedAt": rfc3339(p.updated_at),
    })
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|v| !v.is_empty())
}

fn non_zero<T: PartialEq + Default>(v: Option<T>) -> Option<T> {
    v.filter(|x| *x != T::default())
}

fn allowlist(raw: &[String]) -> Result<Vec<String>, AppError> {
    validate::host_list("egressAllowlist", raw)
}

pub fn create(app: &App, request: &mut Request) -> Result<Reply, AppError> {
    let body: ProjectBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    let name = body.name.ok_or_else(|| AppError::bad_request("name is required"))?;
    validate::project_name(&name)?;
    let template = non_empty(body.template).unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
    validate::template(&template)?;
    let now = now_unix();
    let record = ProjectRecord {
        id: new_id()?,
        name,
        template,
        cpu_count: validate::cpu_count(non_zero(body.cpu_count).unwrap_or(DEFAULT_CPU_COUNT))?,
        memory_mb: validate::memory_mb(non_zero(body.memory_mb).unwrap_or(DEFAULT_MEMORY_MB))?,
        timeout_sec: validate::timeout_sec("timeoutSec", non_zero(body.timeout_sec).unwrap_or(DEFAULT_TIMEOUT_SEC))?,
        egress_allowlist: allowlist(&body.egress_allowlist.unwrap_or_default())?,
        auto_hibernate: body.auto_hibernate.unwrap_or(DEFAULT_AUTO_HIBERNATE),
        created_at: now,
        updated_at: now,
    };
    insert(app, &record)?;
    Ok(Reply::json(201, &project_json(&record)))
}

/// A project with the appliance's defaults, named `name` (a secret store created through
/// `/api/secret-stores`, which has no defaults of its own).
pub fn with_defaults(name: String, egress_allowlist: &[String]) -> Result<ProjectRecord, AppError> {
    validate::project_name(&name)?;
    let now = now_unix();
    Ok(ProjectRecord {
        id: new_id()?,
        name,
        template: DEFAULT_TEMPLATE.to_string(),
        cpu_count: DEFAULT_CPU_COUNT,
        memory_mb: DEFAULT_MEMORY_MB,
        timeout_sec: DEFAULT_TIMEOUT_SEC,
        egress_allowlist: allowlist(egress_allowlist)?,
        auto_hibernate: DEFAULT_AUTO_HIBERNATE,
        created_at: now,
        updated_at: now,
    })
}

/// Stores a new project; its name must be free.
pub fn insert(app: &App, record: &ProjectRecord) -> Result<(), AppError> {
    let stored = record.clone();
    app.store.write(move |wtxn, dbs| {
        if dbs.project_names.get(wtxn, &stored.name)?.is_some() {
            return Err(AppError::conflict(format!("a project named {:?} already exists", stored.name)));
        }
        dbs.projects.put(wtxn, &stored.id, &stored)?;
        dbs.project_names.put(wtxn, &stored.name, &stored.id)?;
        Ok(())
    })
}

pub fn list(app: &App, caller: &Caller) -> Result<Reply, AppError> {
    let mut projects = app.store.read(|rtxn, dbs| values(&dbs.projects, rtxn))?;
    projects.retain(|p| scope::visible(caller, Some(&p.id)));
    projects.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
    let body: Vec<Value> = projects.iter().map(project_json).collect();
    Ok(Reply::json(200, &body))
}

pub fn load(app: &App, raw_id: &str) -> Result<ProjectRecord, AppError> {
    let id = validate::uuid("project", raw_id)?;
    app.store
        .read(|rtxn, dbs| Ok(dbs.projects.get(rtxn, &id)?))?
        .ok_or_else(|| AppError::not_found(format!("project {id} not found")))
}

/// Looks a project up by name (sandbox creation's `project` field).
pub fn load_by_name(app: &App, name: &str) -> Result<ProjectRecord, AppError> {
    let found = app.store.read(|rtxn, dbs| {
        let Some(id) = dbs.project_names.get(rtxn, name)? else { return Ok(None) };
        Ok(dbs.projects.get(rtxn, id)?)
    })?;
    found.ok_or_else(|| AppError::not_found(format!("project {name:?} not found")))
}

pub fn get(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    Ok(Reply::json(200, &project_json(&load(app, raw_id)?)))
}

pub fn update(app: &App, raw_id: &str, request: &mut Request) -> Result<Reply, AppError> {
    let body: ProjectBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    let changes = Changes {
        name: non_empty(body.name),
        template: non_empty(body.template),
        cpu_count: non_zero(body.cpu_count),
        memory_mb: non_zero(body.memory_mb),
        timeout_sec: non_zero(body.timeout_sec),
        // Here an empty list keeps the allowlist (absent and empty fields change nothing).
        egress_allowlist: body.egress_allowlist.filter(|l| !l.is_empty()),
        // A boolean has no "empty" value: absent keeps it, false and true set it.
        auto_hibernate: body.auto_hibernate,
    };
    Ok(Reply::json(200, &project_json(&apply(app, raw_id, changes)?)))
}

/// What an update changes; None keeps the field.
#[derive(Default)]
pub struct Changes {
    pub name: Option<String>,
    pub template: Option<String>,
    pub cpu_count: Option<u32>,
    pub memory_mb: Option<u32>,
    pub timeout_sec: Option<u64>,
    pub egress_allowlist: Option<Vec<String>>,
    pub auto_hibernate: Option<bool>,
}

/// Validates and applies `changes` to project `raw_id`; running sandboxes of the project get
/// the new allowlist before this returns.
pub fn apply(app: &App, raw_id: &str, changes: Changes) -> Result<ProjectRecord, AppError> {
    let id = validate::uuid("project", raw_id)?;
    let name = changes.name;
    if let Some(n) = &name {
        validate::project_name(n)?;
    }
    let template = changes.template;
    if let Some(t) = &template {
        validate::template(t)?;
    }
    let cpu = changes.cpu_count.map(validate::cpu_count).transpose()?;
    let memory = changes.memory_mb.map(validate::memory_mb).transpose()?;
    let timeout = changes.timeout_sec.map(|t| validate::timeout_sec("timeoutSec", t)).transpose()?;
    let egress = changes.egress_allowlist.map(|l| allowlist(&l)).transpose()?;
    let auto_hibernate = changes.auto_hibernate;
    let now = now_unix();
    let updated = app.store.write(move |wtxn, dbs| {
        let mut record =
            dbs.projects.get(wtxn, &id)?.ok_or_else(|| AppError::not_found(format!("project {id} not found")))?;
        if let Some(new_name) = name.filter(|n| *n != record.name) {
            if dbs.project_names.get(wtxn, &new_name)?.is_some() {
                return Err(AppError::conflict(format!("a project named {new_name:?} already exists")));
            }
            dbs.project_names.delete(wtxn, &record.name)?;
            dbs.project_names.put(wtxn, &new_name, &record.id)?;
            record.name = new_name;
        }
        if let Some(t) = template {
            record.template = t;
        }
        if let Some(c) = cpu {
            record.cpu_count = c;
        }
        if let Some(m) = memory {
            record.memory_mb = m;
        }
        if let Some(t) = timeout {
            record.timeout_sec = t;
        }
        if let Some(e) = egress {
            record.egress_allowlist = e;
        }
        if let Some(h) = auto_hibernate {
            record.auto_hibernate = h;
        }
        record.updated_at = now;
        dbs.projects.put(wtxn, &record.id, &record)?;
        Ok(record)
    })?;
    // A new allowlist reaches running sandboxes now, with the secrets that follow it.
    seal_sync::republish_project(app, &updated.id)?;
    Ok(updated)
}

/// Deletes the project, its name and all its secrets in one transaction. Sandboxes
/// created from it keep running with their egress allowlist, but their tokens stand for
/// nothing any more.
pub fn delete(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("project", raw_id)?;
    let pid = id.clone();
    app.store.write(move |wtxn, dbs| {
        let record =
            dbs.projects.get(wtxn, &id)?.ok_or_else(|| AppError::not_found(format!("project {id} not found")))?;
        let prefix = format!("{id}/");
        let mut secret_keys = Vec::new();
        for item in dbs.secrets.prefix_iter(wtxn, &prefix)? {
            secret_keys.push(item?.0.to_string());
        }
        for key in &secret_keys {
            dbs.secrets.delete(wtxn, key)?;
        }
        let mut host_keys = Vec::new();
        for item in dbs.secret_hosts.prefix_iter(wtxn, &prefix)? {
            host_keys.push(item?.0.to_string());
        }
        for key in &host_keys {
            dbs.secret_hosts.delete(wtxn, key)?;
        }
        dbs.project_names.delete(wtxn, &record.name)?;
        dbs.projects.delete(wtxn, &id)?;
        Ok(())
    })?;
    seal_sync::republish_project(app, &pid)?;
    Ok(Reply::no_content())
}

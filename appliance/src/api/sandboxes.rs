//! Sandboxes: create (project defaults merged), list, get, delete, timeout, restart, hibernate
//! and wake.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::Request;
use zeroize::Zeroizing;

use crate::api::projects::{
    self, DEFAULT_AUTO_HIBERNATE, DEFAULT_CPU_COUNT, DEFAULT_MEMORY_MB, DEFAULT_TEMPLATE, DEFAULT_TIMEOUT_SEC,
};
use crate::api::{scope, validate};
use crate::app::App;
use crate::auth::Caller;
use crate::clock::rfc3339;
use crate::error::AppError;
use crate::hibernation;
use crate::http::reply::Reply;
use crate::http::request::{parse_json, percent_decode, query_param, query_values, read_body, MAX_JSON_BODY};
use crate::lifecycle;
use crate::sandbox_ops::{self, CreateSpec};
use crate::store::records::{ProjectRecord, SandboxRecord, NO_DEADLINE};
use crate::store::values;

const MAX_METADATA_ENTRIES: usize = 64;
const MAX_ENVS: usize = 256;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<u64>,
    cpu_count: Option<u32>,
    #[serde(rename = "memoryMB")]
    memory_mb: Option<u32>,
    #[serde(rename = "diskMB")]
    disk_mb: Option<u32>,
    envs: Option<BTreeMap<String, Zeroizing<String>>>,
    metadata: Option<BTreeMap<String, String>>,
    project: Option<String>,
    /// Accepted alias of `project`.
    secret_store: Option<String>,
}

#[derive(Deserialize)]
struct TimeoutBody {
    timeout: u64,
}

/// `POST .../wake`: an optional body; `timeout` (seconds, 0: none) becomes the idle timeout.
#[derive(Deserialize)]
struct WakeBody {
    timeout: Option<u64>,
}

/// A sandbox as the API shows it; `live_end` is the running sandbox's deadline as renewed by
/// activity (`Lifecycle::deadline`), which the stored record lags behind.
pub fn sandbox_json(s: &SandboxRecord, live_end: Option<i64>) -> Value {
    let end_at = live_end.filter(|_| !s.status.has_ended()).unwrap_or(s.end_at);
    json!({
        "sandboxID": s.id,
        "templateID": s.template,
        "status": s.status.as_str(),
        "startedAt": rfc3339(s.started_at),
        // null: no automatic stop (timeout 0).
        "endAt": (end_at != NO_DEADLINE).then(|| rfc3339(end_at)),
        "cpuCount": s.cpu_count,
        "memoryMB": s.memory_mb,
        "diskMB": s.disk_mb,
        "metadata": s.metadata,
    })
}

fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), AppError> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(AppError::bad_request(format!("metadata has more than {MAX_METADATA_ENTRIES} entries")));
    }
    for (k, v) in metadata {
        if k.is_empty() || k.len() > 256 || v.len() > 4096 {
            return Err(AppError::bad_request("metadata keys must be 1-256 bytes and values at most 4096 bytes"));
        }
    }
    Ok(())
}

pub fn check_envs<V>(envs: &BTreeMap<String, V>) -> Result<(), AppError> {
    if envs.len() > MAX_ENVS {
        return Err(AppError::bad_request(format!("envs has more than {MAX_ENVS} entries")));
    }
    envs.keys().try_for_each(|k| validate::env_name("env", k))
}

/// The project a request names by `project` or its alias `secretStore` (empty: none); both
/// naming different ones is refused.
pub fn project_named(project: Option<String>, secret_store: Option<String>) -> Result<Option<String>, AppError> {
    match (project.filter(|p| !p.is_empty()), secret_store.filter(|p| !p.is_empty())) {
        (Some(a), Some(b)) if a != b => {
            Err(AppError::bad_request("project and secretStore name different projects; give one"))
        }
        (a, b) => Ok(a.or(b)),
    }
}

/// A new sandbox's idle timeout: `timeout` as given (0: no automatic stop, as OpenComputer clients
/// send it); absent, the project's, else ours.
pub fn idle_timeout_of(timeout: Option<u64>, project: Option<&ProjectRecord>) -> Result<u64, AppError> {
    match timeout {
        Some(0) => Ok(0),
        Some(t) => validate::timeout_sec("timeout", t),
        None => Ok(project.map_or(DEFAULT_TIMEOUT_SEC, |p| p.timeout_sec)),
    }
}

pub fn create(app: &App, caller: &Caller, request: &mut Request) -> Result<Reply, AppError> {
    let body: CreateBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    let project_name = project_named(body.project, body.secret_store)?;
    let project = project_name.map(|name| projects::load_by_name(app, &name)).transpose()?;
    if let Caller::Project(key) = caller {
        let Some(project) = &project else {
            return Err(AppError::forbidden(
                "a project key creates sandboxes only in its projects: give \"project\" (creating one outside any project needs the operator scope)",
            ));
        };
        scope::project_allowed(key, &project.id)?;
    }
    let envs = body.envs.unwrap_or_default();
    check_envs(&envs)?;
    let metadata = body.metadata.unwrap_or_default();
    check_metadata(&metadata)?;

    // Request fields override the project, the project overrides appliance defaults.
    let template = body
        .template_id
        .filter(|t| !t.is_empty())
        .or_else(|| project.as_ref().map(|p| p.template.clone()))
        .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
    validate::template(&template)?;
    let cpu_count =
        body.cpu_count.filter(|c| *c != 0).or(project.as_ref().map(|p| p.cpu_count)).unwrap_or(DEFAULT_CPU_COUNT);
    let memory_mb =
        body.memory_mb.filter(|m| *m != 0).or(project.as_ref().map(|p| p.memory_mb)).unwrap_or(DEFAULT_MEMORY_MB);
    let timeout_sec = idle_timeout_of(body.timeout, project.as_ref())?;
    let hibernate_on_idle = project.as_ref().map_or(DEFAULT_AUTO_HIBERNATE, |p| p.auto_hibernate);
    let spec = CreateSpec {
        hibernate_on_idle,
        template,
        cpu_count: validate::cpu_count(cpu_count)?,
        memory_mb: validate::memory_mb(memory_mb)?,
        disk_mb: body.disk_mb.filter(|d| *d != 0).map(validate::disk_mb).transpose()?,
        timeout_sec,
        envs,
        metadata,
        project,
    };
    let record = sandbox_ops::create(app, spec)?;
    Ok(Reply::json(201, &sandbox_json(&record, app.lifecycle.deadline(&record.id))))
}

/// States a list may be filtered by. `paused` is a state of the hosted service that no sandbox
/// here is ever in: accepted, it matches nothing.
const LIST_STATES: [&str; 6] = ["starting", "running", "stopped", "error", "paused", "hibernated"];

/// `?state=` (comma-separated, may repeat) and `?metadata=` (a URL-encoded `k=v&k2=v2`, may
/// repeat), as E2B-style clients send them: a sandbox is listed when its status is one of the
/// states given and its metadata holds every pair given.
struct ListFilter {
    states: Option<Vec<String>>,
    metadata: BTreeMap<String, String>,
}

impl ListFilter {
    fn parse(query: &str) -> Result<Self, AppError> {
        let mut states: Option<Vec<String>> = None;
        for value in query_values(query, "state")? {
            for state in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                if !LIST_STATES.contains(&state) {
                    return Err(AppError::bad_request(format!(
                        "unknown state {state:?} in ?state=; known states: {}",
                        LIST_STATES.join(", ")
                    )));
                }
                states.get_or_insert_with(Vec::new).push(state.to_string());
            }
        }
        let mut metadata = BTreeMap::new();
        for value in query_values(query, "metadata")? {
            for pair in value.split('&').filter(|p| !p.is_empty()) {
                let Some((k, v)) = pair.split_once('=') else {
                    return Err(AppError::bad_request(format!(
                        "?metadata= takes URL-encoded key=value pairs joined by '&'; {pair:?} has no '='"
                    )));
                };
                metadata.insert(percent_decode(k, true)?, percent_decode(v, true)?);
            }
        }
        check_metadata(&metadata)?;
        Ok(Self { states, metadata })
    }

    fn matches(&self, r: &SandboxRecord) -> bool {
        self.states.as_ref().is_none_or(|s| s.iter().any(|s| s == r.status.as_str()))
            && self.metadata.iter().all(|(k, v)| r.metadata.get(k) == Some(v))
    }
}

pub fn list(app: &App, caller: &Caller, query: &str) -> Result<Reply, AppError> {
    let filter = ListFilter::parse(query)?;
    let mut records = app.store.read(|rtxn, dbs| values(&dbs.sandboxes, rtxn))?;
    records.retain(|r| scope::visible(caller, r.project_id.as_deref()) && filter.matches(r));
    records.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
    let body: Vec<Value> = records.iter().map(|r| sandbox_json(r, app.lifecycle.deadline(&r.id))).collect();
    Ok(Reply::json(200, &body))
}

pub fn get(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    Ok(Reply::json(200, &sandbox_json(&sandbox_ops::get(app, &id)?, app.lifecycle.deadline(&id))))
}

/// `?deleteSecretStore=true` also deletes the sandbox's project (its secret store, as the
/// OpenComputer SDKs call it), which only the operator may do.
pub fn delete(app: &App, caller: &Caller, raw_id: &str, query: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let with_store = match query_param(query, "deleteSecretStore")?.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(AppError::bad_request(format!("deleteSecretStore must be true or false, got {other:?}")))
        }
    };
    if with_store && *caller != Caller::Operator {
        return Err(AppError::forbidden(
            "deleteSecretStore=true deletes a secret store (a project), which needs the operator scope",
        ));
    }
    let project = sandbox_ops::get(app, &id)?.project_id;
    sandbox_ops::delete(app, &id)?;
    if let Some(project) = project.filter(|_| with_store) {
        match projects::delete(app, &project) {
            // Deleted meanwhile by someone else: what was asked for holds.
            Err(e) if e.status == 404 => {}
            other => {
                other?;
            }
        }
    }
    Ok(Reply::no_content())
}

pub fn set_timeout(app: &App, raw_id: &str, request: &mut Request) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let body: TimeoutBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    // 0: no automatic stop.
    let timeout = if body.timeout == 0 { 0 } else { validate::timeout_sec("timeout", body.timeout)? };
    sandbox_ops::set_timeout(app, &id, timeout)?;
    Ok(Reply::no_content())
}

/// `reboot` and `power-cycle`: the guest starts again from its own disk with its environment;
/// answers the sandbox.
pub fn restart(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let record = sandbox_ops::restart(app, &id)?;
    Ok(Reply::json(200, &sandbox_json(&record, app.lifecycle.deadline(&id))))
}

/// `hibernate`: answers the sandbox (`status` `hibernated`), with `sizeBytes` (state and memory
/// kept on the data disk) when this call wrote the snapshot; a hibernated sandbox is answered as
/// it is, as OpenComputer does.
pub fn hibernate(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let (record, snapshot) = hibernation::hibernate(app, &id)?;
    let mut body = sandbox_json(&record, None);
    if let (Some(snapshot), Some(fields)) = (snapshot, body.as_object_mut()) {
        fields.insert("sizeBytes".into(), json!(snapshot.state_bytes.saturating_add(snapshot.memory_bytes)));
    }
    Ok(Reply::json(200, &body))
}

/// `wake`: answers the sandbox (`status` `running`); a running sandbox is answered as it is (with
/// the new timeout, if one is given), as OpenComputer does.
pub fn wake(app: &App, raw_id: &str, request: &mut Request) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let raw = read_body(request, MAX_JSON_BODY)?;
    let timeout = if raw.iter().all(u8::is_ascii_whitespace) { None } else { parse_json::<WakeBody>(&raw)?.timeout };
    // 0: no automatic stop (or hibernation).
    let timeout = timeout.map(|t| if t == 0 { Ok(0) } else { validate::timeout_sec("timeout", t) }).transpose()?;
    let record = hibernation::wake(app, &id, timeout)?;
    Ok(Reply::json(200, &sandbox_json(&record, app.lifecycle.deadline(&id))))
}

/// Operator diagnostics: the sandbox's guest memory, written to its directory on the data disk.
pub fn memory_dump(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let (backend, record) = sandbox_ops::require_running(app, &id)?;
    app.capacity.check_disk_for(u64::from(record.memory_mb), &format!("a memory dump of sandbox {id}"))?;
    let (path, bytes) = backend.runtime.memory_dump(&id).map_err(lifecycle::runtime_error)?;
    println!("appliance: sandbox {id}: guest memory dumped to {path} ({} MiB)", bytes >> 20);
    Ok(Reply::json(200, &json!({"path": path, "bytes": bytes})))
}

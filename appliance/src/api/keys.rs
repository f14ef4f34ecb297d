//! Project keys (operator only): made for one or more projects, shown once at creation,
//! stored only as a hash, revoked at once by deleting that hash.

use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::Request;

use crate::api::{projects, validate};
use crate::app::App;
use crate::clock::{now_unix, rfc3339};
use crate::crypto::{hash_api_key, hex, random_bytes};
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{parse_json, read_body, MAX_JSON_BODY};
use crate::lifecycle::new_id;
use crate::store::records::ProjectKeyRecord;
use crate::store::values;

/// Project keys start with this, so a leaked one is recognisable (e.g. by secret scanners).
const KEY_PREFIX: &str = "ocpk_";
const MAX_PROJECTS_PER_KEY: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    /// Project names or ids.
    projects: Vec<String>,
}

pub fn create(app: &App, request: &mut Request) -> Result<Reply, AppError> {
    let body: CreateBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    let name = body.name.trim().to_string();
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(AppError::bad_request("name must be 1-64 characters without control characters"));
    }
    if body.projects.is_empty() || body.projects.len() > MAX_PROJECTS_PER_KEY {
        return Err(AppError::bad_request(format!("projects must name 1 to {MAX_PROJECTS_PER_KEY} projects")));
    }
    let mut project_ids: Vec<String> = Vec::new();
    for wanted in &body.projects {
        let project = match validate::uuid("project", wanted) {
            Ok(_) => projects::load(app, wanted)?,
            Err(_) => projects::load_by_name(app, wanted)?,
        };
        if !project_ids.contains(&project.id) {
            project_ids.push(project.id);
        }
    }
    let mut secret = [0u8; 32];
    random_bytes(&mut secret).map_err(|e| AppError::internal(e.to_string()))?;
    let key = zeroize::Zeroizing::new(format!("{KEY_PREFIX}{}", hex(&secret)));
    let hash_hex = hex(&hash_api_key(key.as_bytes()).map_err(|e| AppError::internal(e.to_string()))?);
    let record = ProjectKeyRecord { id: new_id()?, name, project_ids, created_at: now_unix() };
    let stored = record.clone();
    app.store.write(move |wtxn, dbs| Ok(dbs.project_keys.put(wtxn, &hash_hex, &stored)?))?;
    println!(
        "appliance: project key {} ({}) created for {} project(s)",
        record.id,
        record.name,
        record.project_ids.len()
    );
    let mut answer = key_json(app, &record)?;
    answer["key"] = Value::String(key.to_string());
    Ok(Reply::json(201, &answer))
}

pub fn list(app: &App) -> Result<Reply, AppError> {
    let mut keys = app.store.read(|rtxn, dbs| values(&dbs.project_keys, rtxn))?;
    keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let body = keys.iter().map(|k| key_json(app, k)).collect::<Result<Vec<Value>, AppError>>()?;
    Ok(Reply::json(200, &body))
}

pub fn delete(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("key", raw_id)?;
    let wanted = id.clone();
    let removed = app.store.write(move |wtxn, dbs| {
        let mut hash = None;
        for item in dbs.project_keys.iter(wtxn)? {
            let (h, record) = item?;
            if record.id == wanted {
                hash = Some(h.to_string());
                break;
            }
        }
        match hash {
            Some(h) => Ok(dbs.project_keys.delete(wtxn, &h)?),
            None => Ok(false),
        }
    })?;
    if !removed {
        return Err(AppError::not_found(format!("key {id} not found")));
    }
    println!("appliance: project key {id} revoked");
    Ok(Reply::no_content())
}

/// A key as the API shows it: never the key itself, its projects with their current names
/// (null for a project deleted since).
fn key_json(app: &App, key: &ProjectKeyRecord) -> Result<Value, AppError> {
    let ids = key.project_ids.clone();
    let names: Vec<Option<String>> = app.store.read(move |rtxn, dbs| {
        let mut out = Vec::new();
        for id in &ids {
            out.push(dbs.projects.get(rtxn, id)?.map(|p| p.name));
        }
        Ok(out)
    })?;
    let projects: Vec<Value> =
        key.project_ids.iter().zip(names).map(|(id, name)| json!({"id": id, "name": name})).collect();
    Ok(json!({
        "id": key.id,
        "name": key.name,
        "scope": "project",
        "projects": projects,
        "createdAt": rfc3339(key.created_at),
    }))
}

//! `/api/secret-stores`: today's OpenComputer SDKs keep secrets in "secret stores" (a name, an
//! egress allowlist and sealed secrets). Here a secret store is a project seen through that
//! API: one set of records, two routes, so a store's secrets, allowlist and scope are the
//! project's, and `secretStore` on sandbox create names the same thing as `project`.
//!
//! Wire shapes follow the published clients: store `{id, name, egressAllowlist, createdAt,
//! updatedAt}`; secret entry `{name, storeId, allowedHosts}` (never a value); setting a
//! secret answers `200 {name, status: "set"}`.

use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::Request;

use crate::api::projects::{self, Changes};
use crate::api::{scope, secrets};
use crate::app::App;
use crate::auth::Caller;
use crate::clock::rfc3339;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{parse_json, read_body, MAX_JSON_BODY};
use crate::store::records::ProjectRecord;
use crate::store::values;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoreBody {
    name: Option<String>,
    egress_allowlist: Option<Vec<String>>,
}

fn store_json(p: &ProjectRecord) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "egressAllowlist": p.egress_allowlist,
        "createdAt": rfc3339(p.created_at),
        "updatedAt": rfc3339(p.updated_at),
    })
}

/// A store is created with the appliance's sandbox defaults; `/api/projects` can change them.
pub fn create(app: &App, request: &mut Request) -> Result<Reply, AppError> {
    let body: StoreBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    let name = body.name.filter(|n| !n.is_empty()).ok_or_else(|| AppError::bad_request("name is required"))?;
    let record = projects::with_defaults(name, &body.egress_allowlist.unwrap_or_default())?;
    projects::insert(app, &record)?;
    Ok(Reply::json(201, &store_json(&record)))
}

pub fn list(app: &App, caller: &Caller) -> Result<Reply, AppError> {
    let mut stores = app.store.read(|rtxn, dbs| values(&dbs.projects, rtxn))?;
    stores.retain(|p| scope::visible(caller, Some(&p.id)));
    stores.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
    Ok(Reply::json(200, &stores.iter().map(store_json).collect::<Vec<_>>()))
}

pub fn get(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    Ok(Reply::json(200, &store_json(&load(app, raw_id)?)))
}

/// Unlike a project update, an empty `egressAllowlist` here clears it (the SDK sends `[]` to
/// mean that); an absent one keeps it.
pub fn update(app: &App, raw_id: &str, request: &mut Request) -> Result<Reply, AppError> {
    load(app, raw_id)?;
    let body: StoreBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    let changes = Changes {
        name: body.name.filter(|n| !n.is_empty()),
        egress_allowlist: body.egress_allowlist,
        ..Changes::default()
    };
    Ok(Reply::json(200, &store_json(&projects::apply(app, raw_id, changes)?)))
}

pub fn delete(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    load(app, raw_id)?;
    projects::delete(app, raw_id)
}

pub fn list_secrets(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let store = load(app, raw_id)?;
    let body: Vec<Value> = secrets::entries(app, &store.id)?
        .into_iter()
        .map(|(name, hosts)| json!({"name": name, "storeId": store.id, "allowedHosts": hosts}))
        .collect();
    Ok(Reply::json(200, &body))
}

pub fn put_secret(
    app: &App,
    caller: &Caller,
    raw_id: &str,
    name: &str,
    request: &mut Request,
) -> Result<Reply, AppError> {
    load(app, raw_id)?;
    secrets::store(app, caller, raw_id, name, request)?;
    Ok(Reply::json(200, &json!({"name": name, "status": "set"})))
}

pub fn delete_secret(app: &App, raw_id: &str, name: &str) -> Result<Reply, AppError> {
    load(app, raw_id)?;
    secrets::delete(app, raw_id, name)
}

/// The project behind store `raw_id`, or 404 in the words of this API.
fn load(app: &App, raw_id: &str) -> Result<ProjectRecord, AppError> {
    projects::load(app, raw_id).map_err(|e| {
        if e.status == 404 {
            AppError::not_found(format!("secret store {raw_id} not found"))
        } else {
            e
        }
    })
}

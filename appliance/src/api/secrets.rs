//! Project secrets: values are sealed with the master key before they reach the
//! store; only names and their allowed hosts ever come back out. Every change reaches the
//! project's running sandboxes before the answer (`seal_sync`).

use serde::Deserialize;
use serde_json::json;
use tiny_http::Request;

use crate::auth::Caller;
use zeroize::Zeroizing;

use crate::api::validate;
use crate::app::App;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{parse_json_redacted, read_body, MAX_JSON_BODY};
use crate::seal_sync;
use crate::store::records::{secret_associated_data, secret_key, SecretHostsRecord};

pub const MAX_SECRET_LEN: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretBody {
    value: Zeroizing<String>,
    /// Hosts this secret may reach instead of its project's egress allowlist (the field of
    /// today's OpenComputer API). Absent or empty: the project's allowlist.
    allowed_hosts: Option<Vec<String>>,
}

pub fn put(app: &App, caller: &Caller, raw_id: &str, name: &str, request: &mut Request) -> Result<Reply, AppError> {
    store(app, caller, raw_id, name, request)?;
    Ok(Reply::no_content())
}

/// Seals and stores the secret in `request`'s body; running sandboxes of the project have its
/// token bound to the new value before this returns.
pub fn store(app: &App, caller: &Caller, raw_id: &str, name: &str, request: &mut Request) -> Result<(), AppError> {
    let project_id = validate::uuid("project", raw_id)?;
    validate::env_name("secret", name)?;
    let body = read_body(request, MAX_JSON_BODY)?;
    let secret: SecretBody = parse_json_redacted(
        &body,
        "a JSON object {\"value\": \"<string>\", \"allowedHosts\": [\"<host>\", ...]} (allowedHosts optional)",
    )?;
    drop(body);
    let hosts = validate::host_list("allowedHosts", secret.allowed_hosts.as_deref().unwrap_or_default())?;
    // A secret's own hosts widen where its value may go, as the project's allowlist does.
    if !hosts.is_empty() && *caller != Caller::Operator {
        return Err(AppError::forbidden(
            "setting a secret's allowedHosts needs the operator scope; without them the secret follows its project's allowlist",
        ));
    }
    if secret.value.is_empty() {
        return Err(AppError::bad_request("secret value must not be empty"));
    }
    if secret.value.len() > MAX_SECRET_LEN {
        return Err(AppError::too_large(format!("secret value exceeds {MAX_SECRET_LEN} bytes")));
    }
    // The proxy puts values into request heads: CR or LF would let a value add
    // header lines of its own, NUL is refused by HTTP parsers. Name the byte, never the value.
    if let Some(what) = header_breaking_byte(secret.value.as_bytes()) {
        return Err(AppError::bad_request(format!(
            "secret value must not contain {what}: it is sent in HTTP headers, where it would break or inject header lines"
        )));
    }
    let blob = app
        .keyring
        .seal(secret.value.as_bytes(), &secret_associated_data(&project_id, name))
        .map_err(|e| AppError::internal(format!("cannot encrypt secret: {e}")))?;
    drop(secret);
    let key = secret_key(&project_id, name);
    let pid = project_id.clone();
    let (keyring, aad) = (std::sync::Arc::clone(&app.keyring), secret_associated_data(&project_id, name));
    // Value and hosts are replaced together: a PUT without allowedHosts clears earlier ones.
    app.store.write(move |wtxn, dbs| {
        if dbs.projects.get(wtxn, &pid)?.is_none() {
            return Err(AppError::not_found(format!("project {pid} not found")));
        }
        // A master-key rotation may have run since the value was sealed.
        let blob =
            keyring.keep_current(blob, &aad).map_err(|e| AppError::internal(format!("cannot encrypt secret: {e}")))?;
        dbs.secrets.put(wtxn, &key, &blob)?;
        if hosts.is_empty() {
            dbs.secret_hosts.delete(wtxn, &key)?;
        } else {
            dbs.secret_hosts.put(wtxn, &key, &SecretHostsRecord { allowed_hosts: hosts })?;
        }
        Ok(())
    })?;
    seal_sync::republish_project(app, &project_id)
}

/// The first byte of `value` that cannot appear in an HTTP header field value.
fn header_breaking_byte(value: &[u8]) -> Option<&'static str> {
    value.iter().find_map(|b| match b {
        b'\r' => Some("a carriage return (CR)"),
        b'\n' => Some("a line feed (LF)"),
        0 => Some("a NUL byte"),
        _ => None,
    })
}

/// `[{"name", "allowedHosts"}]` sorted by name, as today's OpenComputer API lists secret
/// entries; `allowedHosts` is `[]` for a secret that follows its project's allowlist (also
/// every secret stored before per-secret hosts existed).
pub fn list(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let body: Vec<_> =
        entries(app, raw_id)?.into_iter().map(|(name, hosts)| json!({"name": name, "allowedHosts": hosts})).collect();
    Ok(Reply::json(200, &body))
}

/// (name, allowed hosts) of each secret of project `raw_id`, sorted by name; never a value.
pub fn entries(app: &App, raw_id: &str) -> Result<Vec<(String, Vec<String>)>, AppError> {
    let project_id = validate::uuid("project", raw_id)?;
    app.store.read(|rtxn, dbs| {
        if dbs.projects.get(rtxn, &project_id)?.is_none() {
            return Err(AppError::not_found(format!("project {project_id} not found")));
        }
        let prefix = format!("{project_id}/");
        let mut entries = Vec::new();
        for item in dbs.secrets.prefix_iter(rtxn, &prefix)? {
            let key = item?.0;
            let hosts = dbs.secret_hosts.get(rtxn, key)?.map(|r| r.allowed_hosts).unwrap_or_default();
            entries.push((key[prefix.len()..].to_string(), hosts));
        }
        Ok(entries)
    })
}

pub fn delete(app: &App, raw_id: &str, name: &str) -> Result<Reply, AppError> {
    let project_id = validate::uuid("project", raw_id)?;
    validate::env_name("secret", name)?;
    let key = secret_key(&project_id, name);
    let name = name.to_string();
    let pid = project_id.clone();
    app.store.write(move |wtxn, dbs| {
        if dbs.projects.get(wtxn, &pid)?.is_none() {
            return Err(AppError::not_found(format!("project {pid} not found")));
        }
        if !dbs.secrets.delete(wtxn, &key)? {
            return Err(AppError::not_found(format!("secret {name} not found in project {pid}")));
        }
        dbs.secret_hosts.delete(wtxn, &key)?;
        Ok(())
    })?;
    seal_sync::republish_project(app, &project_id)?;
    Ok(Reply::no_content())
}

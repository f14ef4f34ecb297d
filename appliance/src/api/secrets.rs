//! Project secrets: values are sealed with the master key before they reach the
//! store; only names ever come back out.

use serde::Deserialize;
use tiny_http::Request;
use zeroize::Zeroizing;

use crate::api::validate;
use crate::app::App;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{parse_json_redacted, read_body, MAX_JSON_BODY};
use crate::store::records::{secret_associated_data, secret_key};

pub const MAX_SECRET_LEN: usize = 64 * 1024;

#[derive(Deserialize)]
struct SecretBody {
    value: Zeroizing<String>,
}

pub fn put(app: &App, raw_id: &str, name: &str, request: &mut Request) -> Result<Reply, AppError> {
    let project_id = validate::uuid("project", raw_id)?;
    validate::env_name("secret", name)?;
    let body = read_body(request, MAX_JSON_BODY)?;
    let secret: SecretBody = parse_json_redacted(&body, "a JSON object {\"value\": \"<string>\"}")?;
    drop(body);
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
    app.store.write(move |wtxn, dbs| {
        if dbs.projects.get(wtxn, &project_id)?.is_none() {
            return Err(AppError::not_found(format!("project {project_id} not found")));
        }
        dbs.secrets.put(wtxn, &key, &blob)?;
        Ok(())
    })?;
    Ok(Reply::no_content())
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

pub fn list(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let project_id = validate::uuid("project", raw_id)?;
    let names = app.store.read(|rtxn, dbs| {
        if dbs.projects.get(rtxn, &project_id)?.is_none() {
            return Err(AppError::not_found(format!("project {project_id} not found")));
        }
        let prefix = format!("{project_id}/");
        let mut names = Vec::new();
        for item in dbs.secrets.prefix_iter(rtxn, &prefix)? {
            names.push(item?.0[prefix.len()..].to_string());
        }
        Ok(names)
    })?;
    Ok(Reply::json(200, &names))
}

pub fn delete(app: &App, raw_id: &str, name: &str) -> Result<Reply, AppError> {
    let project_id = validate::uuid("project", raw_id)?;
    validate::env_name("secret", name)?;
    let key = secret_key(&project_id, name);
    let name = name.to_string();
    app.store.write(move |wtxn, dbs| {
        if dbs.projects.get(wtxn, &project_id)?.is_none() {
            return Err(AppError::not_found(format!("project {project_id} not found")));
        }
        if !dbs.secrets.delete(wtxn, &key)? {
            return Err(AppError::not_found(format!("secret {name} not found in project {project_id}")));
        }
        Ok(())
    })?;
    Ok(Reply::no_content())
}

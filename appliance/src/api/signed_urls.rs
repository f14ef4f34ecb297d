//! Signed file URLs: `POST .../files/download-url` and `.../files/upload-url` (with a key) sign a
//! URL that anyone may then use without one, once per request, until it expires:
//! `GET .../files/download?path=&expires=&signature=` or `PUT .../files/upload?...`. The
//! signature, the key and the checks are `url_signing`'s; the transfers themselves are the file
//! routes' own streamed reads and writes (`api::files`).

use serde::Deserialize;
use serde_json::json;
use tiny_http::{Method, Request};

use crate::api::validate;
use crate::app::App;
use crate::auth::{Caller, SignedGrant};
use crate::clock::{now_unix, rfc3339};
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{header, parse_json, query_param, read_body, split_url, MAX_JSON_BODY};
use crate::http::route::Route;
use crate::sandbox_ops;
use crate::store::records::SandboxStatus;
use crate::url_signing::{self, refused, Transfer};

/// How long a URL lives when the request does not say (the SDKs' default too).
pub const DEFAULT_EXPIRES_IN: i64 = 3600;
/// The longest a URL may live: a day.
pub const MAX_EXPIRES_IN: i64 = 86_400;
/// The longest `Host` header put in a URL.
const MAX_HOST_LEN: usize = 255;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UrlRequest {
    path: Option<String>,
    expires_in: Option<i64>,
}

/// `POST .../files/{download,upload}-url` with `{"path", "expiresIn"?}` (seconds, 1 to 86400,
/// 3600 when absent): `200 {"url", "expiresAt"}`. The sandbox must be running, as for the file
/// routes; the URL's origin is the request's `Host` and the scheme the API is served with.
pub fn create(app: &App, raw_id: &str, transfer: Transfer, request: &mut Request) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let body: UrlRequest = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    let path = validate::sandbox_path(Some(body.path.ok_or_else(|| AppError::bad_request("path is required"))?))?;
    let expires_in = body.expires_in.unwrap_or(DEFAULT_EXPIRES_IN);
    if !(1..=MAX_EXPIRES_IN).contains(&expires_in) {
        return Err(AppError::bad_request(format!(
            "expiresIn must be between 1 and {MAX_EXPIRES_IN} seconds, got {expires_in}"
        )));
    }
    let host = host(request)?;
    // Signing needs no guest: a hibernated sandbox is woken by the transfer itself.
    let record = sandbox_ops::get(app, &id)?;
    if !matches!(record.status, SandboxStatus::Running | SandboxStatus::Hibernated) {
        return Err(AppError::conflict(format!("sandbox {id} is {}", record.status.as_str())));
    }
    let key = url_signing::signing_key(&app.store, &app.keyring)?;
    let expires = now_unix().saturating_add(expires_in);
    let signature = url_signing::sign(&key, transfer, &id, expires, &path);
    let url = format!(
        "{}://{host}/api/sandboxes/{id}/files/{}?path={}&expires={expires}&signature={signature}",
        app.api_scheme,
        transfer.endpoint(),
        url_signing::encode_query_value(&path)
    );
    Ok(Reply::json(200, &json!({"url": url, "expiresAt": rfc3339(expires)})))
}

/// The request's `Host` (`name`, `name:port`, `[v6]:port`), which the URL is built on: 400 when it
/// is missing or holds anything else.
fn host(request: &Request) -> Result<String, AppError> {
    let host = header(request, "Host").map(str::trim).filter(|h| !h.is_empty()).ok_or_else(|| {
        AppError::bad_request("a signed URL is built on the request's Host header, and this request has none")
    })?;
    let ok = host.len() <= MAX_HOST_LEN
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_'));
    if ok {
        Ok(host.to_string())
    } else {
        Err(AppError::bad_request("the request's Host header is not a host name or address with a port"))
    }
}

/// The caller of a request to a signed transfer route that carries `signature`: a grant for that
/// one transfer when the signature, expiry and method check out, else 403. `None` for every other
/// request (authenticated by its key as usual; the transfer routes also serve a key without a
/// signature, as plain file routes).
pub fn signed_caller(
    app: &App,
    route: &Result<Option<Route>, AppError>,
    method: &Method,
    url: &str,
) -> Option<Result<Caller, AppError>> {
    let (raw_id, transfer) = match route {
        Ok(Some(Route::FilesDownload(id))) => (id, Transfer::Download),
        Ok(Some(Route::FilesUpload(id))) => (id, Transfer::Upload),
        _ => return None,
    };
    let query = split_url(url).1;
    let signature = match query_param(query, "signature") {
        Ok(Some(signature)) => signature,
        Ok(None) => return None,
        Err(e) => return Some(Err(e)),
    };
    Some(verify(app, raw_id, transfer, method, query, &signature))
}

fn verify(
    app: &App,
    raw_id: &str,
    transfer: Transfer,
    method: &Method,
    query: &str,
    signature: &str,
) -> Result<Caller, AppError> {
    if method.as_str() != transfer.method() {
        return Err(refused(&format!("a signed {} URL is used with {} only", transfer.endpoint(), transfer.method())));
    }
    // Not a UUID: it cannot have been signed.
    let sandbox_id = validate::uuid("sandbox", raw_id).map_err(|_| refused("its sandbox id is not a sandbox id"))?;
    let path = query_param(query, "path")?.ok_or_else(|| refused("it has no path"))?;
    let expires = query_param(query, "expires")?
        .and_then(|e| e.parse::<i64>().ok())
        .ok_or_else(|| refused("it has no expiry in unix seconds"))?;
    let key = url_signing::existing_key(&app.store, &app.keyring)?
        .ok_or_else(|| refused("this appliance has signed no URL yet"))?;
    url_signing::verify(&key, transfer, &sandbox_id, expires, &path, signature, now_unix())?;
    Ok(Caller::SignedUrl(SignedGrant { sandbox_id, transfer }))
}

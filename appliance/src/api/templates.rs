//! `/api/templates` with the fields of OpenComputer's template objects (`templateID`, `name`,
//! `tag`, `status`, `createdAt`) and what an operator needs beside them (where it came from, its
//! size, the image's defaults). A template is made by uploading an archive, not by building a
//! Dockerfile: an appliance may have no network to fetch base images from.
//!
//! - `GET /api/templates`, `GET /api/templates/{name}`;
//! - `POST /api/templates?name=N[&tag=T]` with the archive as the body: `Content-Type:
//!   application/x-tar` (or an OCI/docker archive media type) for an image archive, found to be
//!   an OCI image layout or a `docker save` archive from its content;
//!   `application/vnd.opencomputer.rootfs+tar` for a root filesystem tarball (plain, gzip or zstd);
//! - `POST /api/sandboxes/{id}/template {"name": N}`: the sandbox's disk as a new template;
//! - `DELETE /api/templates/{name}` (204).

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tiny_http::Request;

use crate::api::validate;
use crate::app::App;
use crate::clock::rfc3339;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{header, parse_json, query_param, read_body, split_url, MAX_JSON_BODY};
use crate::http::upload::UploadBody;
use crate::templates::{self as ops, TemplateView, Upload, UploadKind};

/// Media types of image archives (`docker save`, `skopeo copy ... oci-archive:`, `podman save`).
const IMAGE_ARCHIVE_TYPES: &[&str] = &[
    "application/x-tar",
    "application/tar",
    "application/vnd.oci.image.layout.v1+tar",
    "application/vnd.docker.image.archive+tar",
    "application/x-docker-archive",
    "application/octet-stream",
];
/// The media type of a root filesystem tarball (it may be gzip or zstd compressed).
const ROOTFS_TYPE: &str = "application/vnd.opencomputer.rootfs+tar";
const MAX_TAG_BYTES: usize = 128;

fn template_json(t: &TemplateView) -> Value {
    let disk = &t.disk;
    let mut body = json!({
        "templateID": disk.name,
        "name": disk.name,
        "tag": t.record.as_ref().map_or("latest", |r| r.tag.as_str()),
        "status": "ready",
        "builtIn": disk.built_in,
        "sizeBytes": disk.allocated,
        "diskMB": disk.length >> 20,
    });
    if let Some(record) = &t.record {
        let defaults = &record.defaults;
        let env: Map<String, Value> = defaults.env.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
        body["source"] = json!(record.source.as_str());
        body["sourceDigest"] = json!(record.source_digest);
        body["createdAt"] = json!(rfc3339(record.created_at));
        body["defaults"] = json!({
            "env": env,
            "workingDir": defaults.working_dir,
            "user": defaults.user,
            "entrypoint": defaults.entrypoint,
            "cmd": defaults.cmd,
        });
    } else {
        body["source"] = json!("image");
    }
    body
}

pub fn list(app: &App) -> Result<Reply, AppError> {
    let all = ops::list(app)?;
    Ok(Reply::json(200, &all.iter().map(template_json).collect::<Vec<_>>()))
}

pub fn get(app: &App, name: &str) -> Result<Reply, AppError> {
    Ok(Reply::json(200, &template_json(&ops::get(app, name)?)))
}

pub fn delete(app: &App, name: &str) -> Result<Reply, AppError> {
    ops::delete(app, name)?;
    Ok(Reply::no_content())
}

/// What the Content-Type says the body is; a JSON body is OpenComputer's Dockerfile build.
fn upload_kind(request: &Request) -> Result<UploadKind, AppError> {
    let raw = header(request, "Content-Type").unwrap_or("");
    let media = raw.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if media == ROOTFS_TYPE {
        return Ok(UploadKind::RootfsTarball);
    }
    if IMAGE_ARCHIVE_TYPES.contains(&media.as_str()) {
        return Ok(UploadKind::ImageArchive);
    }
    if media == "application/json" {
        return Err(AppError::bad_request(
            "this appliance does not build templates from Dockerfiles (it may have no network to fetch a base image): build the image elsewhere, save it (docker save, skopeo copy ... oci-archive:) and upload the archive with POST /api/templates?name=NAME and Content-Type: application/x-tar",
        ));
    }
    Err(AppError::new(
        415,
        format!(
            "Content-Type {raw:?} is not an archive this appliance imports: give application/x-tar for an image archive (OCI layout or docker save) or {ROOTFS_TYPE} for a root filesystem tarball"
        ),
    ))
}

/// Whatever is refused, the rest of the body is read and dropped, so the client reads the answer
/// (and tiny_http never drains a long body into one buffer).
pub fn import(app: &App, request: &mut Request) -> Result<Reply, AppError> {
    let url = request.url().to_string();
    let kind = upload_kind(request);
    let mut body = UploadBody::open(request, ops::MAX_ARCHIVE_BYTES)?;
    let imported = kind.and_then(|kind| import_body(app, split_url(&url).1, kind, &mut body));
    if imported.is_err() {
        body.discard_rest();
    }
    imported
}

fn import_body(app: &App, query: &str, kind: UploadKind, body: &mut UploadBody) -> Result<Reply, AppError> {
    let name = query_param(query, "name")?.filter(|n| !n.is_empty()).ok_or_else(|| {
        AppError::bad_request("name is required: POST /api/templates?name=NAME with the archive as the body")
    })?;
    validate::template(&name)?;
    let tag = check_tag(query_param(query, "tag")?)?;
    let declared_bytes = body.expected();
    let imported = ops::import(app, Upload { name: &name, tag: &tag, kind, declared_bytes, body: &mut *body });
    // A body that ended early or could not be read is the client's doing, whatever the import saw.
    let template = imported.map_err(|e| body.problem().unwrap_or(e))?;
    Ok(Reply::json(201, &template_json(&template)))
}

/// A template's tag: `latest` unless given.
fn check_tag(raw: Option<String>) -> Result<String, AppError> {
    let tag = raw.filter(|t| !t.is_empty()).unwrap_or_else(|| "latest".into());
    if tag.len() > MAX_TAG_BYTES || tag.chars().any(char::is_control) {
        return Err(AppError::bad_request(format!("tag must be 1-{MAX_TAG_BYTES} bytes without control characters")));
    }
    Ok(tag)
}

#[derive(Deserialize)]
struct SaveBody {
    name: Option<String>,
    tag: Option<String>,
}

pub fn save_sandbox(app: &App, raw_id: &str, request: &mut Request) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let body: SaveBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    let name = body
        .name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| AppError::bad_request("name is required: {\"name\": \"my-template\"}"))?;
    let tag = check_tag(body.tag)?;
    let template = ops::save_sandbox(app, &id, &name, &tag)?;
    Ok(Reply::json(201, &template_json(&template)))
}

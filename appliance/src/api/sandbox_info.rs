//! What a sandbox's record does not hold but clients ask about: its guest console
//! (`GET .../logs`) and where its egress may go (`GET .../allowed-hosts`). Both answer for
//! stopped sandboxes too, while their records exist, and neither counts as use of the sandbox.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::api::validate;
use crate::app::App;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::lifecycle::runtime_error;
use crate::sandbox_ops;
use crate::seal_sync;

/// The most of a console the API answers with: its latest output, from a line start. The
/// runtime keeps this much of an ended sandbox's console.
pub const LOG_TAIL_BYTES: u64 = 256 << 10;

/// `GET /api/sandboxes/{id}/logs`: the tail of the guest console as `text/plain` (invalid UTF-8
/// replaced). Only what the guest wrote to its serial console; empty when it wrote nothing.
pub fn logs(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    sandbox_ops::get(app, &id)?;
    let backend = app.lifecycle.backend()?;
    let tail = backend.runtime.console_tail(&id, LOG_TAIL_BYTES).map_err(runtime_error)?;
    let end = tail.len().min(usize::try_from(LOG_TAIL_BYTES).unwrap_or(usize::MAX));
    let text = String::from_utf8_lossy(&tail[tail.len() - end..]).into_owned();
    Ok(Reply::text(200, text, "text/plain; charset=utf-8"))
}

/// `GET /api/sandboxes/{id}/allowed-hosts`: `{sandboxID, secretStore?, egressAllowlist,
/// perSecretAllowedHosts}` as today's OpenComputer API answers it. `secretStore` is the
/// sandbox's project; a running sandbox reports what the proxy applies to it now (the allowlist
/// it was last given, which a deleted project's sandboxes keep), an ended one its project's
/// current settings. Secrets without hosts of their own follow the allowlist and are left out.
pub fn allowed_hosts(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let record = sandbox_ops::get(app, &id)?;
    let mut body = Map::new();
    body.insert("sandboxID".into(), json!(id));
    let Some(project_id) = record.project_id.clone() else {
        body.insert("egressAllowlist".into(), json!([]));
        body.insert("perSecretAllowedHosts".into(), json!({}));
        return Ok(Reply::json(200, &Value::Object(body)));
    };
    let live = seal_sync::published(app, &id);
    let (project, per_secret) = app.store.read(|rtxn, dbs| {
        let project = dbs.projects.get(rtxn, &project_id)?;
        let prefix = format!("{project_id}/");
        let mut per_secret = BTreeMap::new();
        for item in dbs.secret_hosts.prefix_iter(rtxn, &prefix)? {
            let (key, hosts) = item?;
            let name = &key[prefix.len()..];
            let held = live.as_ref().is_none_or(|(_, names)| names.iter().any(|n| n == name));
            // A secret deleted since keeps no hosts: only stored secrets count.
            if held && !hosts.allowed_hosts.is_empty() && dbs.secrets.get(rtxn, key)?.is_some() {
                per_secret.insert(name.to_string(), hosts.allowed_hosts);
            }
        }
        Ok((project, per_secret))
    })?;
    let allowlist = match (&live, &project) {
        (Some((allowlist, _)), _) => allowlist.clone(),
        (None, Some(p)) => p.egress_allowlist.clone(),
        (None, None) => Vec::new(),
    };
    let store_name = project.map(|p| p.name).or(record.project);
    if let Some(name) = store_name {
        body.insert("secretStore".into(), json!(name));
    }
    body.insert("egressAllowlist".into(), json!(allowlist));
    body.insert("perSecretAllowedHosts".into(), json!(per_secret));
    Ok(Reply::json(200, &Value::Object(body)))
}

//! The audit trail: every authenticated request that changes state (any method but GET and
//! HEAD, refused ones included) leaves one entry: which key, route, target, status and when.
//! Entries join the next group commit instead of making the request wait for one more fsync
//! (a write request would pay two commits otherwise), so an entry is on disk within a batch
//! (at most a few milliseconds) after its answer; a power cut in that window can lose the
//! newest entries. The trail keeps the newest MAX_ENTRIES.

use serde_json::{json, Value};
use tiny_http::Method;

use crate::app::App;
use crate::auth::Caller;
use crate::clock::{now_unix, rfc3339};
use crate::error::AppError;
use crate::store::records::AuditRecord;

pub const MAX_ENTRIES: u64 = 100_000;
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

/// Sequence numbers as keys that sort in order.
fn key(seq: u64) -> String {
    format!("{seq:020}")
}

/// Whether a request with `method` is recorded.
pub fn changes_state(method: &Method) -> bool {
    !matches!(method, Method::Get | Method::Head)
}

/// Appends an entry for a request (see the module comment for when it is durable).
pub fn record(app: &App, caller: &Caller, method: &Method, route: &str, target: &str, status: u16) {
    let mut entry = AuditRecord {
        seq: 0,
        time: now_unix(),
        key_id: caller.key_id().to_string(),
        method: method.to_string(),
        route: route.to_string(),
        target: target.to_string(),
        status,
    };
    let queued = app.store.write_detached(move |wtxn, dbs| {
        let last = dbs.audit.last(wtxn)?.map_or(0, |(_, e)| e.seq);
        entry.seq = last + 1;
        dbs.audit.put(wtxn, &key(entry.seq), &entry)?;
        if entry.seq > MAX_ENTRIES {
            dbs.audit.delete(wtxn, &key(entry.seq - MAX_ENTRIES))?;
        }
        Ok(())
    });
    if let Err(e) = queued {
        println!("appliance: audit: cannot record {method} {route} ({status}): {}", e.message);
    }
}

/// `GET /api/audit?limit=N&before=SEQ`: newest first; `next` is the `before` of the next page.
pub fn page(app: &App, query: &str) -> Result<Value, AppError> {
    let mut limit = DEFAULT_PAGE;
    let mut before = u64::MAX;
    for (name, value) in query.split('&').filter(|p| !p.is_empty()).filter_map(|p| p.split_once('=')) {
        let number = || value.parse::<u64>().map_err(|_| AppError::bad_request(format!("{name} must be a number")));
        match name {
            "limit" => limit = usize::try_from(number()?).unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE),
            "before" => before = number()?,
            _ => return Err(AppError::bad_request(format!("unknown query parameter {name:?} (limit, before)"))),
        }
    }
    // Entries of requests already answered may still wait in the committer's queue; a write
    // queued behind them returns once they are on disk, so a reader sees every earlier request.
    app.store.write(|_, _| Ok(()))?;
    let upper = key(before);
    let entries: Vec<AuditRecord> = app.store.read(move |rtxn, dbs| {
        let mut out = Vec::new();
        let range = (std::ops::Bound::Unbounded, std::ops::Bound::Excluded(upper.as_str()));
        for item in dbs.audit.rev_range(rtxn, &range)? {
            out.push(item?.1);
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    })?;
    let next = match entries.last() {
        Some(last) if entries.len() == limit && last.seq > 1 => json!(last.seq),
        _ => Value::Null,
    };
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "seq": e.seq, "time": rfc3339(e.time), "keyID": e.key_id, "method": e.method,
                "route": e.route, "target": e.target, "status": e.status,
            })
        })
        .collect();
    Ok(json!({"entries": entries, "next": next}))
}

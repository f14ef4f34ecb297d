//! The audit trail over real HTTP: one entry per authenticated state-changing request, with the
//! key, route, target and status, never a secret value or key; paged newest first; kept across
//! a restart; readable by the operator only.

mod common;

use common::{Client, Harness};
use serde_json::{json, Value};

const SECRET_VALUE: &str = "audit-plaintext-5b0e9d1c";

fn entries(c: &mut Client, query: &str) -> Value {
    let (status, page) = c.call("GET", &format!("/api/audit{query}"), "");
    assert_eq!(status, 200, "{page}");
    page
}

/// (keyID, method, route, status) of each entry, oldest first.
fn summary(page: &Value) -> Vec<(String, String, String, u64)> {
    let mut out: Vec<_> = page["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["keyID"].as_str().unwrap_or_default().to_string(),
                e["method"].as_str().unwrap_or_default().to_string(),
                e["route"].as_str().unwrap_or_default().to_string(),
                e["status"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    out.reverse();
    out
}

#[test]
fn state_changes_are_recorded_without_values_paged_and_kept() {
    let mut h = Harness::start("audit");
    let mut op = h.client();
    let (_, p) = op.call("POST", "/api/projects", r#"{"name":"audited"}"#);
    let pid = p["id"].as_str().expect("id").to_string();
    let put = json!({"value": SECRET_VALUE}).to_string();
    assert_eq!(op.call("PUT", &format!("/api/projects/{pid}/secrets/TOKEN"), &put).0, 204);
    let (_, key) = op.call("POST", "/api/keys", r#"{"name":"agent","projects":["audited"]}"#);
    let (key_id, project_key) = (key["id"].as_str().expect("id"), key["key"].as_str().expect("key").to_string());
    let mut pk = Client::new(h.addr, Some(&project_key));
    assert_eq!(pk.call("PUT", &format!("/api/projects/{pid}"), r#"{"timeoutSec":60}"#).0, 403);
    assert_eq!(pk.call("POST", "/api/sandboxes", r#"{"project":"audited"}"#).0, 201);
    // Neither reads nor unauthenticated requests are recorded.
    assert_eq!(pk.call("GET", "/api/projects", "").0, 200);
    assert_eq!(Client::new(h.addr, Some("not-a-key-at-all")).call("POST", "/api/projects", "{}").0, 401);

    let page = entries(&mut op, "");
    let admin = |m: &str, r: &str, s: u64| ("admin".to_string(), m.to_string(), r.to_string(), s);
    let project = |m: &str, r: &str, s: u64| (key_id.to_string(), m.to_string(), r.to_string(), s);
    assert_eq!(
        summary(&page),
        vec![
            admin("POST", "/api/projects", 201),
            admin("PUT", "/api/projects/{id}/secrets/{name}", 204),
            admin("POST", "/api/keys", 201),
            project("PUT", "/api/projects/{id}", 403),
            project("POST", "/api/sandboxes", 201),
        ]
    );
    assert_eq!(page["entries"][3]["target"], format!("/api/projects/{pid}/secrets/TOKEN"));
    let text = page.to_string();
    assert!(!text.contains(SECRET_VALUE) && !text.contains(&project_key), "no value or key in the trail: {text}");
    assert!(page["entries"][0]["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{text}");

    // Pages of two, newest first, until `next` is null.
    let mut seen = Vec::new();
    let mut query = "?limit=2".to_string();
    loop {
        let page = entries(&mut op, &query);
        seen.extend(page["entries"].as_array().expect("entries").iter().map(|e| e["seq"].as_u64().expect("seq")));
        match page["next"].as_u64() {
            Some(next) => query = format!("?limit=2&before={next}"),
            None => break,
        }
    }
    assert_eq!(seen, vec![5, 4, 3, 2, 1]);
    assert_eq!(op.call("GET", "/api/audit?limit=x", "").0, 400);

    // Operator only, and kept across a restart.
    let (status, refused) = pk.call("GET", "/api/audit", "");
    assert_eq!(status, 403, "{refused}");
    h.restart();
    let mut op = h.client();
    assert_eq!(summary(&entries(&mut op, "")).len(), 5);
}

//! Key scopes over real HTTP: every route tried with the operator key and with a project key,
//! project keys made, listed, shown once and revoked.

mod common;

use common::{Client, Harness};
use serde_json::{json, Value};

/// What the operator key gets on a route.
#[derive(Clone, Copy, Debug)]
enum Operator {
    Exactly(u16),
    /// Authorised: any status but 401 and 403 (the route's own answer depends on the double).
    Allowed,
    /// Not tried with the operator key (it would undo what later rows need).
    Skipped,
}

fn id_of(v: &Value, field: &str) -> String {
    v[field].as_str().unwrap_or_else(|| panic!("no {field} in {v}")).to_string()
}

/// Projects a and b, a sandbox in each and one outside any project, a key for project a
/// and another key for project b.
struct Fixture {
    pa: String,
    pb: String,
    sa: String,
    sb: String,
    s0: String,
    project_key: String,
    other_key_id: String,
}

fn fixture(op: &mut Client) -> Fixture {
    let (_, a) = op.call("POST", "/api/projects", r#"{"name":"a","egressAllowlist":["api.example.com"]}"#);
    let (_, b) = op.call("POST", "/api/projects", r#"{"name":"b"}"#);
    let (pa, pb) = (id_of(&a, "id"), id_of(&b, "id"));
    assert_eq!(op.call("PUT", &format!("/api/projects/{pb}/secrets/TOKEN"), r#"{"value":"b-secret"}"#).0, 204);
    let (_, sa) = op.call("POST", "/api/sandboxes", r#"{"project":"a"}"#);
    let (_, sb) = op.call("POST", "/api/sandboxes", r#"{"project":"b"}"#);
    let (_, s0) = op.call("POST", "/api/sandboxes", "{}");
    let (status, key) = op.call("POST", "/api/keys", r#"{"name":"agent-a","projects":["a"]}"#);
    assert_eq!(status, 201, "{key}");
    let (_, other) = op.call("POST", "/api/keys", &json!({"name": "other", "projects": [pb]}).to_string());
    Fixture {
        sa: id_of(&sa, "sandboxID"),
        sb: id_of(&sb, "sandboxID"),
        s0: id_of(&s0, "sandboxID"),
        project_key: id_of(&key, "key"),
        other_key_id: id_of(&other, "id"),
        pa,
        pb,
    }
}

type Row = (&'static str, String, String, Operator, u16);

/// Every route: method, path, body, what the operator key gets, what the project key gets.
/// Rows run in order, the project key first; later rows rely on what earlier ones did.
fn rows(f: &Fixture) -> Vec<Row> {
    use Operator::{Allowed, Exactly, Skipped};
    let Fixture { pa, pb, .. } = f;
    vec![
        ("GET", "/api/healthz".into(), String::new(), Exactly(200), 200),
        ("GET", "/metrics".into(), String::new(), Exactly(200), 403),
        ("GET", "/api/system".into(), String::new(), Exactly(200), 403),
        ("POST", "/api/system/upgrade".into(), String::new(), Allowed, 403),
        ("POST", "/api/system/reboot".into(), String::new(), Allowed, 403),
        ("POST", "/api/system/poweroff".into(), String::new(), Allowed, 403),
        ("POST", "/api/system/master-key/rotate".into(), String::new(), Exactly(200), 403),
        ("GET", "/api/keys".into(), String::new(), Exactly(200), 403),
        ("POST", "/api/keys".into(), r#"{"name":"x","projects":["a"]}"#.into(), Exactly(201), 403),
        ("GET", "/api/projects".into(), String::new(), Exactly(200), 200),
        ("POST", "/api/projects".into(), r#"{"name":"c"}"#.into(), Exactly(201), 403),
        ("GET", format!("/api/projects/{pa}"), String::new(), Exactly(200), 200),
        ("GET", format!("/api/projects/{pb}"), String::new(), Exactly(200), 403),
        ("PUT", format!("/api/projects/{pa}"), r#"{"egressAllowlist":["evil.example"]}"#.into(), Skipped, 403),
        ("PUT", format!("/api/projects/{pb}"), r#"{"timeoutSec":60}"#.into(), Exactly(200), 403),
        ("DELETE", format!("/api/projects/{pa}"), String::new(), Skipped, 403),
        ("GET", format!("/api/projects/{pa}/secrets"), String::new(), Exactly(200), 200),
        ("GET", format!("/api/projects/{pb}/secrets"), String::new(), Exactly(200), 403),
        ("PUT", format!("/api/projects/{pa}/secrets/MINE"), r#"{"value":"v1"}"#.into(), Exactly(204), 204),
        ("DELETE", format!("/api/projects/{pa}/secrets/MINE"), String::new(), Exactly(404), 204),
        (
            "PUT",
            format!("/api/projects/{pa}/secrets/HOSTED"),
            r#"{"value":"v","allowedHosts":["x.example"]}"#.into(),
            Exactly(204),
            403,
        ),
        ("PUT", format!("/api/projects/{pb}/secrets/TOKEN"), r#"{"value":"v"}"#.into(), Exactly(204), 403),
        ("DELETE", format!("/api/projects/{pb}/secrets/TOKEN"), String::new(), Skipped, 403),
        // Secret stores are projects through another API, with the same scope.
        ("GET", "/api/secret-stores".into(), String::new(), Exactly(200), 200),
        ("POST", "/api/secret-stores".into(), r#"{"name":"d"}"#.into(), Exactly(201), 403),
        ("GET", format!("/api/secret-stores/{pa}"), String::new(), Exactly(200), 200),
        ("GET", format!("/api/secret-stores/{pb}"), String::new(), Exactly(200), 403),
        ("PUT", format!("/api/secret-stores/{pa}"), r#"{"egressAllowlist":["evil.example"]}"#.into(), Skipped, 403),
        ("DELETE", format!("/api/secret-stores/{pa}"), String::new(), Skipped, 403),
        ("GET", format!("/api/secret-stores/{pa}/secrets"), String::new(), Exactly(200), 200),
        ("GET", format!("/api/secret-stores/{pb}/secrets"), String::new(), Exactly(200), 403),
        ("PUT", format!("/api/secret-stores/{pa}/secrets/STORED"), r#"{"value":"v"}"#.into(), Exactly(200), 200),
        ("DELETE", format!("/api/secret-stores/{pa}/secrets/STORED"), String::new(), Exactly(404), 204),
        ("PUT", format!("/api/secret-stores/{pb}/secrets/OTHER"), r#"{"value":"v"}"#.into(), Exactly(200), 403),
    ]
    .into_iter()
    .chain(sandbox_rows(f))
    .collect()
}

/// The sandbox routes' rows, run after `rows`' others.
fn sandbox_rows(f: &Fixture) -> Vec<Row> {
    use Operator::{Allowed, Exactly, Skipped};
    let Fixture { pb, sa, sb, s0, other_key_id, .. } = f;
    vec![
        ("GET", "/api/sandboxes".into(), String::new(), Exactly(200), 200),
        ("POST", "/api/sandboxes".into(), r#"{"project":"a"}"#.into(), Exactly(201), 201),
        ("POST", "/api/sandboxes".into(), r#"{"project":"b"}"#.into(), Exactly(201), 403),
        ("POST", "/api/sandboxes".into(), "{}".into(), Exactly(201), 403),
        ("GET", format!("/api/sandboxes/{sa}"), String::new(), Exactly(200), 200),
        ("GET", format!("/api/sandboxes/{sb}"), String::new(), Exactly(200), 403),
        ("GET", format!("/api/sandboxes/{s0}"), String::new(), Exactly(200), 403),
        ("POST", format!("/api/sandboxes/{sa}/commands"), r#"{"cmd":"echo hi"}"#.into(), Exactly(200), 200),
        ("POST", format!("/api/sandboxes/{sb}/commands"), r#"{"cmd":"echo hi"}"#.into(), Exactly(200), 403),
        ("POST", format!("/api/sandboxes/{sb}/exec/run"), r#"{"cmd":"echo hi"}"#.into(), Exactly(200), 403),
        ("POST", format!("/api/sandboxes/{sb}/exec/run-async"), r#"{"cmd":"echo hi"}"#.into(), Exactly(200), 403),
        ("GET", format!("/api/sandboxes/{sb}/exec/{sb}/result"), String::new(), Exactly(404), 403),
        ("POST", format!("/api/sandboxes/{sb}/exec"), r#"{"cmd":"cat"}"#.into(), Allowed, 403),
        ("GET", format!("/api/sandboxes/{sb}/exec"), String::new(), Exactly(200), 403),
        ("GET", format!("/api/sandboxes/{sb}/exec/some-session"), String::new(), Allowed, 403),
        ("POST", format!("/api/sandboxes/{sb}/exec/some-session/kill"), "{}".into(), Allowed, 403),
        ("POST", format!("/api/sandboxes/{sb}/pty"), r#"{"cols":80,"rows":24}"#.into(), Exactly(201), 403),
        ("GET", format!("/api/sandboxes/{sb}/pty/some-session"), String::new(), Allowed, 403),
        ("POST", format!("/api/sandboxes/{sb}/pty/some-session/resize"), r#"{"cols":9,"rows":9}"#.into(), Allowed, 403),
        ("DELETE", format!("/api/sandboxes/{sb}/pty/some-session"), String::new(), Allowed, 403),
        ("PUT", format!("/api/sandboxes/{sb}/files?path=/tmp/x"), "data".into(), Allowed, 403),
        ("GET", format!("/api/sandboxes/{sb}/files?path=/tmp/x"), String::new(), Allowed, 403),
        ("GET", format!("/api/sandboxes/{sb}/files/list?path=/tmp"), String::new(), Allowed, 403),
        ("POST", format!("/api/sandboxes/{sb}/files/mkdir?path=/tmp/d"), String::new(), Allowed, 403),
        ("DELETE", format!("/api/sandboxes/{sb}/files?path=/tmp/x"), String::new(), Allowed, 403),
        ("GET", format!("/api/sandboxes/{sb}/files/stat?path=/tmp"), String::new(), Allowed, 403),
        (
            "POST",
            format!("/api/sandboxes/{sb}/files/rename"),
            r#"{"oldPath":"/a","newPath":"/b"}"#.into(),
            Allowed,
            403,
        ),
        // Signed file URLs: signing is a use of the sandbox; a key without a signature may use the
        // signed routes as plain file routes, in its scope.
        ("POST", format!("/api/sandboxes/{sb}/files/download-url"), r#"{"path":"/tmp/x"}"#.into(), Exactly(200), 403),
        ("POST", format!("/api/sandboxes/{sb}/files/upload-url"), r#"{"path":"/tmp/x"}"#.into(), Exactly(200), 403),
        ("POST", format!("/api/sandboxes/{sa}/files/download-url"), r#"{"path":"/tmp/x"}"#.into(), Exactly(200), 200),
        ("POST", format!("/api/sandboxes/{sa}/files/upload-url"), r#"{"path":"/tmp/x"}"#.into(), Exactly(200), 200),
        ("PUT", format!("/api/sandboxes/{sb}/files/upload?path=/tmp/x"), "data".into(), Exactly(204), 403),
        ("GET", format!("/api/sandboxes/{sb}/files/download?path=/tmp/x"), String::new(), Exactly(200), 403),
        ("PUT", format!("/api/sandboxes/{sa}/files/upload?path=/tmp/y"), "data".into(), Exactly(204), 204),
        ("GET", format!("/api/sandboxes/{sa}/files/download?path=/tmp/y"), String::new(), Exactly(200), 200),
        ("GET", format!("/api/sandboxes/{sb}/logs"), String::new(), Exactly(200), 403),
        ("GET", format!("/api/sandboxes/{sa}/logs"), String::new(), Exactly(200), 200),
        ("GET", format!("/api/sandboxes/{sb}/allowed-hosts"), String::new(), Exactly(200), 403),
        ("GET", format!("/api/sandboxes/{sa}/allowed-hosts"), String::new(), Exactly(200), 200),
        // Hibernating a hibernated sandbox or waking a running one answers it as it is.
        ("POST", format!("/api/sandboxes/{sa}/hibernate"), String::new(), Exactly(200), 200),
        ("POST", format!("/api/sandboxes/{sa}/wake"), r#"{"timeout":600}"#.into(), Exactly(200), 200),
        ("POST", format!("/api/sandboxes/{sb}/hibernate"), String::new(), Exactly(200), 403),
        ("POST", format!("/api/sandboxes/{sb}/wake"), String::new(), Exactly(200), 403),
        ("POST", format!("/api/sandboxes/{sb}/checkpoints"), r#"{"name":"x"}"#.into(), Exactly(201), 403),
        ("GET", format!("/api/sandboxes/{sb}/checkpoints"), String::new(), Exactly(200), 403),
        // The operator then finds the name taken (409).
        ("POST", format!("/api/sandboxes/{sa}/checkpoints"), r#"{"name":"x"}"#.into(), Allowed, 201),
        ("GET", format!("/api/sandboxes/{sa}/checkpoints"), String::new(), Exactly(200), 200),
        ("POST", format!("/api/sandboxes/{sb}/timeout"), r#"{"timeout":600}"#.into(), Exactly(204), 403),
        ("POST", format!("/api/sandboxes/{sb}/reboot"), String::new(), Exactly(200), 403),
        ("POST", format!("/api/sandboxes/{sa}/timeout"), r#"{"timeout":600}"#.into(), Exactly(204), 204),
        ("POST", format!("/api/sandboxes/{sa}/diagnostics/memory-dump"), String::new(), Allowed, 403),
        ("DELETE", format!("/api/keys/{other_key_id}"), String::new(), Exactly(204), 403),
        ("DELETE", format!("/api/sandboxes/{sb}"), String::new(), Exactly(204), 403),
        ("DELETE", format!("/api/sandboxes/{sa}?deleteSecretStore=true"), String::new(), Skipped, 403),
        ("DELETE", format!("/api/sandboxes/{sa}"), String::new(), Exactly(404), 204),
        ("DELETE", format!("/api/projects/{pb}"), String::new(), Exactly(204), 403),
    ]
}

#[test]
fn every_route_with_the_operator_key_and_a_project_key() {
    use Operator::{Allowed, Exactly, Skipped};
    let h = Harness::start("scopes-table");
    let mut op = h.client();
    let f = fixture(&mut op);
    let mut pk = Client::new(h.addr, Some(&f.project_key));
    for (method, path, body, operator, project) in rows(&f) {
        let got = pk.raw(method, &path, body.as_bytes());
        assert_eq!(got.status, project, "project key: {method} {path}: {}", String::from_utf8_lossy(&got.body));
        if project == 403 {
            let error: Value = serde_json::from_slice(&got.body).expect("json error");
            let message = error["error"].as_str().expect("error message");
            assert!(message.contains("scope"), "{method} {path}: the 403 names the scope: {message}");
        }
        let got = match operator {
            Skipped => continue,
            _ => op.raw(method, &path, body.as_bytes()),
        };
        let what = format!("operator: {method} {path}: {} {}", got.status, String::from_utf8_lossy(&got.body));
        match operator {
            Exactly(status) => assert_eq!(got.status, status, "{what}"),
            Allowed => assert!(got.status != 401 && got.status != 403, "{what}"),
            Skipped => {}
        }
    }
    // The project key saw only its own project and sandboxes in the lists.
    let (_, projects) = pk.call("GET", "/api/projects", "");
    assert_eq!(projects.as_array().map(Vec::len), Some(1), "{projects}");
    assert_eq!(projects[0]["name"], "a");
    let (_, sandboxes) = pk.call("GET", "/api/sandboxes", "");
    let sandboxes = sandboxes.as_array().expect("list").clone();
    let ids: Vec<&str> = sandboxes.iter().filter_map(|s| s["sandboxID"].as_str()).collect();
    // Project a's two new sandboxes (one each by the key and the operator); sa was deleted.
    assert_eq!(ids.len(), 2, "{sandboxes:?}");
    assert!(
        !ids.contains(&f.sb.as_str()) && !ids.contains(&f.s0.as_str()),
        "others' sandboxes are not listed: {ids:?}"
    );
    // Its attempt to change project a's allowlist changed nothing.
    let (_, a_now) = op.call("GET", &format!("/api/projects/{}", f.pa), "");
    assert_eq!(a_now["egressAllowlist"], json!(["api.example.com"]));
}

#[test]
fn keys_are_shown_once_stored_hashed_and_revoked_at_once() {
    let h = Harness::start("scopes-keys");
    let mut op = h.client();
    let (_, p) = op.call("POST", "/api/projects", r#"{"name":"proj"}"#);
    let pid = id_of(&p, "id");

    let (status, err) = op.call("POST", "/api/keys", r#"{"name":"k","projects":[]}"#);
    assert_eq!((status, err["error"].as_str()), (400, Some("projects must name 1 to 64 projects")));
    let (status, err) = op.call("POST", "/api/keys", r#"{"name":"k","projects":["nope"]}"#);
    assert_eq!(status, 404, "{err}");
    let (status, err) = op.call("POST", "/api/keys", r#"{"name":"","projects":["proj"]}"#);
    assert_eq!(status, 400, "{err}");

    let (status, created) =
        op.call("POST", "/api/keys", &json!({"name": "ci", "projects": [pid.clone(), "proj"]}).to_string());
    assert_eq!(status, 201, "{created}");
    let key = id_of(&created, "key");
    assert!(key.starts_with("ocpk_") && key.len() == 5 + 64, "{key}");
    assert_eq!(created["projects"], json!([{"id": pid, "name": "proj"}]), "named twice, listed once");
    assert_eq!(created["scope"], "project");
    let (_, listed) = op.call("GET", "/api/keys", "");
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert!(listed[0].get("key").is_none() && !listed.to_string().contains(&key), "never shown again: {listed}");

    let mut pk = Client::new(h.addr, Some(&key));
    assert_eq!(pk.call("GET", &format!("/api/projects/{pid}"), "").0, 200);
    let kid = id_of(&created, "id");
    assert_eq!(op.call("DELETE", &format!("/api/keys/{kid}"), "").0, 204);
    let (status, err) = pk.call("GET", &format!("/api/projects/{pid}"), "");
    assert_eq!((status, err["error"].as_str()), (401, Some("invalid API key")), "revoked on the next request");
    assert_eq!(op.call("DELETE", &format!("/api/keys/{kid}"), "").0, 404);

    // Only the key's hash reached the disk.
    let mut h = h;
    h.stop();
    let mut stored = Vec::new();
    for entry in std::fs::read_dir(h.data_dir.join("store")).expect("store dir") {
        stored.extend(std::fs::read(entry.expect("entry").path()).expect("read"));
    }
    assert!(!stored.windows(key.len()).any(|w| w == key.as_bytes()), "the key is not in the store files");
}

//! The rest of the sandbox surface the published clients call: list filters, the guest console,
//! allowed hosts, file stat and rename, and the routes the appliance cannot honour (501).

mod common;

use common::{wait_ended, Client, Harness};
use serde_json::{json, Value};

fn create(c: &mut Client, body: &Value) -> String {
    let (status, s) = c.call("POST", "/api/sandboxes", &body.to_string());
    assert_eq!(status, 201, "{s}");
    s["sandboxID"].as_str().expect("id").to_string()
}

fn listed(c: &mut Client, query: &str) -> Vec<String> {
    let (status, list) = c.call("GET", &format!("/api/sandboxes{query}"), "");
    assert_eq!(status, 200, "{query}: {list}");
    let mut ids: Vec<String> =
        list.as_array().expect("array").iter().map(|s| s["sandboxID"].as_str().expect("id").to_string()).collect();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[test]
fn the_list_filters_by_metadata_and_state() {
    let h = Harness::start("surface-list");
    let mut c = h.client();
    let a = create(&mut c, &json!({"metadata": {"team": "red", "env": "prod"}}));
    let b = create(&mut c, &json!({"metadata": {"team": "red", "env": "dev"}}));
    let d = create(&mut c, &json!({"metadata": {"team": "blue & green", "env": "prod"}}));
    h.runtime.kill_vmm(&b);
    wait_ended(&mut c, &b);

    assert_eq!(listed(&mut c, ""), sorted(vec![a.clone(), b.clone(), d.clone()]));
    // E2B's form: one URL-encoded `k=v&k2=v2` value.
    assert_eq!(listed(&mut c, "?metadata=team%3Dred"), sorted(vec![a.clone(), b.clone()]));
    assert_eq!(listed(&mut c, "?metadata=team%3Dred%26env%3Dprod"), vec![a.clone()]);
    // Repeated parameters add pairs; a value holding '&' or '=' is escaped twice.
    assert_eq!(listed(&mut c, "?metadata=env%3Dprod&metadata=team%3Dblue%2520%2526%2520green"), vec![d.clone()]);
    assert_eq!(listed(&mut c, "?metadata=team%3Dnobody"), Vec::<String>::new());

    assert_eq!(listed(&mut c, "?state=running"), sorted(vec![a.clone(), d.clone()]));
    let b_state = {
        let (_, s) = c.call("GET", &format!("/api/sandboxes/{b}"), "");
        s["status"].as_str().expect("status").to_string()
    };
    assert_eq!(listed(&mut c, &format!("?state={b_state}")), vec![b.clone()]);
    assert_eq!(listed(&mut c, "?state=running,stopped,error"), sorted(vec![a.clone(), b.clone(), d.clone()]));
    assert_eq!(listed(&mut c, "?state=running&state=paused&metadata=env%3Dprod"), sorted(vec![a, d]));
    assert_eq!(listed(&mut c, "?state=paused"), Vec::<String>::new(), "no sandbox here is ever paused");

    for (query, needle) in [
        ("?state=sleeping", "unknown state \"sleeping\""),
        ("?state=running,RUNNING", "unknown state \"RUNNING\""),
        ("?metadata=team", "has no '='"),
        ("?metadata=%3Dx", "metadata keys must be 1-256 bytes"),
        ("?metadata=a%3D%zz", "percent-escape"),
    ] {
        let (status, err) = c.call("GET", &format!("/api/sandboxes{query}"), "");
        assert_eq!(status, 400, "{query}: {err}");
        let message = err["error"].as_str().expect("error");
        assert!(message.contains(needle), "{query}: {message}");
    }
}

#[test]
fn logs_are_the_bounded_tail_of_the_guest_console_while_the_record_exists() {
    let h = Harness::start("surface-logs");
    let mut c = h.client();
    let id = create(&mut c, &json!({}));
    let r = c.raw("GET", &format!("/api/sandboxes/{id}/logs"), b"");
    assert_eq!((r.status, r.body.len()), (200, 0), "a quiet guest has an empty console");

    // 300 KiB of numbered lines: the answer is the last 256 KiB at most.
    let console: Vec<u8> = (0..30_000).flat_map(|i| format!("console line {i:07}\n").into_bytes()).collect();
    h.runtime.sandboxes.lock().expect("lock").get_mut(&id).expect("sandbox").console = console.clone();
    let r = c.raw("GET", &format!("/api/sandboxes/{id}/logs"), b"");
    assert_eq!(r.status, 200);
    assert!(r.body.len() <= 256 << 10 && r.body.len() > 200 << 10, "{}", r.body.len());
    assert!(r.body.ends_with(b"console line 0029999\n"));
    assert!(console.ends_with(&r.body));

    // A stopped sandbox's console stays readable until its record goes.
    h.runtime.kill_vmm(&id);
    wait_ended(&mut c, &id);
    let r = c.raw("GET", &format!("/api/sandboxes/{id}/logs"), b"");
    assert_eq!(r.status, 200);
    assert!(r.body.ends_with(b"console line 0029999\n"));
    assert_eq!(c.call("DELETE", &format!("/api/sandboxes/{id}"), "").0, 204);
    assert!(h.runtime.forgotten.lock().expect("lock").contains(&id), "its kept console is dropped");
    assert_eq!(c.call("GET", &format!("/api/sandboxes/{id}/logs"), "").0, 404);
    assert_eq!(c.call("GET", "/api/sandboxes/not-a-uuid/logs", "").0, 400);
    assert_eq!(c.call("GET", "/api/sandboxes/00000000-0000-4000-8000-000000000000/logs", "").0, 404);
}

#[test]
fn allowed_hosts_report_the_project_allowlist_and_per_secret_hosts() {
    let h = Harness::start("surface-hosts");
    let mut c = h.client();
    let body = json!({"name": "agent", "egressAllowlist": ["api.openai.com", "*.example.com"]});
    let (status, p) = c.call("POST", "/api/projects", &body.to_string());
    assert_eq!(status, 201, "{p}");
    let pid = p["id"].as_str().expect("id").to_string();
    for (name, secret) in [
        ("OPENAI_API_KEY", json!({"value": "sk-111", "allowedHosts": ["api.openai.com"]})),
        ("PLAIN", json!({"value": "v-222"})),
    ] {
        let (status, _) = c.call("PUT", &format!("/api/projects/{pid}/secrets/{name}"), &secret.to_string());
        assert_eq!(status, 204);
    }
    let id = create(&mut c, &json!({"project": "agent"}));
    let (status, hosts) = c.call("GET", &format!("/api/sandboxes/{id}/allowed-hosts"), "");
    assert_eq!(status, 200, "{hosts}");
    assert_eq!(
        hosts,
        json!({
            "sandboxID": id,
            "secretStore": "agent",
            "egressAllowlist": ["api.openai.com", "*.example.com"],
            "perSecretAllowedHosts": {"OPENAI_API_KEY": ["api.openai.com"]},
        })
    );
    // Changes reach running sandboxes at once, and so does the answer.
    let (status, _) = c.call("PUT", &format!("/api/projects/{pid}"), r#"{"egressAllowlist":["api.openai.com"]}"#);
    assert_eq!(status, 200);
    let (_, hosts) = c.call("GET", &format!("/api/sandboxes/{id}/allowed-hosts"), "");
    assert_eq!(hosts["egressAllowlist"], json!(["api.openai.com"]));

    let bare = create(&mut c, &json!({}));
    let (status, hosts) = c.call("GET", &format!("/api/sandboxes/{bare}/allowed-hosts"), "");
    assert_eq!(status, 200);
    assert_eq!(hosts, json!({"sandboxID": bare, "egressAllowlist": [], "perSecretAllowedHosts": {}}));
    assert_eq!(c.call("GET", "/api/sandboxes/00000000-0000-4000-8000-000000000000/allowed-hosts", "").0, 404);
    assert!(!String::from_utf8_lossy(&c.transcript).contains("sk-111"), "no secret value in any answer");
}

#[test]
fn files_can_be_stat_ed_and_renamed() {
    let h = Harness::start("surface-files");
    let mut c = h.client();
    let id = create(&mut c, &json!({}));
    let files = format!("/api/sandboxes/{id}/files");
    assert_eq!(c.raw("PUT", &format!("{files}?path=/tmp/a.txt"), b"hello").status, 204);

    let (status, st) = c.call("GET", &format!("{files}/stat?path=/tmp/a.txt"), "");
    assert_eq!(status, 200, "{st}");
    assert_eq!(
        st,
        json!({"name": "a.txt", "path": "/tmp/a.txt", "isDir": false, "isSymlink": false, "size": 5,
               "mode": 0o644, "modifiedAt": "2023-11-14T22:13:20Z"})
    );
    assert_eq!(c.call("GET", &format!("{files}/stat?path=/tmp/missing"), "").0, 404);
    assert_eq!(c.call("GET", &format!("{files}/stat"), "").0, 400);
    assert_eq!(c.call("GET", &format!("{files}/stat?path=/tmp/../etc"), "").0, 403);

    let rename = format!("{files}/rename");
    let (status, err) = c.call("POST", &rename, r#"{"oldPath":"/tmp/a.txt","newPath":"/tmp/b.txt"}"#);
    assert_eq!(status, 204, "{err}");
    assert_eq!(c.raw("GET", &format!("{files}?path=/tmp/b.txt"), b"").body, b"hello");
    assert_eq!(c.call("GET", &format!("{files}?path=/tmp/a.txt"), "").0, 404);
    for (body, status, needle) in [
        (r#"{"oldPath":"/tmp/a.txt","newPath":"/tmp/c"}"#, 404, "no such file"),
        (r#"{"newPath":"/tmp/c"}"#, 400, "oldPath is required"),
        (r#"{"oldPath":"/tmp/b.txt"}"#, 400, "newPath is required"),
        (r#"{"oldPath":"/tmp/b.txt","newPath":""}"#, 400, "newPath: path must not be empty"),
        (r#"{"oldPath":"/tmp/b.txt","newPath":"/tmp/../x"}"#, 403, "newPath"),
        (r#"{"from":"/tmp/b.txt","to":"/tmp/c"}"#, 400, "unknown field"),
        ("not json", 400, "malformed JSON"),
    ] {
        let (got, err) = c.call("POST", &rename, body);
        assert_eq!(got, status, "{body}: {err}");
        let message = err["error"].as_str().expect("error");
        assert!(message.contains(needle), "{body}: {message}");
    }
    // Only a running sandbox has files.
    h.runtime.kill_vmm(&id);
    wait_ended(&mut c, &id);
    assert_eq!(c.call("POST", &rename, r#"{"oldPath":"/tmp/b.txt","newPath":"/tmp/c"}"#).0, 409);
    assert_eq!(c.call("GET", &format!("{files}/stat?path=/tmp/b.txt"), "").0, 409);
}

#[test]
fn routes_the_appliance_cannot_honour_answer_501_and_unknown_ones_404() {
    let h = Harness::start("surface-501");
    let mut c = h.client();
    let id = create(&mut c, &json!({}));
    let unsupported = [
        ("POST", format!("/api/sandboxes/{id}/scale")),
        ("PUT", format!("/api/sandboxes/{id}/autoscale")),
        ("GET", format!("/api/sandboxes/{id}/scaling-lock")),
        ("POST", "/api/sandboxes/checkpoints/c1/patches".to_string()),
        ("POST", "/api/sandboxes/checkpoints/c1/publish".to_string()),
        ("DELETE", "/api/sandboxes/checkpoints/c1/patches/p1".to_string()),
        ("POST", format!("/api/sandboxes/{id}/preview")),
        ("DELETE", format!("/api/sandboxes/{id}/preview/3000")),
        ("POST", format!("/api/sandboxes/{id}/preview/rotate")),
        ("POST", format!("/api/sandboxes/{id}/agent")),
        ("POST", format!("/api/sandboxes/{id}/agent/s1/kill")),
        ("GET", format!("/api/sandboxes/{id}/mounts")),
        ("PUT", format!("/api/sandboxes/{id}/tags")),
        ("GET", format!("/api/sandboxes/{id}/usage")),
        ("GET", "/api/usage".to_string()),
        ("GET", "/api/snapshots".to_string()),
        ("GET", "/api/webhooks".to_string()),
    ];
    for (method, path) in &unsupported {
        let (status, err) = c.call(method, path, "{}");
        assert_eq!(status, 501, "{method} {path}: {err}");
        let message = err["error"].as_str().expect("error sentence");
        assert!(message.starts_with("this appliance"), "{method} {path}: {message}");
    }
    // Nothing happened to the sandbox.
    let (_, s) = c.call("GET", &format!("/api/sandboxes/{id}"), "");
    assert_eq!(s["status"], "running");

    for method in ["GET", "POST", "PUT", "DELETE"] {
        for path in [format!("/api/sandboxes/{id}/no-such-route"), format!("/api/sandboxes/{id}/files/nope/deeper")] {
            let (status, err) = c.call(method, &path, "");
            assert_eq!(status, 404, "{method} {path}: {err}");
        }
    }
    // A key is still needed to learn any of this.
    let mut anonymous = Client::new(h.addr, None);
    assert_eq!(anonymous.call("POST", &format!("/api/sandboxes/{id}/scale"), "").0, 401);
    assert_eq!(anonymous.call("POST", &format!("/api/sandboxes/{id}/hibernate"), "").0, 401);
}

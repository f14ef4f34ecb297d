//! Projects and secrets over real HTTP against a real LMDB store.

mod common;

use common::{Client, Harness};
use serde_json::json;

#[test]
fn healthz_needs_no_key_and_reports_version_and_kvm() {
    let h = Harness::start("healthz");
    let mut anon = Client::new(h.addr, None);
    let (status, body) = anon.call("GET", "/api/healthz", "");
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    // The VMM binary does not exist here, so the self-check reports an error object.
    assert_eq!(body["kvm"]["kvm"], "error");
}

#[test]
fn power_routes_refuse_plainly_when_init_does_not_control_the_machine() {
    let h = Harness::start("power");
    let mut admin = Client::new(h.addr, Some(common::ADMIN_KEY));
    for path in ["/api/system/reboot", "/api/system/poweroff"] {
        let (status, body) = admin.call("POST", path, "");
        assert_eq!(status, 503, "{path}: {body}");
        assert!(body["error"].as_str().unwrap_or("").contains("does not control the machine's power"), "{body}");
        let (status, _) = admin.call("GET", path, "");
        assert_eq!(status, 405);
    }
    let mut anon = Client::new(h.addr, None);
    let (status, _) = anon.call("POST", "/api/system/reboot", "");
    assert_eq!(status, 401);
}

#[test]
fn every_other_route_needs_a_valid_key() {
    let h = Harness::start("auth");
    let mut anon = Client::new(h.addr, None);
    for (method, path) in
        [("GET", "/api/projects"), ("POST", "/api/sandboxes"), ("GET", "/metrics"), ("GET", "/api/does-not-exist")]
    {
        let (status, body) = anon.call(method, path, "");
        assert_eq!(status, 401, "{method} {path}");
        assert_eq!(body["error"], "missing X-API-Key header");
    }
    let mut wrong = Client::new(h.addr, Some("not-the-admin-key-at-all"));
    let (status, body) = wrong.call("GET", "/api/projects", "");
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid API key");
}

#[test]
fn project_crud_with_validation() {
    let h = Harness::start("projects");
    let mut c = h.client();
    let (status, p) = c.call(
        "POST",
        "/api/projects",
        r#"{"name":"my-agent","template":"python","cpuCount":2,"memoryMB":1024,"timeoutSec":600,"egressAllowlist":["api.openai.com","*.example.com"]}"#,
    );
    assert_eq!(status, 201, "{p}");
    let id = p["id"].as_str().expect("id").to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    assert_eq!(p["name"], "my-agent");
    assert_eq!(p["template"], "python");
    assert_eq!(p["cpuCount"], 2);
    assert_eq!(p["memoryMB"], 1024);
    assert_eq!(p["timeoutSec"], 600);
    assert_eq!(p["egressAllowlist"], json!(["api.openai.com", "*.example.com"]));
    assert!(p["createdAt"].as_str().expect("createdAt").ends_with('Z'));

    // Defaults fill what is not given.
    let (status, d) = c.call("POST", "/api/projects", r#"{"name":"defaults"}"#);
    assert_eq!(status, 201);
    assert_eq!(
        (d["template"].as_str(), d["cpuCount"].as_u64(), d["memoryMB"].as_u64(), d["timeoutSec"].as_u64()),
        (Some("base"), Some(1), Some(512), Some(300))
    );

    let (status, body) = c.call("POST", "/api/projects", r#"{"name":"my-agent"}"#);
    assert_eq!(status, 409);
    assert!(body["error"].as_str().expect("msg").contains("my-agent"));

    let (status, list) = c.call("GET", "/api/projects", "");
    assert_eq!(status, 200);
    assert_eq!(list.as_array().expect("array").len(), 2);

    let (status, got) = c.call("GET", &format!("/api/projects/{id}"), "");
    assert_eq!(status, 200);
    assert_eq!(got, p);

    // Partial update: zero and empty fields keep their values.
    let (status, up) = c.call(
        "PUT",
        &format!("/api/projects/{id}"),
        r#"{"cpuCount":0,"memoryMB":2048,"template":"","egressAllowlist":[]}"#,
    );
    assert_eq!(status, 200, "{up}");
    assert_eq!(up["cpuCount"], 2);
    assert_eq!(up["memoryMB"], 2048);
    assert_eq!(up["template"], "python");
    assert_eq!(up["egressAllowlist"], p["egressAllowlist"]);
    assert_eq!(up["createdAt"], p["createdAt"]);

    // Renaming onto another project's name conflicts; renaming frees the old name.
    let (status, _) = c.call("PUT", &format!("/api/projects/{id}"), r#"{"name":"defaults"}"#);
    assert_eq!(status, 409);
    let (status, renamed) = c.call("PUT", &format!("/api/projects/{id}"), r#"{"name":"renamed"}"#);
    assert_eq!(status, 200);
    assert_eq!(renamed["name"], "renamed");
    let (status, _) = c.call("POST", "/api/projects", r#"{"name":"my-agent"}"#);
    assert_eq!(status, 201);

    let (status, body) = c.call("DELETE", &format!("/api/projects/{id}"), "");
    assert_eq!((status, body), (204, serde_json::Value::Null));
    let (status, body) = c.call("GET", &format!("/api/projects/{id}"), "");
    assert_eq!(status, 404);
    assert!(body["error"].as_str().expect("msg").contains(&id));
    let (status, _) = c.call("DELETE", &format!("/api/projects/{id}"), "");
    assert_eq!(status, 404);
}

#[test]
fn bad_project_input_gets_clear_4xx_and_writes_nothing() {
    let h = Harness::start("projects-bad");
    let mut c = h.client();
    let cases: &[(&str, &str, u16, &str)] = &[
        ("POST", "{\"name\": ", 400, "malformed JSON"),
        ("POST", "", 400, "empty"),
        ("POST", r#"{"name": 5}"#, 400, "invalid type"),
        ("POST", r#"{"name":"x","cpuCount":"two"}"#, 400, "invalid type"),
        ("POST", r#"{"name":"x","cpuCount":-1}"#, 400, "invalid value"),
        ("POST", r#"{"cpuCount":1}"#, 400, "name is required"),
        ("POST", r#"{"name":"has space"}"#, 400, "invalid project name"),
        ("POST", r#"{"name":"x","cpuCount":1000}"#, 400, "cpuCount"),
        ("POST", r#"{"name":"x","egressAllowlist":["bad host!"]}"#, 400, "egressAllowlist"),
        ("POST", r"[1,2]", 400, "invalid type"),
    ];
    for (method, body, status, needle) in cases {
        let (got, v) = c.call(method, "/api/projects", body);
        assert_eq!(got, *status, "{body}: {v}");
        let msg = v["error"].as_str().expect("error message");
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let big = format!(r#"{{"name":"x","template":"{}"}}"#, "a".repeat(2 << 20));
    let (status, v) = c.call("POST", "/api/projects", &big);
    assert_eq!(status, 413, "{v}");
    let (status, v) = c.call("GET", "/api/projects/not-a-uuid", "");
    assert_eq!(status, 400);
    assert!(v["error"].as_str().expect("msg").contains("UUID"));
    let (status, _) = c.call("GET", "/api/projects/6f9619ff-8b86-d011-b42d-00c04fc964ff", "");
    assert_eq!(status, 404);
    let (status, _) = c.call("PATCH", "/api/projects", "");
    assert_eq!(status, 405);
    // None of the failed requests left anything behind.
    let (_, list) = c.call("GET", "/api/projects", "");
    assert_eq!(list, json!([]));
}

#[test]
fn secrets_are_write_only_and_deleted_with_their_project() {
    let h = Harness::start("secrets");
    let mut c = h.client();
    let (_, p) = c.call("POST", "/api/projects", r#"{"name":"s"}"#);
    let id = p["id"].as_str().expect("id").to_string();
    let base = format!("/api/projects/{id}/secrets");
    let (status, body) = c.call("PUT", &format!("{base}/OPENAI_API_KEY"), r#"{"value":"sk-test-value-123"}"#);
    assert_eq!((status, body), (204, serde_json::Value::Null));
    let (status, _) = c.call("PUT", &format!("{base}/DB_URL"), r#"{"value":"postgres://u:p@h/db"}"#);
    assert_eq!(status, 204);
    // Overwrite is allowed.
    let (status, _) = c.call("PUT", &format!("{base}/DB_URL"), r#"{"value":"postgres://u:p2@h/db"}"#);
    assert_eq!(status, 204);
    let (status, names) = c.call("GET", &base, "");
    assert_eq!(status, 200);
    assert_eq!(common::secret_names(&names), ["DB_URL", "OPENAI_API_KEY"]);
    assert_eq!(names[0], json!({"name": "DB_URL", "allowedHosts": []}), "listed with hosts, never a value");

    let (status, v) = c.call("PUT", &format!("{base}/1BAD"), r#"{"value":"x"}"#);
    assert_eq!(status, 400, "{v}");
    let (status, v) = c.call("PUT", &format!("{base}/EMPTY"), r#"{"value":""}"#);
    assert_eq!(status, 400, "{v}");
    let (status, v) = c.call("PUT", &format!("{base}/WRONG"), r#"{"value":1234567}"#);
    assert_eq!(status, 400);
    assert!(!v["error"].as_str().expect("msg").contains("1234567"), "error must not echo the value");
    let (status, _) = c.call("PUT", "/api/projects/6f9619ff-8b86-d011-b42d-00c04fc964ff/secrets/X", r#"{"value":"v"}"#);
    assert_eq!(status, 404);

    let (status, _) = c.call("DELETE", &format!("{base}/DB_URL"), "");
    assert_eq!(status, 204);
    let (status, _) = c.call("DELETE", &format!("{base}/DB_URL"), "");
    assert_eq!(status, 404);
    let (_, names) = c.call("GET", &base, "");
    assert_eq!(common::secret_names(&names), ["OPENAI_API_KEY"]);

    // Deleting the project deletes its secrets: a new project of the same name starts empty.
    c.call("DELETE", &format!("/api/projects/{id}"), "");
    let (status, _) = c.call("GET", &base, "");
    assert_eq!(status, 404);
    let (_, p2) = c.call("POST", "/api/projects", r#"{"name":"s"}"#);
    let (_, names) = c.call("GET", &format!("/api/projects/{}/secrets", p2["id"].as_str().expect("id")), "");
    assert_eq!(names, json!([]));
    let text = String::from_utf8_lossy(&c.transcript).to_string();
    assert!(!text.contains("sk-test-value-123") && !text.contains("u:p2@h"));
}

#[test]
fn metrics_count_requests_by_route_and_status() {
    let h = Harness::start("metrics");
    let mut c = h.client();
    c.call("POST", "/api/projects", r#"{"name":"m"}"#);
    c.call("GET", "/api/projects/6f9619ff-8b86-d011-b42d-00c04fc964ff", "");
    let r = c.raw("GET", "/metrics", b"");
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).expect("utf8");
    assert!(text.contains("appliance_http_requests_total{route=\"/api/projects\",status=\"201\"} 1"), "{text}");
    assert!(text.contains("appliance_http_requests_total{route=\"/api/projects/{id}\",status=\"404\"} 1"));
    assert!(text.contains("appliance_sandboxes_running 0"));
    assert!(text.contains("appliance_http_request_seconds_count"));
    assert!(text.contains("appliance_sandbox_boot_seconds_bucket"));
    // The sealing proxy's egress decisions, one series per decision.
    for decision in ["forwarded", "refused", "misdirected", "rejected", "upstream_failed"] {
        let series = format!("appliance_egress_decisions_total{{decision=\"{decision}\"}} 0");
        assert!(text.contains(&series), "{series} missing");
    }
    assert!(text.contains("appliance_egress_values_scrubbed_total 0"));
}

#[test]
fn data_survives_a_restart() {
    let mut h = Harness::start("restart-data");
    let mut c = h.client();
    let (_, p) = c.call("POST", "/api/projects", r#"{"name":"persist"}"#);
    let id = p["id"].as_str().expect("id").to_string();
    c.call("PUT", &format!("/api/projects/{id}/secrets/K"), r#"{"value":"v-123456"}"#);
    drop(c);
    h.restart();
    let mut c = h.client();
    let (status, got) = c.call("GET", &format!("/api/projects/{id}"), "");
    assert_eq!(status, 200);
    assert_eq!(got, p);
    let (_, names) = c.call("GET", &format!("/api/projects/{id}/secrets"), "");
    assert_eq!(common::secret_names(&names), ["K"]);
}

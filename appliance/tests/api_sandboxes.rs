//! Sandbox routes over real HTTP with the runtime and publisher test doubles.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{masked_frame, read_server_frame, websocket_handshake, Client, Harness, ADMIN_KEY};
use serde_json::{json, Value};

fn project_with_secret(c: &mut Client, name: &str, secret: &str) -> String {
    let body = format!(
        r#"{{"name":"{name}","template":"python","cpuCount":2,"memoryMB":1024,"timeoutSec":600,"egressAllowlist":["api.openai.com"]}}"#
    );
    let (status, p) = c.call("POST", "/api/projects", &body);
    assert_eq!(status, 201);
    let id = p["id"].as_str().expect("id").to_string();
    let (status, _) =
        c.call("PUT", &format!("/api/projects/{id}/secrets/OPENAI_API_KEY"), &json!({"value": secret}).to_string());
    assert_eq!(status, 204);
    id
}

fn is_token(s: &str) -> bool {
    appliance::seal::is_token(s)
}

#[test]
fn create_with_project_inherits_defaults_and_gets_only_sealed_tokens() {
    let h = Harness::start("sbx-create");
    let mut c = h.client();
    project_with_secret(&mut c, "my-agent", "sk-live-abcdef123456");

    let (status, s) = c.call("POST", "/api/sandboxes", r#"{"project":"my-agent","metadata":{"purpose":"test"}}"#);
    assert_eq!(status, 201, "{s}");
    let id = s["sandboxID"].as_str().expect("id").to_string();
    assert_eq!(s["templateID"], "python");
    assert_eq!(s["cpuCount"], 2);
    assert_eq!(s["memoryMB"], 1024);
    assert_eq!(s["status"], "running");
    assert_eq!(s["metadata"], json!({"purpose": "test"}));
    let keys: Vec<&str> = s.as_object().expect("object").keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 9, "exactly the documented fields: {keys:?}");
    assert_eq!(s["diskMB"], 2048, "the template's disk size");

    // The runtime got the resolved spec; the env holds a token, never the value.
    {
        let map = h.runtime.sandboxes.lock().expect("lock");
        let sb = map.get(&id).expect("booted");
        assert_eq!((sb.template.as_str(), sb.cpu, sb.memory), ("python", 2, 1024));
    }
    let env = h.runtime.env_of(&id);
    let token = env.iter().find(|(k, _)| k == "OPENAI_API_KEY").map(|(_, v)| v.clone()).expect("env var");
    assert!(is_token(&token), "{token}");
    assert!(env.iter().all(|(_, v)| !v.contains("sk-live-abcdef123456")));

    // `echo $SECRET` inside the sandbox prints the token.
    let (status, out) = c.call("POST", &format!("/api/sandboxes/{id}/exec/run"), r#"{"cmd":"echo $OPENAI_API_KEY"}"#);
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["exitCode"], 0);
    assert_eq!(out["stdout"], format!("{token}\n"));
    assert!(out["stdout"].as_str().expect("stdout").starts_with("osb_sealed_"));

    // The proxy binding maps the token to the plaintext for the project's hosts.
    {
        let published = h.publisher.published.lock().expect("lock");
        let seal = published.get(&id).expect("published");
        let cid = h.runtime.sandboxes.lock().expect("lock").get(&id).expect("sb").cid;
        assert_eq!(seal.cid, cid);
        assert_eq!(seal.egress_allowlist, vec!["api.openai.com".to_string()]);
        assert_eq!(seal.bindings.len(), 1);
        assert_eq!(seal.bindings[0].token, token);
        assert_eq!(seal.bindings[0].secret_name, "OPENAI_API_KEY");
        assert_eq!(seal.bindings[0].value.as_slice(), b"sk-live-abcdef123456");
        assert_eq!(seal.bindings[0].allowed_hosts, vec!["api.openai.com".to_string()]);
    }

    // Tokens are random per sandbox; secretStore is an alias of project.
    let (status, s2) = c.call("POST", "/api/sandboxes", r#"{"secretStore":"my-agent"}"#);
    assert_eq!(status, 201);
    let env2 = h.runtime.env_of(s2["sandboxID"].as_str().expect("id"));
    let token2 = env2.iter().find(|(k, _)| k == "OPENAI_API_KEY").map(|(_, v)| v.clone()).expect("env");
    assert_ne!(token, token2);

    let text = String::from_utf8_lossy(&c.transcript).to_string();
    assert!(!text.contains("sk-live-abcdef123456"));
}

#[test]
fn request_fields_override_project_and_envs_override_secrets() {
    let h = Harness::start("sbx-override");
    let mut c = h.client();
    project_with_secret(&mut c, "p", "sk-secret-override-me");
    let (status, s) = c.call(
        "POST",
        "/api/sandboxes",
        r#"{"project":"p","templateID":"base","timeout":30,"cpuCount":1,"memoryMB":256,"envs":{"OPENAI_API_KEY":"mine","OTHER":"x"}}"#,
    );
    assert_eq!(status, 201, "{s}");
    let id = s["sandboxID"].as_str().expect("id");
    assert_eq!(
        (s["templateID"].as_str(), s["cpuCount"].as_u64(), s["memoryMB"].as_u64()),
        (Some("base"), Some(1), Some(256))
    );
    let started = time_of(&s["startedAt"]);
    let end = time_of(&s["endAt"]);
    assert_eq!(end - started, 30, "request timeout overrides the project's 600");
    let env = h.runtime.env_of(id);
    assert!(env.contains(&("OPENAI_API_KEY".into(), "mine".into())));
    assert!(env.contains(&("OTHER".into(), "x".into())));
    let published = h.publisher.published.lock().expect("lock");
    assert!(published.get(id).expect("published").bindings.is_empty(), "overridden secret is not sealed");
}

#[test]
fn appliance_defaults_apply_without_project_and_bad_input_is_refused() {
    let h = Harness::start("sbx-defaults");
    let mut c = h.client();
    let (status, s) = c.call("POST", "/api/sandboxes", "{}");
    assert_eq!(status, 201);
    assert_eq!(
        (s["templateID"].as_str(), s["cpuCount"].as_u64(), s["memoryMB"].as_u64()),
        (Some("base"), Some(1), Some(512))
    );
    assert_eq!(time_of(&s["endAt"]) - time_of(&s["startedAt"]), 300);

    let (status, v) = c.call("POST", "/api/sandboxes", r#"{"project":"ghost"}"#);
    assert_eq!(status, 404);
    assert!(v["error"].as_str().expect("msg").contains("ghost"));
    let (status, _) = c.call("POST", "/api/sandboxes", r#"{"timeout":"long"}"#);
    assert_eq!(status, 400);
    let (status, _) = c.call("POST", "/api/sandboxes", r#"{"envs":{"BAD-NAME":"x"}}"#);
    assert_eq!(status, 400);
    let (status, _) = c.call("POST", "/api/sandboxes", r#"{"templateID":"../../etc"}"#);
    assert_eq!(status, 400);
    let (status, _) = c.call("GET", "/api/sandboxes/xyz", "");
    assert_eq!(status, 400);
    let (status, _) = c.call("GET", "/api/sandboxes/6f9619ff-8b86-d011-b42d-00c04fc964ff", "");
    assert_eq!(status, 404);

    // A boot failure leaves no record and no binding.
    *h.runtime.fail_boot_template.lock().expect("lock") = Some("missing".into());
    let (status, v) = c.call("POST", "/api/sandboxes", r#"{"templateID":"missing"}"#);
    assert_eq!(status, 404, "{v}");
    // A failure after boot undoes the boot and the binding.
    *h.runtime.fail_set_env.lock().expect("lock") = true;
    let (status, _) = c.call("POST", "/api/sandboxes", "{}");
    assert_eq!(status, 500);
    *h.runtime.fail_set_env.lock().expect("lock") = false;
    let (_, list) = c.call("GET", "/api/sandboxes", "");
    assert_eq!(list.as_array().expect("list").len(), 1, "only the first sandbox exists");
    assert_eq!(h.publisher.published.lock().expect("lock").len(), 1);
    assert_eq!(h.runtime.stops.lock().expect("lock").len(), 1, "the half-made sandbox was stopped");
}

fn time_of(v: &Value) -> i64 {
    // RFC 3339 `YYYY-MM-DDTHH:MM:SSZ` -> seconds within a day are enough for short spans.
    let s = v.as_str().expect("timestamp");
    assert!(s.len() == 20 && s.ends_with('Z'), "{s}");
    let day: i64 = s[8..10].parse().expect("day");
    let h: i64 = s[11..13].parse().expect("h");
    let m: i64 = s[14..16].parse().expect("m");
    let sec: i64 = s[17..19].parse().expect("s");
    ((day * 24 + h) * 60 + m) * 60 + sec
}

#[test]
fn get_list_timeout_delete_and_expiry() {
    let h = Harness::start("sbx-life");
    let mut c = h.client();
    // Its idle timeout stops a sandbox of this project instead of hibernating it.
    let (status, p) = c.call("POST", "/api/projects", r#"{"name":"stops","autoHibernate":false}"#);
    assert_eq!(status, 201, "{p}");
    let (_, a) = c.call("POST", "/api/sandboxes", r#"{"project":"stops","timeout":600}"#);
    let (_, b) = c.call("POST", "/api/sandboxes", r#"{"project":"stops","timeout":600}"#);
    let a_id = a["sandboxID"].as_str().expect("id").to_string();
    let b_id = b["sandboxID"].as_str().expect("id").to_string();
    let (status, got) = c.call("GET", &format!("/api/sandboxes/{a_id}"), "");
    assert_eq!((status, &got), (200, &a));
    let (_, list) = c.call("GET", "/api/sandboxes", "");
    assert_eq!(list.as_array().expect("list").len(), 2);

    // Moving endAt to one second from now: the reaper stops it.
    let (status, _) = c.call("POST", &format!("/api/sandboxes/{a_id}/timeout"), r#"{"timeout":1}"#);
    assert_eq!(status, 204);
    let (_, moved) = c.call("GET", &format!("/api/sandboxes/{a_id}"), "");
    assert!(time_of(&moved["endAt"]) < time_of(&a["endAt"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, s) = c.call("GET", &format!("/api/sandboxes/{a_id}"), "");
        if s["status"] == "stopped" {
            break;
        }
        assert!(Instant::now() < deadline, "sandbox was not stopped at endAt");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(h.runtime.stops.lock().expect("lock").contains(&a_id));
    assert!(h.publisher.withdrawn.lock().expect("lock").contains(&a_id));
    let (status, v) = c.call("POST", &format!("/api/sandboxes/{a_id}/exec/run"), r#"{"cmd":"echo hi"}"#);
    assert_eq!(status, 409, "{v}");
    let (status, _) = c.call("POST", &format!("/api/sandboxes/{a_id}/timeout"), r#"{"timeout":60}"#);
    assert_eq!(status, 409);
    // 0: no automatic stop; endAt is then null.
    let (status, _) = c.call("POST", &format!("/api/sandboxes/{b_id}/timeout"), r#"{"timeout":0}"#);
    assert_eq!(status, 204);
    let (_, b) = c.call("GET", &format!("/api/sandboxes/{b_id}"), "");
    assert!(b["endAt"].is_null(), "{b}");

    // DELETE kills the VMM and removes the record.
    let (status, _) = c.call("DELETE", &format!("/api/sandboxes/{b_id}"), "");
    assert_eq!(status, 204);
    assert!(!h.runtime.is_alive_pub(&b_id));
    let (status, _) = c.call("GET", &format!("/api/sandboxes/{b_id}"), "");
    assert_eq!(status, 404);
    let (status, _) = c.call("DELETE", &format!("/api/sandboxes/{b_id}"), "");
    assert_eq!(status, 404);
}

#[test]
fn a_stopped_sandbox_is_forgotten_after_the_retention_and_a_running_one_never() {
    let h = Harness::start_with_retention("sbx-purge", Duration::from_secs(1));
    let mut c = h.client();
    let (status, p) = c.call("POST", "/api/projects", r#"{"name":"stops","autoHibernate":false}"#);
    assert_eq!(status, 201, "{p}");
    let (_, short) = c.call("POST", "/api/sandboxes", r#"{"project":"stops","timeout":1}"#);
    let (_, long) = c.call("POST", "/api/sandboxes", r#"{"timeout":600}"#);
    let short_id = short["sandboxID"].as_str().expect("id").to_string();
    let long_id = long["sandboxID"].as_str().expect("id").to_string();
    // Stopped at its timeout, it is still visible for a while, with endAt when it ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stopped = loop {
        let (_, s) = c.call("GET", &format!("/api/sandboxes/{short_id}"), "");
        if s["status"] == "stopped" {
            break s;
        }
        assert!(Instant::now() < deadline, "sandbox was not stopped at its timeout: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(time_of(&stopped["endAt"]) <= time_of(&short["endAt"]));
    // The reaper forgets it within its purge period (5 s) once the 1 s retention has passed.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _) = c.call("GET", &format!("/api/sandboxes/{short_id}"), "");
        if status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "the stopped sandbox was never forgotten");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, s) = c.call("GET", &format!("/api/sandboxes/{long_id}"), "");
    assert_eq!((status, s["status"].as_str()), (200, Some("running")));
    let (_, list) = c.call("GET", "/api/sandboxes", "");
    assert_eq!(list.as_array().expect("list").len(), 1);
}

trait AliveExt {
    fn is_alive_pub(&self, id: &str) -> bool;
}
impl AliveExt for common::FakeRuntime {
    fn is_alive_pub(&self, id: &str) -> bool {
        appliance::runtime::SandboxRuntime::is_alive(self, id)
    }
}

#[test]
fn deleting_the_project_keeps_its_sandboxes_running() {
    let h = Harness::start("sbx-projdel");
    let mut c = h.client();
    let pid = project_with_secret(&mut c, "short-lived", "sk-keep-running-999");
    let (_, s) = c.call("POST", "/api/sandboxes", r#"{"project":"short-lived"}"#);
    let id = s["sandboxID"].as_str().expect("id").to_string();
    let (status, _) = c.call("DELETE", &format!("/api/projects/{pid}/secrets/OPENAI_API_KEY"), "");
    assert_eq!(status, 204);
    let (status, _) = c.call("DELETE", &format!("/api/projects/{pid}"), "");
    assert_eq!(status, 204);
    let (_, s) = c.call("GET", &format!("/api/sandboxes/{id}"), "");
    assert_eq!(s["status"], "running");
    let (status, out) = c.call("POST", &format!("/api/sandboxes/{id}/commands"), r#"{"cmd":"echo $OPENAI_API_KEY"}"#);
    assert_eq!(status, 200);
    assert!(out["stdout"].as_str().expect("stdout").starts_with("osb_sealed_"));
    assert!(h.publisher.published.lock().expect("lock").contains_key(&id), "binding stays until the sandbox stops");
}

#[test]
fn restart_marks_sandboxes_without_a_vmm_stopped() {
    let mut h = Harness::start("sbx-restart");
    let mut c = h.client();
    let (_, dead) = c.call("POST", "/api/sandboxes", "{}");
    let (_, alive) = c.call("POST", "/api/sandboxes", "{}");
    let dead_id = dead["sandboxID"].as_str().expect("id").to_string();
    let alive_id = alive["sandboxID"].as_str().expect("id").to_string();
    drop(c);
    h.stop();
    h.runtime.kill_vmm(&dead_id);
    h.restart();
    let mut c = h.client();
    let (_, d) = c.call("GET", &format!("/api/sandboxes/{dead_id}"), "");
    assert_eq!(d["status"], "stopped");
    let (_, a) = c.call("GET", &format!("/api/sandboxes/{alive_id}"), "");
    assert_eq!(a["status"], "running");
    let r = c.raw("GET", "/metrics", b"");
    assert!(String::from_utf8_lossy(&r.body).contains("appliance_sandboxes_running 1\n"));
}

#[test]
fn exec_run_commands_and_sessions() {
    let h = Harness::start("sbx-exec");
    let mut c = h.client();
    let (_, s) = c.call("POST", "/api/sandboxes", "{}");
    let id = s["sandboxID"].as_str().expect("id").to_string();
    let (status, out) = c.call(
        "POST",
        &format!("/api/sandboxes/{id}/exec/run"),
        r#"{"cmd":"echo","args":["a b"],"envs":{"X":"1"},"cwd":"/tmp","timeout":5}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(out, json!({"exitCode": 0, "stdout": "a b\n", "stderr": ""}));
    let (status, out) =
        c.call("POST", &format!("/api/sandboxes/{id}/commands"), r#"{"cmd":"echo $X","envs":{"X":"42"}}"#);
    assert_eq!((status, out["stdout"].as_str()), (200, Some("42\n")));
    let (_, out) = c.call("POST", &format!("/api/sandboxes/{id}/commands"), r#"{"cmd":"nosuchcmd"}"#);
    assert_eq!(out["exitCode"], 127);
    let (status, _) = c.call("POST", &format!("/api/sandboxes/{id}/exec/run"), r#"{"cmd":""}"#);
    assert_eq!(status, 400);
    let (status, _) = c.call("POST", &format!("/api/sandboxes/{id}/exec/run"), r#"{"cmd":"ls","cwd":"/a/../.."}"#);
    assert_eq!(status, 403);

    let (status, started) = c.call("POST", &format!("/api/sandboxes/{id}/exec"), r#"{"cmd":"cat"}"#);
    assert_eq!(status, 201);
    let sid = started["sessionID"].as_str().expect("sid").to_string();
    let (status, sessions) = c.call("GET", &format!("/api/sandboxes/{id}/exec"), "");
    assert_eq!(status, 200);
    assert_eq!(sessions[0]["sessionID"], sid.as_str());
    assert_eq!(sessions[0]["running"], true);
    let (status, _) = c.call("POST", &format!("/api/sandboxes/{id}/exec/{sid}/kill"), r#"{"signal":15}"#);
    assert_eq!(status, 204);
    let (_, sessions) = c.call("GET", &format!("/api/sandboxes/{id}/exec"), "");
    assert_eq!(sessions[0]["running"], false);
    assert_eq!(sessions[0]["exitCode"], 143);
    let (status, _) = c.call("POST", &format!("/api/sandboxes/{id}/exec/{sid}/kill"), r#"{"signal":99}"#);
    assert_eq!(status, 400);
    let (status, _) = c.call("POST", &format!("/api/sandboxes/{id}/exec/nope/kill"), "");
    assert_eq!(status, 404);
}

// ---------------------------------------------------------------- WebSocket

#[test]
fn websocket_exec_stream_carries_stdin_stdout_stderr_and_exit() {
    let h = Harness::start("sbx-ws");
    let mut c = h.client();
    let (_, s) = c.call("POST", "/api/sandboxes", "{}");
    let id = s["sandboxID"].as_str().expect("id").to_string();
    let (_, started) = c.call("POST", &format!("/api/sandboxes/{id}/exec"), r#"{"cmd":"cat"}"#);
    let sid = started["sessionID"].as_str().expect("sid").to_string();

    let mut ws = TcpStream::connect(h.addr).expect("connect");
    ws.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let text = websocket_handshake(&mut ws, &id, &sid);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{text}");

    assert_eq!(read_server_frame(&mut ws), (0x2, b"\x01ready\n".to_vec()));
    // The end of the replay, which shells wait for before they send anything.
    assert_eq!(read_server_frame(&mut ws), (0x2, b"\x04".to_vec()));
    // The session list counts the attached client and says when the session started.
    let session_of = |c: &mut common::Client| {
        let (_, listed) = c.call("GET", &format!("/api/sandboxes/{id}/exec"), "");
        listed.as_array().and_then(|l| l.iter().find(|s| s["sessionID"] == json!(sid)).cloned()).expect("listed")
    };
    let listed = session_of(&mut c);
    assert_eq!(listed["attachedClients"], 1, "{listed}");
    assert!(listed["startedAt"].as_str().is_some_and(|t| t.len() == 20 && t.ends_with('Z')), "{listed}");
    assert_eq!((&listed["command"], &listed["sandboxID"], &listed["args"]), (&json!("cat"), &json!(id), &json!([])));
    ws.write_all(&masked_frame(0x2, b"\x00hello\n")).expect("stdin");
    assert_eq!(read_server_frame(&mut ws), (0x2, b"\x01hello\n".to_vec()));
    ws.write_all(&masked_frame(0x9, b"ping!")).expect("ping");
    assert_eq!(read_server_frame(&mut ws), (0xA, b"ping!".to_vec()));
    ws.write_all(&masked_frame(0x2, b"\x00err:oops")).expect("stdin");
    assert_eq!(read_server_frame(&mut ws), (0x2, b"\x02oops".to_vec()));
    ws.write_all(&masked_frame(0x2, b"\x00exit")).expect("stdin");
    let mut exit = vec![0x03];
    exit.extend_from_slice(&7i32.to_be_bytes());
    assert_eq!(read_server_frame(&mut ws), (0x2, exit));
    let (op, payload) = read_server_frame(&mut ws);
    assert_eq!((op, &payload[..2]), (0x8, &1000u16.to_be_bytes()[..]));
    let detached = Instant::now() + Duration::from_secs(5);
    while session_of(&mut c)["attachedClients"] != 0 {
        assert!(Instant::now() < detached, "the ended attachment is still counted");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Unknown sessions and missing auth are refused before any upgrade.
    let mut bad = TcpStream::connect(h.addr).expect("connect");
    bad.write_all(
        format!(
            "GET /api/sandboxes/{id}/exec/unknown HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\nX-API-Key: {ADMIN_KEY}\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("write");
    let mut buf = [0u8; 12];
    bad.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"HTTP/1.1 404");
    // The server is still healthy afterwards.
    let (status, _) = c.call("GET", &format!("/api/sandboxes/{id}"), "");
    assert_eq!(status, 200);
}

#[test]
fn files_round_trip_and_traversal_is_refused() {
    let h = Harness::start("sbx-files");
    let mut c = h.client();
    let (_, s) = c.call("POST", "/api/sandboxes", "{}");
    let id = s["sandboxID"].as_str().expect("id").to_string();
    let base = format!("/api/sandboxes/{id}/files");
    let r = c.raw("PUT", &format!("{base}?path=/home/user/a%20b.bin"), &[0, 1, 2, 255]);
    assert_eq!(r.status, 204);
    let r = c.raw("GET", &format!("{base}?path=/home/user/a%20b.bin"), b"");
    assert_eq!((r.status, r.body), (200, vec![0, 1, 2, 255]));
    let (status, _) = c.call("POST", &format!("{base}/mkdir?path=/home/user/sub"), "");
    assert_eq!(status, 204);
    let (status, list) = c.call("GET", &format!("{base}/list?path=/home/user"), "");
    assert_eq!(status, 200);
    let mut entries: Vec<Value> = list.as_array().expect("list").clone();
    entries.sort_by_key(|e| e["name"].as_str().unwrap_or("").to_string());
    assert_eq!(
        entries,
        vec![
            json!({"name": "a b.bin", "isDir": false, "path": "/home/user/a b.bin", "size": 4}),
            json!({"name": "sub", "isDir": true, "path": "/home/user/sub", "size": 0}),
        ]
    );
    let (status, _) = c.call("DELETE", &format!("{base}?path=/home/user/a%20b.bin"), "");
    assert_eq!(status, 204);
    let (status, _) = c.call("GET", &format!("{base}?path=/home/user/a%20b.bin"), "");
    assert_eq!(status, 404);

    for bad in ["/home/../etc/passwd", "..%2Fx", "/a/%2E%2E/b"] {
        let (status, v) = c.call("GET", &format!("{base}?path={bad}"), "");
        assert_eq!(status, 403, "{bad}: {v}");
        let (status, _) = c.call("PUT", &format!("{base}?path={bad}"), "x");
        assert_eq!(status, 403, "{bad}");
    }
    let (status, v) = c.call("GET", &base, "");
    assert_eq!(status, 400);
    assert!(v["error"].as_str().expect("msg").contains("path"));
    assert!(h.runtime.sandboxes.lock().expect("lock").get(&id).expect("sb").files.is_empty());
}

#[test]
fn without_a_runtime_sandbox_routes_answer_503_and_nothing_is_stored() {
    use appliance::serve::{self, SandboxSide};
    let dir = common::temp_dir("sbx-503");
    let key = common::write_key_file(&dir);
    let running =
        serve::start(&common::config(&dir, Some(key)), SandboxSide::Unavailable("not wired in this test".into()))
            .expect("start");
    let mut c = Client::new(running.addr(), Some(ADMIN_KEY));
    c.call("POST", "/api/projects", r#"{"name":"p"}"#);
    let (status, v) = c.call("POST", "/api/sandboxes", r#"{"project":"p"}"#);
    assert_eq!(status, 503);
    assert_eq!(v["error"], "sandbox runtime not available: not wired in this test");
    let (status, v) = c.call("POST", "/api/sandboxes", r#"{"project":"missing"}"#);
    assert_eq!(status, 404, "{v}");
    let (status, list) = c.call("GET", "/api/sandboxes", "");
    assert_eq!((status, list), (200, json!([])));
    running.shutdown(Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends a WebSocket handshake for session `sid` with the key only in `?api_key=` and returns
/// the status line's first 12 bytes.
fn query_key_handshake(h: &Harness, id: &str, sid: &str, key: &str, upgrade: bool) -> String {
    let mut ws = TcpStream::connect(h.addr).expect("connect");
    ws.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let upgrade = if upgrade { "Upgrade: websocket\r\nConnection: Upgrade\r\n" } else { "" };
    ws.write_all(
        format!(
            "GET /api/sandboxes/{id}/exec/{sid}?api_key={key} HTTP/1.1\r\nHost: x\r\n{upgrade}\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("write");
    let mut buf = [0u8; 12];
    ws.read_exact(&mut buf).expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn a_websocket_authenticates_with_the_api_key_in_its_query_string() {
    let h = Harness::start("sbx-ws-query-key");
    let mut c = h.client();
    let (_, s) = c.call("POST", "/api/sandboxes", "{}");
    let id = s["sandboxID"].as_str().expect("id").to_string();
    let (_, started) = c.call("POST", &format!("/api/sandboxes/{id}/exec"), r#"{"cmd":"cat"}"#);
    let sid = started["sessionID"].as_str().expect("sid").to_string();
    assert_eq!(query_key_handshake(&h, &id, &sid, ADMIN_KEY, true), "HTTP/1.1 101");
    assert_eq!(query_key_handshake(&h, &id, &sid, "not-the-key-0123456789", true), "HTTP/1.1 401");
    // Only a WebSocket upgrade may carry its key in the URL: plain requests need the header.
    assert_eq!(query_key_handshake(&h, &id, &sid, ADMIN_KEY, false), "HTTP/1.1 401");
}

#[test]
fn run_async_answers_at_once_and_its_result_is_polled() {
    let h = Harness::start("sbx-run-async");
    let mut c = h.client();
    let (_, s) = c.call("POST", "/api/sandboxes", "{}");
    let id = s["sandboxID"].as_str().expect("id").to_string();
    // A command that ends at once is answered inline, as the OpenComputer API does.
    let (status, out) = c.call("POST", &format!("/api/sandboxes/{id}/exec/run-async"), r#"{"cmd":"echo hi"}"#);
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        (out["running"].clone(), out["exitCode"].clone(), out["stdout"].clone()),
        (json!(false), json!(0), json!("hi\n"))
    );

    // A longer one answers its id; polling returns the result once it ended.
    *h.runtime.exec_delay.lock().expect("lock") = Duration::from_millis(1500);
    let (status, started) = c.call("POST", &format!("/api/sandboxes/{id}/exec/run-async"), r#"{"cmd":"echo slow"}"#);
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["running"], true);
    assert!(started["startedAt"].as_str().is_some_and(|t| t.ends_with('Z')), "{started}");
    let exec_id = started["execId"].as_str().expect("execId").to_string();
    let result_path = format!("/api/sandboxes/{id}/exec/{exec_id}/result");
    let (status, first) = c.call("GET", &result_path, "");
    assert_eq!((status, first["running"].clone()), (200, json!(true)), "{first}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let done = loop {
        let (status, polled) = c.call("GET", &result_path, "");
        assert_eq!(status, 200, "{polled}");
        if polled["running"] == false {
            break polled;
        }
        assert!(std::time::Instant::now() < deadline, "the command never ended: {polled}");
    };
    assert_eq!((done["exitCode"].clone(), done["stdout"].clone()), (json!(0), json!("slow\n")), "{done}");
    // Kept after the end: the same answer again.
    assert_eq!(c.call("GET", &result_path, "").1["stdout"], "slow\n");

    // Unknown commands, and another sandbox's, are 404s.
    let (_, other) = c.call("POST", "/api/sandboxes", "{}");
    let other = other["sandboxID"].as_str().expect("id").to_string();
    let (status, _) = c.call("GET", &format!("/api/sandboxes/{other}/exec/{exec_id}/result"), "");
    assert_eq!(status, 404);
    let (status, _) = c.call("GET", &format!("/api/sandboxes/{id}/exec/{other}/result"), "");
    assert_eq!(status, 404);
}

#[test]
fn unknown_paths_under_a_sandbox_are_404_and_sessions_list_what_the_sdks_read() {
    let h = Harness::start("sbx-unknown-paths");
    let mut c = h.client();
    let (_, s) = c.call("POST", "/api/sandboxes", "{}");
    let id = s["sandboxID"].as_str().expect("id").to_string();
    for (method, path) in [("POST", "nonexistent"), ("GET", "exec/a/b/c"), ("POST", "files/unknown-op")] {
        let (status, body) = c.call(method, &format!("/api/sandboxes/{id}/{path}"), "{}");
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    let (_, started) = c.call("POST", &format!("/api/sandboxes/{id}/exec"), r#"{"cmd":"cat"}"#);
    let sid = started["sessionID"].as_str().expect("sid").to_string();
    let (_, sessions) = c.call("GET", &format!("/api/sandboxes/{id}/exec"), "");
    let entry = &sessions[0];
    assert_eq!(entry["sessionID"], sid.as_str());
    assert_eq!(entry["sandboxID"], id.as_str());
    assert_eq!(entry["command"], "cat");
    assert_eq!(entry["args"], json!([]));
    assert_eq!(entry["running"], true);
    assert!(entry.get("exitCode").is_none(), "no exit code while running: {entry}");
}

#[test]
fn the_timeout_is_an_idle_timeout_renewed_by_activity_and_zero_never_stops() {
    let h = Harness::start("sbx-idle-timeout");
    let mut c = h.client();
    let (_, s) = c.call("POST", "/api/sandboxes", r#"{"timeout":2}"#);
    let busy = s["sandboxID"].as_str().expect("id").to_string();
    let first_end = time_of(&s["endAt"]);
    let (_, s) = c.call("POST", "/api/sandboxes", r#"{"timeout":2}"#);
    let idle = s["sandboxID"].as_str().expect("id").to_string();
    let (_, s) = c.call("POST", "/api/sandboxes", r#"{"timeout":0}"#);
    let forever = s["sandboxID"].as_str().expect("id").to_string();
    assert!(s["endAt"].is_null(), "timeout 0: no automatic stop: {s}");

    // A command every half second keeps `busy` alive well past its 2 s; `idle` hibernates (what
    // an idle timeout does unless a project says otherwise, as OpenComputer's does).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let (status, out) = c.call("POST", &format!("/api/sandboxes/{busy}/exec/run"), r#"{"cmd":"echo hi"}"#);
        assert_eq!(status, 200, "the busy sandbox was stopped after {:?}: {out}", started.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    let (_, b) = c.call("GET", &format!("/api/sandboxes/{busy}"), "");
    assert_eq!(b["status"], "running");
    assert!(time_of(&b["endAt"]) > first_end, "endAt moved with the activity: {b}");
    let (_, i) = c.call("GET", &format!("/api/sandboxes/{idle}"), "");
    assert_eq!(i["status"], "hibernated", "{i}");
    let (_, f) = c.call("GET", &format!("/api/sandboxes/{forever}"), "");
    assert_eq!(f["status"], "running", "{f}");

    // Left idle, `busy` hibernates too.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, b) = h.client().call("GET", "/api/sandboxes", "");
        let state = b.as_array().expect("list").iter().find(|s| s["sandboxID"] == busy.as_str()).expect("busy")
            ["status"]
            .clone();
        if state == "hibernated" {
            break;
        }
        assert!(Instant::now() < deadline, "the idle sandbox was never hibernated");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The Python SDK reads with a 30 s timeout while `exec.run` waits for the command: a command
/// still running after 15 s gets its 200 head, then a space every 15 s, then its JSON.
#[test]
fn a_long_synchronous_command_keeps_its_connection_alive_until_its_result() {
    let h = Harness::start("sbx-exec-keepalive");
    let mut c = h.client();
    // An idle timeout far shorter than the command: a sandbox is not idle while it works.
    let (_, s) = c.call("POST", "/api/sandboxes", r#"{"timeout":2}"#);
    let id = s["sandboxID"].as_str().expect("id").to_string();
    let runs_for = appliance::api::exec_wait::FIRST_WAIT + Duration::from_secs(2);
    *h.runtime.exec_delay.lock().expect("lock") = runs_for;

    let mut conn = TcpStream::connect(h.addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let body = r#"{"cmd":"echo","args":["hi"],"timeout":120}"#;
    let started = Instant::now();
    write!(
        conn,
        "POST /api/sandboxes/{id}/exec/run HTTP/1.1\r\nHost: x\r\nX-API-Key: {ADMIN_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut received = Vec::new();
    let mut head_at = None;
    let mut buf = [0u8; 4096];
    while !received.ends_with(b"0\r\n\r\n") {
        let n = read_some(&mut conn, &mut buf);
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buf[..n]);
        if head_at.is_none() && received.windows(4).any(|w| w == b"\r\n\r\n") {
            head_at = Some(started.elapsed());
        }
    }
    let head_at = head_at.expect("a head");
    assert!(head_at < runs_for, "the head came at {head_at:?}, only after the command ({runs_for:?})");
    assert!(started.elapsed() >= runs_for);
    let text = String::from_utf8_lossy(&received).to_string();
    let (head, chunks) = text.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    let body = decode_chunks(chunks);
    assert!(body.starts_with(' '), "whitespace first: {body:?}");
    let result: Value = serde_json::from_str(&body).expect("JSON after the whitespace");
    assert_eq!((&result["exitCode"], &result["stdout"]), (&json!(0), &json!("hi\n")));
    let (_, record) = c.call("GET", &format!("/api/sandboxes/{id}"), "");
    assert_eq!(record["status"], "running", "stopped for being idle while its command ran: {record}");

    // The connection is still good for the next request.
    *h.runtime.exec_delay.lock().expect("lock") = Duration::ZERO;
    write!(conn, "GET /api/healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let n = read_some(&mut conn, &mut buf);
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
}

/// One read; signals sent to this test process (servers of other tests shutting down) may
/// interrupt it, which is not the server's doing.
fn read_some(conn: &mut TcpStream, buf: &mut [u8]) -> usize {
    loop {
        match conn.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other.expect("read"),
        }
    }
}

fn decode_chunks(mut rest: &str) -> String {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex size");
        if size == 0 {
            return body;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// `reboot` (and `power-cycle`) start the guest again from its own disk: it keeps its files and
/// CID, gets back the environment it was created with (tokens and envs, kept sealed meanwhile),
/// and its idle timeout starts again.
#[test]
fn a_restarted_guest_gets_its_environment_back_and_a_failed_restart_stops_it() {
    let h = Harness::start("sbx-restart");
    let mut c = h.client();
    project_with_secret(&mut c, "restart-agent", "sk-live-restart-0000");
    let env_value = "plain-env-value-5d1f0c";
    let (status, s) = c.call(
        "POST",
        "/api/sandboxes",
        &json!({"project": "restart-agent", "envs": {"GREETING": env_value}}).to_string(),
    );
    assert_eq!(status, 201, "{s}");
    let id = s["sandboxID"].as_str().expect("id").to_string();
    let mut before = h.runtime.env_of(&id);
    before.sort();
    assert!(before.iter().any(|(k, v)| k == "GREETING" && v == env_value), "{before:?}");

    for route in ["reboot", "power-cycle"] {
        let (status, after) = c.call("POST", &format!("/api/sandboxes/{id}/{route}"), "");
        assert_eq!((status, &after["status"]), (200, &json!("running")), "{route}: {after}");
        let mut env = h.runtime.env_of(&id);
        env.sort();
        assert_eq!(env, before, "{route}: the same tokens and envs");
    }
    assert_eq!(h.runtime.restarts.lock().expect("lock").len(), 2);
    // The proxy registration (by CID) is untouched; the environment is stored only sealed.
    assert_eq!(h.publisher.published.lock().expect("lock").get(&id).map(|s| s.bindings.len()), Some(1));
    for file in common::files_under(&h.data_dir) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(env_value.len()).any(|w| w == env_value.as_bytes()),
            "plaintext env in {}",
            file.display()
        );
    }

    let missing = "00000000-0000-4000-8000-000000000000";
    assert_eq!(c.call("POST", &format!("/api/sandboxes/{missing}/reboot"), "").0, 404);
    // A guest that does not take its environment back is stopped with the error.
    *h.runtime.fail_set_env.lock().expect("lock") = true;
    let (status, err) = c.call("POST", &format!("/api/sandboxes/{id}/reboot"), "");
    assert_eq!(status, 500, "{err}");
    *h.runtime.fail_set_env.lock().expect("lock") = false;
    let (_, now) = c.call("GET", &format!("/api/sandboxes/{id}"), "");
    assert_eq!(now["status"], "error", "{now}");
    let (status, err) = c.call("POST", &format!("/api/sandboxes/{id}/reboot"), "");
    assert_eq!(status, 409, "a stopped sandbox cannot be restarted: {err}");
}

//! Hibernate and wake over real HTTP with the runtime double: the routes and their answers (as
//! OpenComputer's), the guest kept across them, wake before any request that needs the guest (and
//! only once), the idle timeout hibernating or stopping as the project says, failures, deleting a
//! hibernated sandbox, and capacity. The reconcile of hibernated sandboxes after a restart is in
//! `api_reconcile.rs`.

mod common;

use std::net::TcpStream;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use appliance::capacity::CapacityConfig;
use appliance::clock::{now_unix, rfc3339};
use common::{websocket_handshake, Client, Harness};
use serde_json::{json, Value};

fn create(c: &mut Client, body: &Value) -> String {
    let (status, s) = c.call("POST", "/api/sandboxes", &body.to_string());
    assert_eq!(status, 201, "{s}");
    s["sandboxID"].as_str().expect("id").to_string()
}

fn status_of(c: &mut Client, id: &str) -> Value {
    let (status, s) = c.call("GET", &format!("/api/sandboxes/{id}"), "");
    assert_eq!(status, 200, "{s}");
    s
}

fn hibernate(c: &mut Client, id: &str) -> Value {
    let (status, s) = c.call("POST", &format!("/api/sandboxes/{id}/hibernate"), "");
    assert_eq!(status, 200, "{s}");
    assert_eq!((s["sandboxID"].as_str(), s["status"].as_str()), (Some(id), Some("hibernated")), "{s}");
    s
}

fn committed_mb(c: &mut Client) -> u64 {
    let (_, system) = c.call("GET", "/api/system", "");
    system["capacity"]["memoryMB"]["committed"].as_u64().expect("committed")
}

fn wait_for_status(c: &mut Client, id: &str, wanted: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status_of(c, id);
        if s["status"] == wanted {
            return s;
        }
        assert!(Instant::now() < deadline, "sandbox {id} never became {wanted}: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wakes(h: &Harness) -> usize {
    h.runtime.wakes.lock().expect("lock").len()
}

fn run(c: &mut Client, id: &str, cmd: &str) -> (u16, Value) {
    c.call("POST", &format!("/api/sandboxes/{id}/commands"), &json!({ "cmd": cmd }).to_string())
}

fn listed(c: &mut Client, query: &str) -> Vec<String> {
    let (status, list) = c.call("GET", &format!("/api/sandboxes{query}"), "");
    assert_eq!(status, 200, "{list}");
    list.as_array().expect("list").iter().map(|s| s["sandboxID"].as_str().expect("id").to_string()).collect()
}

/// Whether the time `at` is `secs` seconds from now, for one of `secs`.
fn ends_in(at: &Value, mut secs: RangeInclusive<i64>) -> bool {
    let now = now_unix();
    secs.any(|s| at.as_str() == Some(rfc3339(now + s).as_str()))
}

#[test]
fn hibernate_and_wake_keep_the_guest_and_answer_as_opencomputer_does() {
    let h = Harness::start("hib-cycle");
    let mut c = h.client();
    let (status, p) = c.call("POST", "/api/projects", r#"{"name":"agents"}"#);
    assert_eq!((status, &p["autoHibernate"]), (201, &json!(true)), "the idle timeout hibernates by default: {p}");
    let pid = p["id"].as_str().expect("id");
    assert_eq!(c.call("PUT", &format!("/api/projects/{pid}/secrets/API_KEY"), r#"{"value":"sk-hib-1"}"#).0, 204);
    let id = create(&mut c, &json!({"project": "agents", "memoryMB": 1024, "timeout": 600}));
    assert_eq!(c.raw("PUT", &format!("/api/sandboxes/{id}/files?path=/work/notes.txt"), b"kept").status, 204);
    let (status, session) = c.call("POST", &format!("/api/sandboxes/{id}/exec"), r#"{"cmd":"sleep 1000"}"#);
    assert_eq!(status, 201, "{session}");
    let (_, before) = run(&mut c, &id, "echo $API_KEY");
    let token = before["stdout"].as_str().expect("stdout").to_string();
    assert!(token.starts_with("osb_sealed_"), "{before}");
    assert_eq!(committed_mb(&mut c), 1024);

    let answer = hibernate(&mut c, &id);
    assert!(answer["sizeBytes"].as_u64().is_some_and(|n| n > 0), "this call wrote the snapshot: {answer}");
    let s = status_of(&mut c, &id);
    assert_eq!(s["status"], "hibernated");
    assert!(s["endAt"].is_null(), "its idle timeout does not run while it holds nothing: {s}");
    assert_eq!(listed(&mut c, "?state=hibernated"), vec![id.clone()]);
    assert!(listed(&mut c, "?state=running").is_empty());
    assert_eq!(committed_mb(&mut c), 0, "a hibernated sandbox holds no memory");
    assert!(!h.runtime.sandboxes.lock().expect("lock")[&id].alive, "no VMM");
    // Its tokens stay registered with the proxy (under its CID, which it keeps).
    assert!(h.publisher.published.lock().expect("lock").contains_key(&id));

    // Hibernating it again answers it as it is, as OpenComputer does; nothing is written.
    let again = hibernate(&mut c, &id);
    assert!(again.get("sizeBytes").is_none(), "{again}");
    assert_eq!(h.runtime.hibernations.lock().expect("lock").len(), 1);

    let (status, woken) = c.call("POST", &format!("/api/sandboxes/{id}/wake"), r#"{"timeout":120}"#);
    assert_eq!((status, woken["status"].as_str()), (200, Some("running")), "{woken}");
    assert_eq!(woken["sandboxID"], id.as_str());
    assert!(ends_in(&woken["endAt"], 118..=120), "the wake's timeout is its idle timeout now: {woken}");
    assert_eq!(h.runtime.sandboxes.lock().expect("lock")[&id].resumed, 1, "the guest was given the time and entropy");
    assert_eq!(committed_mb(&mut c), 1024, "woken, it holds its memory again");

    // Files, sessions and the sealed token are as they were.
    let file = c.raw("GET", &format!("/api/sandboxes/{id}/files?path=/work/notes.txt"), b"");
    assert_eq!((file.status, file.body.as_slice()), (200, b"kept".as_slice()));
    let (_, sessions) = c.call("GET", &format!("/api/sandboxes/{id}/exec"), "");
    assert_eq!(sessions[0]["sessionID"], session["sessionID"], "{sessions}");
    assert_eq!(sessions[0]["running"], true);
    let (_, after) = run(&mut c, &id, "echo $API_KEY");
    assert_eq!(after["stdout"].as_str(), Some(token.as_str()));

    // Waking a running sandbox answers it as it is (with the timeout given), as OpenComputer does.
    let (status, again) = c.call("POST", &format!("/api/sandboxes/{id}/wake"), "");
    assert_eq!((status, again["status"].as_str()), (200, Some("running")), "{again}");
    let (status, again) = c.call("POST", &format!("/api/sandboxes/{id}/wake"), r#"{"timeout":0}"#);
    assert_eq!((status, again["endAt"].is_null()), (200, true), "timeout 0: no automatic end: {again}");
    assert_eq!(wakes(&h), 1);
}

#[test]
fn a_request_that_needs_the_guest_wakes_it_first_and_only_once() {
    let h = Harness::start("hib-on-use");
    let mut c = h.client();
    let id = create(&mut c, &json!({"timeout": 600}));
    assert_eq!(c.raw("PUT", &format!("/api/sandboxes/{id}/files?path=/tmp/a"), b"A").status, 204);

    // Several commands at once on a hibernated sandbox: one wake, every command answered.
    hibernate(&mut c, &id);
    let addr = h.addr;
    let threads: Vec<_> = (0..4)
        .map(|n| {
            let id = id.clone();
            std::thread::spawn(move || {
                let mut c = Client::new(addr, Some(common::ADMIN_KEY));
                run(&mut c, &id, &format!("echo {n}"))
            })
        })
        .collect();
    for (n, t) in threads.into_iter().enumerate() {
        let (status, out) = t.join().expect("thread");
        assert_eq!((status, out["stdout"].as_str()), (200, Some(format!("{n}\n").as_str())), "{out}");
    }
    assert_eq!(wakes(&h), 1, "woken once for all of them");
    assert_eq!(status_of(&mut c, &id)["status"], "running");

    // Every kind of request that needs the guest wakes it; its answer is the guest's.
    let requests: [(&str, String, &str, u16); 8] = [
        ("POST", format!("/api/sandboxes/{id}/exec/run"), r#"{"cmd":"echo hi"}"#, 200),
        ("POST", format!("/api/sandboxes/{id}/exec/run-async"), r#"{"cmd":"echo hi"}"#, 200),
        ("GET", format!("/api/sandboxes/{id}/files?path=/tmp/a"), "", 200),
        ("GET", format!("/api/sandboxes/{id}/files/list?path=/tmp"), "", 200),
        ("PUT", format!("/api/sandboxes/{id}/files?path=/tmp/b"), "B", 204),
        ("POST", format!("/api/sandboxes/{id}/exec"), r#"{"cmd":"cat"}"#, 201),
        ("GET", format!("/api/sandboxes/{id}/exec"), "", 200),
        ("POST", format!("/api/sandboxes/{id}/pty"), r#"{"cols":80,"rows":24}"#, 201),
    ];
    for (n, (method, path, body, expected)) in requests.iter().enumerate() {
        hibernate(&mut c, &id);
        let got = c.raw(method, path, body.as_bytes());
        assert_eq!(got.status, *expected, "{method} {path}: {}", String::from_utf8_lossy(&got.body));
        assert_eq!(wakes(&h), n + 2, "{method} {path} woke it");
        assert_eq!(status_of(&mut c, &id)["status"], "running");
    }

    // A session attached over its WebSocket.
    let (_, session) = c.call("POST", &format!("/api/sandboxes/{id}/exec"), r#"{"cmd":"cat"}"#);
    let sid = session["sessionID"].as_str().expect("sid").to_string();
    hibernate(&mut c, &id);
    let mut ws = TcpStream::connect(h.addr).expect("connect");
    ws.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let head = websocket_handshake(&mut ws, &id, &sid);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (_, first) = common::read_server_frame(&mut ws);
    assert_eq!(first, b"\x01ready\n", "the woken session's output");
    drop(ws);

    // A signed URL is made for a hibernated sandbox without waking it; its use wakes it.
    hibernate(&mut c, &id);
    let woken_so_far = wakes(&h);
    let (status, signed) = c.call("POST", &format!("/api/sandboxes/{id}/files/download-url"), r#"{"path":"/tmp/a"}"#);
    assert_eq!(status, 200, "{signed}");
    assert_eq!((wakes(&h), status_of(&mut c, &id)["status"].as_str()), (woken_so_far, Some("hibernated")));
    let url = signed["url"].as_str().expect("url");
    let path = &url[url.find("/api/").expect("path")..];
    let got = Client::new(h.addr, None).raw("GET", path, b"");
    assert_eq!((got.status, got.body.as_slice()), (200, b"A".as_slice()));
    assert_eq!(wakes(&h), woken_so_far + 1);

    // Reading its record, its console or its hosts, or setting its timeout, does not wake it.
    hibernate(&mut c, &id);
    let woken_so_far = wakes(&h);
    for (method, path, body) in [
        ("GET", format!("/api/sandboxes/{id}"), ""),
        ("GET", format!("/api/sandboxes/{id}/logs"), ""),
        ("GET", format!("/api/sandboxes/{id}/allowed-hosts"), ""),
        ("POST", format!("/api/sandboxes/{id}/timeout"), r#"{"timeout":30}"#),
    ] {
        let got = c.raw(method, &path, body.as_bytes());
        assert!(got.status < 300, "{method} {path}: {} {}", got.status, String::from_utf8_lossy(&got.body));
    }
    let s = status_of(&mut c, &id);
    assert_eq!((s["status"].as_str(), s["endAt"].is_null()), (Some("hibernated"), true), "{s}");
    assert_eq!(wakes(&h), woken_so_far);
    // The timeout set meanwhile is the one it wakes with.
    let (_, woken) = c.call("POST", &format!("/api/sandboxes/{id}/wake"), "");
    assert!(ends_in(&woken["endAt"], 28..=30), "{woken}");
}

#[test]
fn the_idle_timeout_hibernates_or_stops_as_the_project_says() {
    let h = Harness::start("hib-idle");
    let mut c = h.client();
    let (status, stopper) = c.call("POST", "/api/projects", r#"{"name":"stopper","autoHibernate":false}"#);
    assert_eq!((status, &stopper["autoHibernate"]), (201, &json!(false)), "{stopper}");
    let (_, sleeper) = c.call("POST", "/api/projects", r#"{"name":"sleeper"}"#);
    // An update changes it only when given.
    let sleeper_id = sleeper["id"].as_str().expect("id");
    let (_, updated) = c.call("PUT", &format!("/api/projects/{sleeper_id}"), r#"{"autoHibernate":false}"#);
    assert_eq!(updated["autoHibernate"], false, "{updated}");
    let (_, updated) = c.call("PUT", &format!("/api/projects/{sleeper_id}"), r#"{"timeoutSec":60}"#);
    assert_eq!(updated["autoHibernate"], false, "{updated}");
    let (_, updated) = c.call("PUT", &format!("/api/projects/{sleeper_id}"), r#"{"autoHibernate":true}"#);
    assert_eq!(updated["autoHibernate"], true, "{updated}");
    let (status, bad) = c.call("PUT", &format!("/api/projects/{sleeper_id}"), r#"{"autoHibernate":"yes"}"#);
    assert_eq!(status, 400, "{bad}");
    assert!(bad["error"].is_string(), "{bad}");

    let stops = create(&mut c, &json!({"project": "stopper", "timeout": 1}));
    let sleeps = create(&mut c, &json!({"project": "sleeper", "timeout": 1}));
    let plain = create(&mut c, &json!({"timeout": 1}));
    wait_for_status(&mut c, &stops, "stopped");
    let s = wait_for_status(&mut c, &sleeps, "hibernated");
    assert!(s["endAt"].is_null(), "{s}");
    wait_for_status(&mut c, &plain, "hibernated");
    assert!(h.runtime.stops.lock().expect("lock").contains(&stops));
    assert_eq!(committed_mb(&mut c), 0);

    // A hibernated sandbox's timeout does not run: it stays hibernated, its snapshot kept.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status_of(&mut c, &sleeps)["status"], "hibernated");
    assert!(h.runtime.sandboxes.lock().expect("lock")[&sleeps].hibernated);

    // Used again it wakes; left idle again it hibernates again.
    let (status, out) = run(&mut c, &sleeps, "echo back");
    assert_eq!((status, out["stdout"].as_str()), (200, Some("back\n")), "{out}");
    wait_for_status(&mut c, &sleeps, "hibernated");
    let hibernated = h.runtime.hibernations.lock().expect("lock").iter().filter(|i| **i == sleeps).count();
    assert_eq!(hibernated, 2);
}

#[test]
fn a_failed_snapshot_leaves_it_running_and_a_failed_wake_ends_it() {
    let h = Harness::start("hib-fail");
    let mut c = h.client();
    let id = create(&mut c, &json!({"timeout": 600, "memoryMB": 512}));
    *h.runtime.fail_hibernate.lock().expect("lock") = Some("no space left on device".into());
    let (status, err) = c.call("POST", &format!("/api/sandboxes/{id}/hibernate"), "");
    assert_eq!(status, 500, "{err}");
    let message = err["error"].as_str().expect("error sentence");
    assert!(message.contains("was not hibernated and keeps running") && message.contains("no space"), "{message}");
    let s = status_of(&mut c, &id);
    assert_eq!(s["status"], "running");
    assert!(!s["endAt"].is_null(), "its timeout runs again: {s}");
    assert_eq!(run(&mut c, &id, "echo still").0, 200);
    assert_eq!(committed_mb(&mut c), 512);

    // At its idle timeout a sandbox that cannot be hibernated is stopped instead.
    assert_eq!(c.call("POST", &format!("/api/sandboxes/{id}/timeout"), r#"{"timeout":1}"#).0, 204);
    wait_for_status(&mut c, &id, "stopped");
    assert_eq!(committed_mb(&mut c), 0);

    *h.runtime.fail_hibernate.lock().expect("lock") = None;
    let id = create(&mut c, &json!({"timeout": 600}));
    hibernate(&mut c, &id);
    *h.runtime.fail_wake.lock().expect("lock") = true;
    let (status, err) = c.call("POST", &format!("/api/sandboxes/{id}/wake"), "");
    assert_eq!(status, 500, "{err}");
    assert!(err["error"].as_str().is_some_and(|m| m.contains("did not answer")), "{err}");
    assert_eq!(status_of(&mut c, &id)["status"], "error");
    assert!(h.runtime.stops.lock().expect("lock").contains(&id), "what was left of it was removed");
    assert!(h.publisher.withdrawn.lock().expect("lock").contains(&id));
    assert_eq!(committed_mb(&mut c), 0);
}

#[test]
fn wrong_states_and_bad_input_are_refused_with_a_sentence() {
    let h = Harness::start("hib-refused");
    let mut c = h.client();
    let missing = "3f1c9a52-0000-4000-8000-00000000abcd";
    for route in ["hibernate", "wake"] {
        let (status, err) = c.call("POST", &format!("/api/sandboxes/{missing}/{route}"), "");
        assert_eq!(status, 404, "{err}");
        let (status, err) = c.call("POST", &format!("/api/sandboxes/not-a-uuid/{route}"), "");
        assert_eq!(status, 400, "{err}");
    }

    let id = create(&mut c, &json!({"timeout": 600}));
    hibernate(&mut c, &id);
    for body in [r#"{"timeout":"soon"}"#, r#"{"timeout":-1}"#, "not json", r#"{"timeout":99999999}"#] {
        let (status, err) = c.call("POST", &format!("/api/sandboxes/{id}/wake"), body);
        assert_eq!(status, 400, "{body}: {err}");
        assert!(err["error"].is_string(), "{err}");
    }
    // What needs a running guest and is not a use of it says what state it is in.
    for route in ["reboot", "diagnostics/memory-dump"] {
        let (status, err) = c.call("POST", &format!("/api/sandboxes/{id}/{route}"), "");
        assert_eq!(status, 409, "{route}: {err}");
        assert!(err["error"].as_str().is_some_and(|m| m.contains("hibernated")), "{err}");
    }
    assert_eq!(status_of(&mut c, &id)["status"], "hibernated");

    // An ended sandbox can be neither hibernated nor woken.
    let ended = create(&mut c, &json!({"timeout": 600}));
    h.runtime.kill_vmm(&ended);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_of(&mut c, &ended)["status"] == "running" {
        assert!(Instant::now() < deadline, "the dead VMM was never noticed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, err) = c.call("POST", &format!("/api/sandboxes/{ended}/hibernate"), "");
    assert_eq!(status, 409, "{err}");
    assert!(err["error"].as_str().is_some_and(|m| m.contains("only a running sandbox can be hibernated")), "{err}");
    let (status, err) = c.call("POST", &format!("/api/sandboxes/{ended}/wake"), "");
    assert_eq!(status, 409, "{err}");
    assert!(err["error"].as_str().is_some_and(|m| m.contains("only a hibernated sandbox can be woken")), "{err}");
    // And a command on it is refused as before, not woken.
    assert_eq!(run(&mut c, &ended, "echo x").0, 409);
}

#[test]
fn deleting_a_hibernated_sandbox_removes_its_snapshot_and_tokens() {
    let h = Harness::start("hib-delete");
    let mut c = h.client();
    let (_, p) = c.call("POST", "/api/projects", r#"{"name":"agents"}"#);
    let pid = p["id"].as_str().expect("id");
    assert_eq!(c.call("PUT", &format!("/api/projects/{pid}/secrets/K"), r#"{"value":"v"}"#).0, 204);
    let id = create(&mut c, &json!({"project": "agents"}));
    hibernate(&mut c, &id);
    assert_eq!(c.call("DELETE", &format!("/api/sandboxes/{id}"), "").0, 204);
    assert_eq!(c.call("GET", &format!("/api/sandboxes/{id}"), "").0, 404);
    assert!(h.runtime.stops.lock().expect("lock").contains(&id));
    assert!(!h.runtime.sandboxes.lock().expect("lock")[&id].hibernated, "its snapshot is gone");
    assert!(!h.publisher.published.lock().expect("lock").contains_key(&id), "its tokens stand for nothing");
    assert_eq!(wakes(&h), 0, "deleting does not wake it");
}

#[test]
fn a_hibernated_sandbox_frees_its_capacity_and_a_wake_is_admitted_like_a_create() {
    let capacity = CapacityConfig {
        memory_total_mb: Some(2560),
        memory_reserve_mb: Some(512),
        vcpus: Some(2),
        disk_reserve_mb: 0,
    };
    let h = Harness::start_with_capacity("hib-capacity", capacity);
    let mut c = h.client();
    let a = create(&mut c, &json!({"memoryMB": 2048, "timeout": 600}));
    let (status, err) = c.call("POST", "/api/sandboxes", r#"{"memoryMB":1024}"#);
    assert_eq!(status, 503, "full: {err}");
    hibernate(&mut c, &a);
    assert_eq!(committed_mb(&mut c), 0);
    let b = create(&mut c, &json!({"memoryMB": 2048, "timeout": 600}));

    let (status, err) = c.call("POST", &format!("/api/sandboxes/{a}/wake"), "");
    assert_eq!(status, 503, "{err}");
    assert_eq!(err["error"], "not enough memory for a 2048 MiB sandbox: 0 MiB free of 2048 MiB for sandboxes");
    // A request that would wake it is refused the same way, and it stays hibernated.
    let (status, err) = run(&mut c, &a, "echo x");
    assert_eq!(status, 503, "{err}");
    assert_eq!(status_of(&mut c, &a)["status"], "hibernated");
    assert_eq!(wakes(&h), 0);

    assert_eq!(c.call("DELETE", &format!("/api/sandboxes/{b}"), "").0, 204);
    let (status, woken) = c.call("POST", &format!("/api/sandboxes/{a}/wake"), "");
    assert_eq!((status, woken["status"].as_str()), (200, Some("running")), "{woken}");
    assert_eq!(committed_mb(&mut c), 2048);
}

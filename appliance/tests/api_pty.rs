//! Interactive terminals over real HTTP, as the OpenComputer SDKs drive them: create with a
//! size, a WebSocket of raw bytes (at `/api/...` and, for the Python SDK, without `/api`, the
//! key in `?api_key=`), resize, kill; bad sizes, unknown sessions and key scopes.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{masked_frame, read_server_frame, websocket_open, Client, Harness, ADMIN_KEY};
use serde_json::{json, Value};

fn sandbox(c: &mut Client, body: &str) -> String {
    let (status, s) = c.call("POST", "/api/sandboxes", body);
    assert_eq!(status, 201, "{s}");
    s["sandboxID"].as_str().expect("id").to_string()
}

fn terminal(c: &mut Client, id: &str, body: &str) -> String {
    let (status, t) = c.call("POST", &format!("/api/sandboxes/{id}/pty"), body);
    assert_eq!(status, 201, "{t}");
    t["sessionID"].as_str().expect("sessionID").to_string()
}

/// Opens a WebSocket at `target` and returns the socket and the response's status line.
fn open(h: &Harness, target: &str, headers: &str) -> (TcpStream, String) {
    let mut ws = TcpStream::connect(h.addr).expect("connect");
    ws.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let head = websocket_open(&mut ws, target, headers);
    let status = head.lines().next().unwrap_or_default().to_string();
    (ws, status)
}

/// The size and shell the runtime double was asked for.
fn asked(h: &Harness, id: &str, sid: &str) -> ((u16, u16), Option<String>) {
    let sandboxes = h.runtime.sandboxes.lock().expect("lock");
    sandboxes[id].terminals.get(sid).cloned().expect("terminal started")
}

#[test]
fn a_terminal_is_created_streamed_as_raw_bytes_resized_and_killed() {
    let h = Harness::start("pty-flow");
    let mut c = h.client();
    let id = sandbox(&mut c, "{}");

    let (status, created) = c.call("POST", &format!("/api/sandboxes/{id}/pty"), r#"{"cols":80,"rows":24}"#);
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["sandboxID"], id.as_str());
    let sid = created["sessionID"].as_str().expect("sessionID").to_string();
    assert_eq!(asked(&h, &id, &sid), ((80, 24), None));
    let zsh = terminal(&mut c, &id, r#"{"cols":100,"rows":30,"shell":"/bin/zsh"}"#);
    assert_eq!(asked(&h, &id, &zsh), ((100, 30), Some("/bin/zsh".into())));
    let default = terminal(&mut c, &id, "");
    assert_eq!(asked(&h, &id, &default), ((80, 24), None), "an empty body gets 80x24");

    // The TS SDK's WebSocket: /api, the key only in the query.
    let (mut ws, status) = open(&h, &format!("/api/sandboxes/{id}/pty/{sid}?api_key={ADMIN_KEY}"), "");
    assert_eq!(status, "HTTP/1.1 101 Switching Protocols");
    assert_eq!(read_server_frame(&mut ws), (0x2, b"ready\n".to_vec()), "output is binary, without a stream byte");
    ws.write_all(&masked_frame(0x1, b"ls -l\r")).expect("text input");
    assert_eq!(read_server_frame(&mut ws), (0x2, b"ls -l\r".to_vec()), "text frames are typed in as they are");
    ws.write_all(&masked_frame(0x2, b"\x00\x01\x1b[A")).expect("binary input");
    assert_eq!(read_server_frame(&mut ws), (0x2, b"\x00\x01\x1b[A".to_vec()), "no byte is taken as a stream tag");
    ws.write_all(&masked_frame(0x9, b"ping!")).expect("ping");
    assert_eq!(read_server_frame(&mut ws), (0xA, b"ping!".to_vec()));
    // The double's session ends on "exit"; the socket closes normally with no exit frame.
    ws.write_all(&masked_frame(0x1, b"exit")).expect("exit");
    let (op, payload) = read_server_frame(&mut ws);
    assert_eq!((op, &payload[..2]), (0x8, &1000u16.to_be_bytes()[..]));

    let (status, body) = c.call("POST", &format!("/api/sandboxes/{id}/pty/{sid}/resize"), r#"{"cols":120,"rows":40}"#);
    assert_eq!((status, body), (200, json!({})));
    assert_eq!(asked(&h, &id, &sid).0, (120, 40));

    let (status, body) = c.call("DELETE", &format!("/api/sandboxes/{id}/pty/{sid}"), "");
    assert_eq!((status, body), (204, Value::Null));
    assert!(h.runtime.sandboxes.lock().expect("lock")[&id].killed.contains(&(sid.clone(), 9)), "SIGKILL");
    // An ended terminal cannot be resized; killing it again is what was asked for.
    let (status, body) = c.call("POST", &format!("/api/sandboxes/{id}/pty/{sid}/resize"), r#"{"cols":80,"rows":24}"#);
    assert_eq!(status, 409, "{body}");
    assert_eq!(c.call("DELETE", &format!("/api/sandboxes/{id}/pty/{sid}"), "").0, 204);

    // A terminal's WebSocket path without an upgrade is a clear 400.
    let (status, body) = c.call("GET", &format!("/api/sandboxes/{id}/pty/{zsh}"), "");
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().expect("error").contains("WebSocket"), "{body}");
}

#[test]
fn unknown_terminals_and_sandboxes_are_404() {
    let h = Harness::start("pty-404");
    let mut c = h.client();
    let id = sandbox(&mut c, "{}");
    let base = format!("/api/sandboxes/{id}/pty/no-such-session");
    let (status, body) = c.call("POST", &format!("{base}/resize"), r#"{"cols":80,"rows":24}"#);
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(c.call("DELETE", &base, "").0, 404);
    let (_, status) = open(&h, &format!("{base}?api_key={ADMIN_KEY}"), "");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (_, status) = open(&h, &format!("/sandboxes/{id}/pty/no-such-session?api_key={ADMIN_KEY}"), "");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let missing = "00000000-0000-4000-8000-000000000000";
    assert_eq!(c.call("POST", &format!("/api/sandboxes/{missing}/pty"), r#"{"cols":80,"rows":24}"#).0, 404);
}

#[test]
fn sizes_must_be_integers_from_1_to_1000() {
    let h = Harness::start("pty-sizes");
    let mut c = h.client();
    let id = sandbox(&mut c, "{}");
    let sid = terminal(&mut c, &id, r#"{"cols":80,"rows":24}"#);
    for bad in [json!(0), json!(1001), json!(-1), json!(24.5), json!("24"), json!(70000)] {
        for field in ["cols", "rows"] {
            let mut body = json!({"cols": 80, "rows": 24});
            body[field] = bad.clone();
            let (status, answer) = c.call("POST", &format!("/api/sandboxes/{id}/pty"), &body.to_string());
            assert_eq!(status, 400, "create {body}: {answer}");
            assert_eq!(answer["error"], format!("{field} must be an integer from 1 to 1000"), "{body}");
            let (status, answer) = c.call("POST", &format!("/api/sandboxes/{id}/pty/{sid}/resize"), &body.to_string());
            assert_eq!(status, 400, "resize {body}: {answer}");
        }
    }
    let (status, answer) = c.call("POST", &format!("/api/sandboxes/{id}/pty/{sid}/resize"), r#"{"cols":80}"#);
    assert_eq!((status, answer["error"].as_str()), (400, Some("rows is required")));
    let (status, _) = c.call("POST", &format!("/api/sandboxes/{id}/pty"), r#"{"cols":80,"rows":24,"shell":"zsh"}"#);
    assert_eq!(status, 400, "a shell is an absolute path");
    let (status, _) = c.call("POST", &format!("/api/sandboxes/{id}/pty"), "{not json");
    assert_eq!(status, 400);
    // Nothing was started or resized by the refused requests.
    assert_eq!(h.runtime.sandboxes.lock().expect("lock")[&id].terminals.len(), 1);
    assert_eq!(asked(&h, &id, &sid).0, (80, 24));
}

#[test]
fn the_python_sdks_path_without_api_serves_the_websocket_only_with_a_key() {
    let h = Harness::start("pty-bare-path");
    let mut c = h.client();
    let id = sandbox(&mut c, "{}");
    let sid = terminal(&mut c, &id, r#"{"cols":80,"rows":24}"#);
    let bare = format!("/sandboxes/{id}/pty/{sid}");

    // Python: the raw key in the query and in X-API-Key.
    let (mut ws, status) = open(&h, &format!("{bare}?api_key={ADMIN_KEY}"), &format!("X-API-Key: {ADMIN_KEY}\r\n"));
    assert_eq!(status, "HTTP/1.1 101 Switching Protocols");
    assert_eq!(read_server_frame(&mut ws), (0x2, b"ready\n".to_vec()));
    ws.write_all(&masked_frame(0x2, b"echo hi\r")).expect("input");
    assert_eq!(read_server_frame(&mut ws), (0x2, b"echo hi\r".to_vec()));
    drop(ws);
    let (_, status) = open(&h, &format!("{bare}?api_key={ADMIN_KEY}"), "");
    assert_eq!(status, "HTTP/1.1 101 Switching Protocols", "the query alone is enough");

    for target in [bare.clone(), format!("{bare}?api_key=not-the-key-0123456789"), format!("/api{bare}")] {
        let (_, status) = open(&h, &target, "");
        assert_eq!(status, "HTTP/1.1 401 Unauthorized", "{target}");
    }
    // Without an upgrade nothing is served outside /api, whatever the key.
    let r = c.raw("GET", &bare, b"");
    assert_eq!(r.status, 404);
    let r = c.raw("DELETE", &bare, b"");
    assert_eq!(r.status, 404);

    // Only the route's pattern is recorded, never the URL with its key.
    let metrics = String::from_utf8(c.raw("GET", "/metrics", b"").body).expect("utf-8");
    assert!(metrics.contains("/api/sandboxes/{id}/pty/{sid}"), "{metrics}");
    assert!(!metrics.contains(ADMIN_KEY) && !metrics.contains(&sid), "the key or the path leaked into metrics");
}

#[test]
fn a_project_key_reaches_only_the_terminals_of_its_projects() {
    let h = Harness::start("pty-scopes");
    let mut op = h.client();
    assert_eq!(op.call("POST", "/api/projects", r#"{"name":"a"}"#).0, 201);
    assert_eq!(op.call("POST", "/api/projects", r#"{"name":"b"}"#).0, 201);
    let mine = sandbox(&mut op, r#"{"project":"a"}"#);
    let theirs = sandbox(&mut op, r#"{"project":"b"}"#);
    let (status, key) = op.call("POST", "/api/keys", r#"{"name":"agent-a","projects":["a"]}"#);
    assert_eq!(status, 201, "{key}");
    let key = key["key"].as_str().expect("key").to_string();
    let mut pk = Client::new(h.addr, Some(&key));

    let my_sid = terminal(&mut pk, &mine, r#"{"cols":80,"rows":24}"#);
    let their_sid = terminal(&mut op, &theirs, r#"{"cols":80,"rows":24}"#);
    let (status, body) = pk.call("POST", &format!("/api/sandboxes/{theirs}/pty"), r#"{"cols":80,"rows":24}"#);
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().expect("error").contains("scope"), "{body}");
    let resize = format!("/api/sandboxes/{theirs}/pty/{their_sid}/resize");
    assert_eq!(pk.call("POST", &resize, r#"{"cols":80,"rows":24}"#).0, 403);
    assert_eq!(pk.call("DELETE", &format!("/api/sandboxes/{theirs}/pty/{their_sid}"), "").0, 403);
    for prefix in ["/api", ""] {
        let (_, status) = open(&h, &format!("{prefix}/sandboxes/{theirs}/pty/{their_sid}?api_key={key}"), "");
        assert_eq!(status, "HTTP/1.1 403 Forbidden", "{prefix}");
        let (_, status) = open(&h, &format!("{prefix}/sandboxes/{mine}/pty/{my_sid}?api_key={key}"), "");
        assert_eq!(status, "HTTP/1.1 101 Switching Protocols", "{prefix}");
    }
    assert_eq!(pk.call("POST", &format!("/api/sandboxes/{mine}/pty/{my_sid}/resize"), r#"{"cols":9,"rows":9}"#).0, 200);
    assert_eq!(pk.call("DELETE", &format!("/api/sandboxes/{mine}/pty/{my_sid}"), "").0, 204);
    assert!(h.runtime.sandboxes.lock().expect("lock")[&theirs].killed.is_empty(), "their terminal was not touched");
}

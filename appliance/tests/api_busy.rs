//! The control plane under load, over real HTTP with the runtime double: long commands run
//! on threads of their own, so cheap routes answer at once whatever is in flight, and their
//! answers still go out on their own connections.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Client, Harness, ADMIN_KEY};

const SLEEPERS: usize = 40;

/// A server with one running sandbox whose commands take `delay`; returns it and the id.
fn sandbox_whose_commands_take(tag: &str, delay: Duration) -> (Harness, String) {
    let h = Harness::start(tag);
    let (status, sandbox) = h.client().call("POST", "/api/sandboxes", "{}");
    assert_eq!(status, 201, "{sandbox}");
    *h.runtime.exec_delay.lock().expect("lock") = delay;
    let id = sandbox["sandboxID"].as_str().expect("id").to_string();
    (h, id)
}

#[test]
fn healthz_and_projects_answer_at_once_while_forty_commands_sleep() {
    let (h, id) = sandbox_whose_commands_take("busy", Duration::from_secs(10));

    // More sleepers than the server has request workers (32).
    let sleepers: Vec<_> = (0..SLEEPERS)
        .map(|_| {
            let (addr, path) = (h.addr, format!("/api/sandboxes/{id}/commands"));
            std::thread::spawn(move || Client::new(addr, Some(ADMIN_KEY)).call("POST", &path, r#"{"cmd":"sleep 30"}"#))
        })
        .collect();
    let long_work = &h.running.as_ref().expect("running").app().long_work;
    // Starting 40 connections at once takes a moment on a loaded machine (tiny_http's pool
    // may queue a few until the server's kicker frees them).
    let deadline = Instant::now() + Duration::from_secs(7);
    while long_work.in_flight() < SLEEPERS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(long_work.in_flight(), SLEEPERS, "the sleepers did not all start");

    let mut slowest = Duration::ZERO;
    for i in 0..40 {
        // A new connection each time, as a monitoring probe makes it.
        let mut probe = Client::new(h.addr, Some(ADMIN_KEY));
        let path = if i % 2 == 0 { "/api/healthz" } else { "/api/projects" };
        let started = Instant::now();
        let (status, body) = probe.call("GET", path, "");
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, 200, "{path}: {body}");
    }
    assert_eq!(long_work.in_flight(), SLEEPERS, "probing outlasted the sleepers; the test proves nothing");
    assert!(slowest < Duration::from_millis(500), "slowest probe took {slowest:?}");

    for s in sleepers {
        let (status, body) = s.join().expect("sleeper");
        assert_eq!(status, 200, "{body}");
        assert!(body["exitCode"].is_i64(), "{body}");
    }
    assert_eq!(long_work.in_flight(), 0);
}

#[test]
fn a_long_command_answers_on_its_keep_alive_connection() {
    // Served on another thread, the answer still goes out on the request's own connection.
    let (h, id) = sandbox_whose_commands_take("long-keepalive", Duration::from_millis(2500));
    let mut long = Client::new(h.addr, Some(ADMIN_KEY));
    let (status, body) = long.call("POST", &format!("/api/sandboxes/{id}/commands"), r#"{"cmd":"sleep 2"}"#);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_long_command_answers_on_a_closing_connection() {
    let (h, id) = sandbox_whose_commands_take("long-close", Duration::from_millis(2500));
    let body = r#"{"cmd":"sleep 2"}"#;
    let mut stream = TcpStream::connect(h.addr).expect("connect");
    write!(
        stream,
        "POST /api/sandboxes/{id}/commands HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-API-Key: {ADMIN_KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("read the whole answer");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

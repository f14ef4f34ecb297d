//! The API's front over real TCP: open connections are capped, clients that hold one without
//! sending a request are dropped, and nothing a client holds open costs more than the cap,
//! while long requests and WebSockets run as long as they need.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use appliance::http::front::ConnectionLimits;
use common::{masked_frame, read_server_frame, websocket_handshake, Harness};

const HEADER_TIMEOUT: Duration = Duration::from_millis(400);
const IDLE_TIMEOUT: Duration = Duration::from_millis(800);

fn tight(max_connections: usize) -> ConnectionLimits {
    ConnectionLimits { max_connections, header_timeout: HEADER_TIMEOUT, idle_timeout: IDLE_TIMEOUT }
}

fn connect(h: &Harness) -> TcpStream {
    let s = TcpStream::connect(h.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s
}

/// Everything the server sends until it closes the connection.
fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

fn healthz(s: &mut TcpStream) -> String {
    s.write_all(b"GET /api/healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).expect("read");
    String::from_utf8_lossy(&buf[..n]).to_string()
}

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()).expect("Threads")
}

#[test]
fn connections_over_the_cap_get_503_and_a_freed_slot_serves_again() {
    let h = Harness::start_with_connections("conn-cap", ConnectionLimits { max_connections: 4, ..Default::default() });
    let mut held: Vec<TcpStream> = (0..4).map(|_| connect(&h)).collect();
    for s in &mut held {
        assert!(healthz(s).starts_with("HTTP/1.1 200"), "kept-alive connections under the cap are served");
    }
    let mut over = connect(&h);
    let refused = read_to_close(&mut over);
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.ends_with(r#"{"error":"the API has 4 open connections, its limit; retry shortly"}"#), "{refused}");

    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = connect(&h);
        let answer = healthz(&mut s);
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "a closed connection's slot was never freed: {answer}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_half_sent_head_gets_408_and_an_idle_connection_is_closed() {
    let h = Harness::start_with_connections("conn-timeouts", tight(64));

    let mut slow = connect(&h);
    let started = Instant::now();
    slow.write_all(b"GET /api/healthz HTTP/1.1\r\nHost: x\r\n").expect("write");
    let answer = read_to_close(&mut slow);
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.ends_with(r#"{"error":"the request head was not sent in time"}"#), "{answer}");
    assert!(took >= HEADER_TIMEOUT && took < HEADER_TIMEOUT * 5, "408 after {took:?}");

    // Connected and silent: also late with its head.
    let mut silent = connect(&h);
    assert!(read_to_close(&mut silent).starts_with("HTTP/1.1 408"));

    // Served, then idle: closed without a word after the idle timeout.
    let mut idle = connect(&h);
    assert!(healthz(&mut idle).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    assert_eq!(read_to_close(&mut idle), "", "nothing is sent on an idle close");
    let took = started.elapsed();
    assert!(took >= IDLE_TIMEOUT && took < IDLE_TIMEOUT * 5, "closed after {took:?}");
}

#[test]
fn a_client_that_closes_its_sending_side_still_gets_its_answer() {
    let h = Harness::start_with_connections("conn-halfclose", tight(64));
    let mut s = connect(&h);
    s.write_all(b"GET /api/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let answer = read_to_close(&mut s);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains(r#""status":"ok""#), "{answer}");
}

#[test]
fn requests_and_websockets_outlive_the_timeouts() {
    let h = Harness::start_with_connections("conn-long", tight(64));
    let mut c = h.client();
    let (_, s) = c.call("POST", "/api/sandboxes", "{}");
    let id = s["sandboxID"].as_str().expect("id").to_string();

    // A command that answers after both timeouts have passed: the server owes the answer.
    *h.runtime.exec_delay.lock().expect("lock") = IDLE_TIMEOUT * 2;
    let (status, ran) = c.call("POST", &format!("/api/sandboxes/{id}/commands"), r#"{"cmd":"echo hi"}"#);
    assert_eq!(status, 200, "{ran}");
    *h.runtime.exec_delay.lock().expect("lock") = Duration::ZERO;

    // An attached session silent for longer than the idle timeout stays attached.
    let (_, started) = c.call("POST", &format!("/api/sandboxes/{id}/exec"), r#"{"cmd":"cat"}"#);
    let sid = started["sessionID"].as_str().expect("sid").to_string();
    let mut ws = connect(&h);
    let response = websocket_handshake(&mut ws, &id, &sid);
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    assert_eq!(read_server_frame(&mut ws), (0x2, b"\x01ready\n".to_vec()));
    // The end of the replay, which shells wait for before they send anything.
    assert_eq!(read_server_frame(&mut ws), (0x2, b"\x04".to_vec()));
    std::thread::sleep(IDLE_TIMEOUT * 2);
    ws.write_all(&masked_frame(0x2, b"\x00still here\n")).expect("stdin");
    assert_eq!(read_server_frame(&mut ws), (0x2, b"\x01still here\n".to_vec()));
}

#[test]
fn a_thousand_silent_clients_cost_no_more_threads_than_the_cap() {
    let h = Harness::start_with_connections(
        "conn-threads",
        ConnectionLimits { max_connections: 32, header_timeout: Duration::from_secs(30), ..Default::default() },
    );
    let before = threads();
    let silent: Vec<TcpStream> = (0..1000).map(|_| connect(&h)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = threads();
    println!("threads: {before} before, {during} with 1000 silent clients (cap 32)");
    // Other tests of this file run alongside and start threads of their own (about 40 per
    // server); without the cap the silent clients alone would add 1000.
    assert!(during <= before + 32 + 400, "{before} threads before, {during} with 1000 silent clients");
    // The API still answers once they are gone.
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = connect(&h);
        if healthz(&mut s).starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the API did not recover after the silent clients left");
        std::thread::sleep(Duration::from_millis(20));
    }
}

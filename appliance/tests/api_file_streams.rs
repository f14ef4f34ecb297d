//! File reads and writes through the API are streamed: the server holds a bounded amount of a
//! file however large it is, a failure after the head never looks like a complete body, and
//! bodies the server cannot take are refused before they are read.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

/// What may be in flight between the client and the double at any moment: the server's pipe
/// (512 KiB) and the double's piece, plus the socket buffers on both sides of the front and
/// the front's own buffers (loopback TCP buffers grow to a few MiB each). Far below the files.
const IN_FLIGHT_BOUND: u64 = 48 << 20;
const BIG: u64 = 256 << 20;

fn sandbox(h: &Harness) -> String {
    let (status, s) = h.client().call("POST", "/api/sandboxes", "{}");
    assert_eq!(status, 201, "{s}");
    s["sandboxID"].as_str().expect("id").to_string()
}

fn connect(h: &Harness) -> TcpStream {
    let s = TcpStream::connect(h.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    s
}

/// Reads a response head; returns the status line and the headers in lower case.
fn read_head(r: &mut BufReader<TcpStream>) -> (u16, Vec<String>) {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("head line");
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    let status = lines[0].split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    (status, lines[1..].iter().map(|l| l.to_ascii_lowercase()).collect())
}

/// How a chunked body ended.
#[derive(Debug, PartialEq)]
enum Ending {
    /// The zero-length chunk came.
    Complete,
    /// Something that is not a chunk-size line, or the connection closed.
    Broken,
}

/// Reads a chunked body, handing each piece to `each` (total so far, piece).
fn read_chunked(r: &mut BufReader<TcpStream>, mut each: impl FnMut(u64, &[u8])) -> (u64, Ending) {
    let mut total = 0u64;
    let mut piece = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return (total, Ending::Broken);
        }
        let Ok(size) = usize::from_str_radix(line.trim_end(), 16) else { return (total, Ending::Broken) };
        if size == 0 {
            let mut end = String::new();
            r.read_line(&mut end).expect("last CRLF");
            return (total, Ending::Complete);
        }
        piece.resize(size + 2, 0);
        if r.read_exact(&mut piece).is_err() {
            return (total, Ending::Broken);
        }
        each(total, &piece[..size]);
        total += size as u64;
    }
}

fn wait_until(what: &str, limit: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_large_download_is_streamed_with_a_bounded_amount_in_flight() {
    let h = Harness::start("stream-read");
    let id = sandbox(&h);
    let mut s = connect(&h);
    write!(s, "GET /api/sandboxes/{id}/files?path=/gen/{BIG} HTTP/1.1\r\nHost: x\r\nX-API-Key: {ADMIN_KEY}\r\n\r\n")
        .expect("request");
    let mut r = BufReader::with_capacity(1 << 20, s);
    let (status, headers) = read_head(&mut r);
    assert_eq!(status, 200);
    assert!(headers.contains(&"transfer-encoding: chunked".to_string()), "{headers:?}");
    let mut paused = false;
    let mut all_match = true;
    let (total, ending) = read_chunked(&mut r, |at, piece| {
        all_match &= piece.iter().enumerate().all(|(i, b)| *b == pattern_byte(at + i as u64));
        // A slow client: the producer has time to fill every buffer between them.
        if !paused && at > 16 << 20 {
            paused = true;
            std::thread::sleep(Duration::from_millis(1500));
        }
        let handed = h.runtime.read_handed_out.load(Ordering::SeqCst);
        let received = at + piece.len() as u64;
        assert!(
            handed.saturating_sub(received) <= IN_FLIGHT_BOUND,
            "the server holds {} MiB of the file (handed out {handed}, received {received})",
            (handed - received) >> 20
        );
    });
    assert_eq!((total, ending), (BIG, Ending::Complete));
    assert!(all_match, "the bytes arrived changed or out of order");
}

#[test]
fn a_large_upload_is_streamed_with_a_bounded_amount_in_flight() {
    let h = Harness::start("stream-write");
    let id = sandbox(&h);
    let mut s = connect(&h);
    write!(
        s,
        "PUT /api/sandboxes/{id}/files?path=/sink/big HTTP/1.1\r\nHost: x\r\nX-API-Key: {ADMIN_KEY}\r\n\
         Content-Length: {BIG}\r\n\r\n"
    )
    .expect("head");
    let mut piece = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    while sent < BIG {
        for (i, b) in piece.iter_mut().enumerate() {
            *b = pattern_byte(sent + i as u64);
        }
        s.write_all(&piece).expect("body");
        sent += piece.len() as u64;
        // A server that buffered the body would hand the double nothing until the end.
        let taken = &h.runtime.write_taken_in;
        wait_until("the double to take the upload", Duration::from_secs(30), || {
            sent.saturating_sub(taken.load(Ordering::SeqCst)) <= IN_FLIGHT_BOUND
        });
    }
    let (status, _) = read_head(&mut BufReader::new(s));
    assert_eq!(status, 204);
    assert_eq!(h.runtime.sunk.lock().expect("lock").get("/sink/big"), Some(&(BIG, true)));
}

#[test]
fn a_read_that_fails_before_any_byte_is_a_json_error_and_after_the_head_a_cut_body() {
    let h = Harness::start("stream-cut");
    let id = sandbox(&h);
    let mut c = h.client();
    let (status, v) = c.call("GET", &format!("/api/sandboxes/{id}/files?path=/nope"), "");
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().expect("error").contains("/nope"), "{v}");
    // An empty file is a complete, empty answer.
    let r = c.raw("PUT", &format!("/api/sandboxes/{id}/files?path=/empty"), b"");
    assert_eq!(r.status, 204);
    let r = c.raw("GET", &format!("/api/sandboxes/{id}/files?path=/empty"), b"");
    assert_eq!((r.status, r.body.len()), (200, 0));

    *h.runtime.cut_reads_at.lock().expect("lock") = Some(3 << 20);
    let mut s = connect(&h);
    write!(s, "GET /api/sandboxes/{id}/files?path=/gen/{BIG} HTTP/1.1\r\nHost: x\r\nX-API-Key: {ADMIN_KEY}\r\n\r\n")
        .expect("request");
    let mut r = BufReader::new(s);
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
    let (total, ending) = read_chunked(&mut r, |_, _| {});
    assert_eq!(ending, Ending::Broken, "a cut body must not end with the zero-length chunk");
    assert!(total < BIG);
    // The server carries on.
    *h.runtime.cut_reads_at.lock().expect("lock") = None;
    let r = c.raw("GET", &format!("/api/sandboxes/{id}/files?path=/gen/1000"), b"");
    assert_eq!((r.status, r.body.len()), (200, 1000));
}

#[test]
fn uploads_need_a_length_within_the_limit_and_a_full_disk_says_so() {
    let h = Harness::start("stream-refusals");
    let id = sandbox(&h);
    let put = |headers: &str, body: &[u8]| {
        let mut s = connect(&h);
        write!(
            s,
            "PUT /api/sandboxes/{id}/files?path=/f HTTP/1.1\r\nHost: x\r\nX-API-Key: {ADMIN_KEY}\r\n{headers}\r\n"
        )
        .expect("head");
        let _ = s.write_all(body);
        let mut r = BufReader::new(s);
        let (status, headers) = read_head(&mut r);
        let len = headers.iter().find_map(|h| h.strip_prefix("content-length: ")?.parse().ok()).unwrap_or(0);
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).expect("body");
        (status, String::from_utf8_lossy(&body).to_string())
    };
    let (status, body) = put("Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n");
    assert_eq!(status, 411, "{body}");
    assert!(body.contains("Content-Length"), "{body}");
    let (status, body) = put(&format!("Content-Length: {}\r\n", appliance::runtime::MAX_FILE_SIZE + 1), b"");
    assert_eq!(status, 413, "{body}");
    // Longer than any route takes: refused before tiny_http sees it (it would try to allocate
    // the announced length to drain it, and the failed allocation would abort the appliance).
    let (status, body) = put("Content-Length: 1000000000000\r\n", b"abc");
    assert_eq!(status, 413, "{body}");
    let (status, _) = h.client().call("GET", "/api/healthz", "");
    assert_eq!(status, 200, "the appliance survived");

    *h.runtime.disk_left.lock().expect("lock") = Some(10);
    let (status, body) = put("Content-Length: 100\r\n", &[7u8; 100]);
    assert_eq!(status, 507, "{body}");
    assert!(body.contains("disk is full") && body.contains("No space left"), "{body}");
    *h.runtime.disk_left.lock().expect("lock") = None;
    let files = |h: &Harness| h.runtime.sandboxes.lock().expect("lock").get(&id).map(|s| s.files.len());
    assert_eq!(files(&h), Some(0), "nothing half-written");

    // A body that breaks off is a failed write, not a shorter file.
    let mut s = connect(&h);
    write!(
        s,
        "PUT /api/sandboxes/{id}/files?path=/short HTTP/1.1\r\nHost: x\r\nX-API-Key: {ADMIN_KEY}\r\n\
         Content-Length: 1000000\r\n\r\n"
    )
    .expect("head");
    s.write_all(&[1u8; 1000]).expect("part of the body");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("ended after 1000 of the 1000000 bytes"), "{text}");
    assert_eq!(files(&h), Some(0), "nothing half-written");
}

#[test]
fn downloads_and_uploads_need_http_1_1_chunks_only_for_downloads() {
    let h = Harness::start("stream-http10");
    let id = sandbox(&h);
    let mut s = connect(&h);
    write!(s, "GET /api/sandboxes/{id}/files?path=/gen/10 HTTP/1.0\r\nX-API-Key: {ADMIN_KEY}\r\n\r\n").expect("req");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.0 505") || text.starts_with("HTTP/1.1 505"), "{text}");
    assert!(text.contains("HTTP/1.1"), "{text}");
}

/// `cargo test -p appliance --test api_file_streams -- --ignored --nocapture`: a 1 GiB upload
/// and download through the API (front, tiny_http, the double), each timed.
#[test]
#[ignore = "benchmark"]
fn bench_one_gib_round_trip() {
    const SIZE: u64 = 1 << 30;
    let h = Harness::start("stream-bench");
    let id = sandbox(&h);
    let piece = vec![0x5au8; 1 << 20];
    let mut s = connect(&h);
    let started = Instant::now();
    write!(
        s,
        "PUT /api/sandboxes/{id}/files?path=/sink/bench HTTP/1.1\r\nHost: x\r\nX-API-Key: {ADMIN_KEY}\r\n\
         Content-Length: {SIZE}\r\n\r\n"
    )
    .expect("head");
    for _ in 0..SIZE / piece.len() as u64 {
        s.write_all(&piece).expect("body");
    }
    let mut r = BufReader::new(s);
    assert_eq!(read_head(&mut r).0, 204);
    let up = started.elapsed();
    let mut s = connect(&h);
    let started = Instant::now();
    write!(s, "GET /api/sandboxes/{id}/files?path=/zero/{SIZE} HTTP/1.1\r\nHost: x\r\nX-API-Key: {ADMIN_KEY}\r\n\r\n")
        .expect("request");
    let mut r = BufReader::with_capacity(1 << 20, s);
    assert_eq!(read_head(&mut r).0, 200);
    let (total, ending) = read_chunked(&mut r, |_, _| {});
    assert_eq!((total, ending), (SIZE, Ending::Complete));
    let down = started.elapsed();
    let mib = (SIZE >> 20) as f64;
    println!(
        "1 GiB upload {:.2}s ({:.0} MiB/s), download {:.2}s ({:.0} MiB/s), round trip {:.0} MiB/s",
        up.as_secs_f64(),
        mib / up.as_secs_f64(),
        down.as_secs_f64(),
        mib / down.as_secs_f64(),
        2.0 * mib / (up + down).as_secs_f64()
    );
}

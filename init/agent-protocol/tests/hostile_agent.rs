//! The client against a hand-written hostile agent: a guest that floods frames which never end
//! the reply, or stalls, must cost only its own call, quickly, and with bounded memory. The
//! double answers on one end of a `UnixStream::pair()` and counts the frames it manages to
//! write; a flood ends when the client shuts the connection down.

use agent_protocol::client::{MAX_DIR_ENTRIES, MAX_DIR_LIST_BYTES};
use agent_protocol::frame;
use agent_protocol::message::{Reply, Request};
use agent_protocol::{
    AgentClient, AgentError, ClientTimeouts, DirEntry, ExitStatus, OutputStream, RunExit, RunSpec, WriteSpec,
};
use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const REPLY: Duration = Duration::from_millis(500);
const FRAME: Duration = Duration::from_millis(500);
const FILE_START: Duration = Duration::from_millis(1500);
/// The file-start timeout less some timer slack.
const FILE_START_AT_THE_EARLIEST: Duration = Duration::from_millis(1450);
/// The reply timeout less some timer slack.
const REPLY_AT_THE_EARLIEST: Duration = Duration::from_millis(450);
/// A flood that outlives this has not been stopped by the client: the double gives up so a
/// broken client fails the test instead of hanging it.
const DOUBLE_GIVES_UP: Duration = Duration::from_secs(10);

/// What the double did after reading the request.
struct Done {
    request: Request,
    frames_written: u64,
    /// Whether the client shut the connection down (the double's writes failed), as opposed to
    /// the double giving up or finishing its script.
    cut_off: bool,
}

/// Starts a double that reads one request and then runs `script` on its end of the connection;
/// returns a client with short timeouts on the other end.
fn agent_double(
    script: impl FnOnce(&mut UnixStream, &Request) -> (u64, bool) + Send + 'static,
) -> (AgentClient<UnixStream>, JoinHandle<Done>) {
    let (client_end, mut agent_end) = UnixStream::pair().expect("socket pair");
    let handle = std::thread::spawn(move || {
        let frame = frame::read_frame(&mut agent_end, Some(Duration::from_secs(5)), Duration::from_secs(5))
            .expect("the client sends its request");
        let request = Request::decode(frame.kind, &frame.payload).expect("a valid request");
        agent_end.set_write_timeout(Some(Duration::from_secs(2))).expect("write timeout");
        let (frames_written, cut_off) = script(&mut agent_end, &request);
        Done { request, frames_written, cut_off }
    });
    let client = AgentClient::new(client_end, ClientTimeouts { reply: REPLY, frame: FRAME, file_start: FILE_START })
        .expect("client");
    (client, handle)
}

fn frame_of(reply: &Reply) -> Vec<u8> {
    reply.to_frame().expect("a reply fits a frame")
}

/// Writes `frame` until the client cuts the connection (or the double gives up); returns
/// (frames written, cut off).
fn flood(conn: &mut UnixStream, frame: &[u8]) -> (u64, bool) {
    let started = Instant::now();
    let mut written = 0;
    while started.elapsed() < DOUBLE_GIVES_UP {
        match conn.write_all(frame) {
            Ok(()) => written += 1,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return (written, false),
            Err(_) => return (written, true),
        }
    }
    (written, false)
}

/// Sends nothing until the client closes its end; returns (0, closed by the client).
fn stall(conn: &mut UnixStream) -> (u64, bool) {
    conn.set_read_timeout(Some(DOUBLE_GIVES_UP)).expect("read timeout");
    let mut byte = [0u8; 1];
    let closed = matches!(std::io::Read::read(conn, &mut byte), Ok(0));
    (0, closed)
}

fn entry(i: usize, name_len: usize) -> DirEntry {
    let name = format!("{i:0>name_len$}");
    DirEntry { path: format!("/d/{name}"), name, is_dir: false, size: 1 }
}

fn run_spec(timeout_ms: u64) -> RunSpec {
    RunSpec { timeout_ms, max_output: 1 << 20, ..RunSpec::shell("yes") }
}

#[test]
fn an_endless_listing_stops_at_the_entry_cap() {
    const PER_BATCH: usize = 1000;
    let batch = frame_of(&Reply::DirEntries { entries: (0..PER_BATCH).map(|i| entry(i, 8)).collect(), more: true });
    let (mut client, double) = agent_double(move |conn, _| flood(conn, &batch));
    let started = Instant::now();
    match client.list_dir("/d") {
        Err(AgentError::Protocol(m)) => assert!(m.contains("MAX_DIR_ENTRIES") && m.contains("100000"), "{m}"),
        other => panic!("expected the entry cap, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    let done = double.join().expect("double");
    assert!(matches!(done.request, Request::FileList { .. }));
    assert!(done.cut_off, "the client shut the connection down");
    // The client read just past the cap; what else was written sat in the socket buffer.
    let read_at_most = MAX_DIR_ENTRIES / PER_BATCH + 1;
    assert!(done.frames_written >= read_at_most as u64, "wrote {}", done.frames_written);
    assert!(done.frames_written < read_at_most as u64 + 64, "wrote {}", done.frames_written);
    // The connection is abandoned rather than read out of step.
    assert!(matches!(client.ping(), Err(AgentError::Protocol(m)) if m.contains("unusable")));
}

#[test]
fn a_flood_of_empty_batches_stops_at_the_entry_cap() {
    let empty = frame_of(&Reply::DirEntries { entries: Vec::new(), more: true });
    let (mut client, double) = agent_double(move |conn, _| flood(conn, &empty));
    match client.list_dir("/d") {
        Err(AgentError::Protocol(m)) => assert!(m.contains("MAX_DIR_ENTRIES"), "{m}"),
        // A slow machine may reach the reply deadline first; either way the call ends.
        Err(AgentError::Deadline(m)) => assert!(m.contains("file list"), "{m}"),
        other => panic!("expected the entry cap, got {other:?}"),
    }
    let done = double.join().expect("double");
    assert!(done.cut_off);
    // Each empty batch counted as an entry: the client read at most the cap's worth.
    assert!(done.frames_written < MAX_DIR_ENTRIES as u64 + 20_000, "wrote {}", done.frames_written);
}

#[test]
fn a_listing_with_huge_names_stops_at_the_byte_cap() {
    // 100 entries of ~8 KiB of name and path per frame: the byte cap comes long before the count.
    const PER_BATCH: usize = 100;
    const NAME: usize = 4000;
    let batch = frame_of(&Reply::DirEntries { entries: (0..PER_BATCH).map(|i| entry(i, NAME)).collect(), more: true });
    let (mut client, double) = agent_double(move |conn, _| flood(conn, &batch));
    match client.list_dir("/d") {
        Err(AgentError::Protocol(m)) => assert!(m.contains("MAX_DIR_LIST_BYTES"), "{m}"),
        other => panic!("expected the byte cap, got {other:?}"),
    }
    let done = double.join().expect("double");
    assert!(done.cut_off);
    let frame_text = PER_BATCH * (2 * NAME + 3);
    let read_at_most = (MAX_DIR_LIST_BYTES / frame_text + 1) as u64;
    assert!(done.frames_written < read_at_most + 8, "wrote {}", done.frames_written);
}

#[test]
fn endless_empty_output_ends_a_run_at_its_timeout_plus_the_reply_margin() {
    let empty = frame_of(&Reply::Output { stream: OutputStream::Stdout, data: Vec::new() });
    let (mut client, double) = agent_double(move |conn, _| flood(conn, &empty));
    let started = Instant::now();
    let mut handed = 0usize;
    let result = client.run_streaming(&run_spec(1000), |_, data| handed += data.len());
    let took = started.elapsed();
    match result {
        Err(AgentError::Deadline(m)) => assert!(m.contains("run") && m.contains("1.5 s deadline"), "{m}"),
        other => panic!("expected the run's deadline, got {other:?}"),
    }
    assert!(took >= Duration::from_millis(1400), "ended early: {took:?}");
    assert!(took < Duration::from_secs(3), "ended late: {took:?}");
    assert_eq!(handed, 0);
    let done = double.join().expect("double");
    assert!(matches!(done.request, Request::Run(ref spec) if spec.timeout_ms == 1000));
    assert!(done.cut_off, "the client shut the connection down");
    assert!(done.frames_written > 100, "the double flooded ({} frames)", done.frames_written);
}

#[test]
fn output_beyond_what_was_asked_for_ends_a_run_at_once() {
    let chunk = frame_of(&Reply::Output { stream: OutputStream::Stderr, data: vec![b'x'; 64 << 10] });
    let (mut client, double) = agent_double(move |conn, _| flood(conn, &chunk));
    let spec = run_spec(60_000);
    match client.run(&spec) {
        Err(AgentError::Protocol(m)) => assert!(m.contains("more than the 1048576 bytes"), "{m}"),
        other => panic!("expected the output cap, got {other:?}"),
    }
    let done = double.join().expect("double");
    assert!(done.cut_off);
    // 16 frames make the cap; a few more fit in the socket buffer.
    assert!(done.frames_written < 16 + 16, "wrote {}", done.frames_written);
}

#[test]
fn a_silent_agent_fails_a_quick_request_at_the_reply_timeout() {
    let (mut client, double) = agent_double(|conn, _| stall(conn));
    let started = Instant::now();
    match client.stat("/x") {
        Err(AgentError::Io(e)) => {
            assert_eq!(e.kind(), ErrorKind::TimedOut);
            assert!(e.to_string().contains("did not reply to the stat"), "{e}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(took >= REPLY_AT_THE_EARLIEST && took < REPLY * 3, "took {took:?}");
    assert!(double.join().expect("double").cut_off, "the client closed the connection");
}

#[test]
fn a_silent_agent_fails_a_file_read_at_the_file_start_timeout() {
    let (mut client, double) = agent_double(|conn, _| stall(conn));
    let started = Instant::now();
    match client.read_file("/x", 0) {
        Err(AgentError::Io(e)) => {
            assert_eq!(e.kind(), ErrorKind::TimedOut);
            assert!(e.to_string().contains("did not reply to the file read within 1.5 s"), "{e}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(took >= FILE_START_AT_THE_EARLIEST && took < FILE_START * 2, "took {took:?}");
    assert!(double.join().expect("double").cut_off, "the client closed the connection");
}

#[test]
fn endless_empty_data_ends_a_file_read_at_its_deadline() {
    let empty = frame_of(&Reply::Data(Vec::new()));
    let (mut client, double) = agent_double(move |conn, _| flood(conn, &empty));
    let started = Instant::now();
    match client.read_file("/big", 256 << 20) {
        Err(AgentError::Deadline(m)) => assert!(m.contains("file read") && m.contains("0 bytes of data"), "{m}"),
        other => panic!("expected the read's deadline, got {other:?}"),
    }
    let took = started.elapsed();
    // Empty frames earn no time: the deadline stays at the reply timeout.
    assert!(took >= REPLY_AT_THE_EARLIEST && took < REPLY * 4, "took {took:?}");
    let done = double.join().expect("double");
    assert!(matches!(done.request, Request::FileRead { limit, .. } if limit == 256 << 20));
    assert!(done.cut_off);
}

#[test]
fn an_agent_that_stops_taking_write_data_fails_the_write_by_its_deadline() {
    // Accepts the write, then never reads the data, so the client's sends block; the double
    // waits (without reading) until the test is done with the client.
    let (client_done, wait_for_client) = std::sync::mpsc::channel::<()>();
    let (mut client, double) = agent_double(move |conn, _| {
        conn.write_all(&frame_of(&Reply::Ok)).expect("ok");
        let _ = wait_for_client.recv_timeout(DOUBLE_GIVES_UP);
        // The client shut the connection down: writing to it fails.
        let cut_off = conn.write_all(&frame_of(&Reply::Written { size: 0 })).is_err();
        (1, cut_off)
    });
    let data = vec![7u8; 8 << 20];
    let started = Instant::now();
    let result = client.write_file(&WriteSpec::new("/f"), &data);
    let took = started.elapsed();
    client_done.send(()).expect("double waits");
    match result {
        Err(AgentError::Deadline(m)) => assert!(m.contains("file write"), "{m}"),
        other => panic!("expected the write's deadline, got {other:?}"),
    }
    // The reply timeout plus the little the chunks the socket took earned.
    assert!(took >= REPLY_AT_THE_EARLIEST && took < Duration::from_secs(3), "took {took:?}");
    assert!(double.join().expect("double").cut_off);
}

#[test]
fn well_behaved_replies_still_work() {
    // A listing in three batches.
    let (mut client, double) = agent_double(|conn, _| {
        let mut n = 0;
        for (batch, more) in [(0..3, true), (3..5, true), (5..6, false)] {
            conn.write_all(&frame_of(&Reply::DirEntries { entries: batch.map(|i| entry(i, 3)).collect(), more }))
                .expect("write");
            n += 1;
        }
        (n, false)
    });
    let entries = client.list_dir("/d").expect("listing");
    assert_eq!(entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["000", "001", "002", "003", "004", "005"]);
    assert_eq!(double.join().expect("double").frames_written, 3);

    // A file in chunks, announced size matching.
    let (mut client, double) = agent_double(|conn, _| {
        for chunk in [&b"hello "[..], b"world"] {
            conn.write_all(&frame_of(&Reply::Data(chunk.to_vec()))).expect("write");
        }
        conn.write_all(&frame_of(&Reply::DataEnd { size: 11 })).expect("write");
        (3, false)
    });
    assert_eq!(client.read_file("/f", 0).expect("read"), b"hello world");
    double.join().expect("double");

    // A file whose first chunk comes later than a reply would (a guest disk still writing
    // back), but within the file-start timeout.
    let (mut client, double) = agent_double(|conn, _| {
        std::thread::sleep(REPLY * 2);
        conn.write_all(&frame_of(&Reply::Data(b"late".to_vec()))).expect("write");
        conn.write_all(&frame_of(&Reply::DataEnd { size: 4 })).expect("write");
        (2, false)
    });
    assert_eq!(client.read_file("/late", 0).expect("read"), b"late");
    double.join().expect("double");

    // A run with output on both streams that takes longer than the reply timeout but not
    // longer than its own timeout plus the margin; then a ping on the same connection.
    let (mut client, double) = agent_double(|conn, _| {
        conn.write_all(&frame_of(&Reply::Output { stream: OutputStream::Stdout, data: b"out".to_vec() }))
            .expect("write");
        std::thread::sleep(REPLY + Duration::from_millis(200));
        conn.write_all(&frame_of(&Reply::Output { stream: OutputStream::Stderr, data: b"err".to_vec() }))
            .expect("write");
        let exit = RunExit {
            status: ExitStatus::Code(3),
            timed_out: false,
            stdout_truncated: false,
            stderr_truncated: false,
            duration_ms: 700,
        };
        conn.write_all(&frame_of(&Reply::Exited(exit))).expect("write");
        let next = frame::read_frame(conn, Some(Duration::from_secs(5)), Duration::from_secs(5)).expect("next request");
        assert_eq!(Request::decode(next.kind, &next.payload).expect("request"), Request::Ping);
        conn.write_all(&frame_of(&Reply::Pong { protocol: 1, agent_version: "test".into() })).expect("write");
        (4, false)
    });
    let out = client.run(&run_spec(2000)).expect("run");
    assert_eq!((out.stdout.as_slice(), out.stderr.as_slice()), (&b"out"[..], &b"err"[..]));
    assert_eq!(out.exit.status, ExitStatus::Code(3));
    assert_eq!(client.ping().expect("pong").agent_version, "test");
    assert_eq!(double.join().expect("double").frames_written, 4);
}

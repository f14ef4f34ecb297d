//! Framing robustness, both directions: garbage, oversized, truncated, stalled and malformed
//! frames get an error frame (or a clean error on the client), never a crash or a hang.

mod agent_common;

use agent_common::TestAgent;
use agent_protocol::frame::{self, FrameError, HEADER_LEN, MAX_PAYLOAD};
use agent_protocol::message::{Reply, Request};
use agent_protocol::{AgentClient, AgentError, ClientTimeouts, Command, EnvVars, ErrorCode, RunSpec, WriteSpec};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(5);

fn read_reply(stream: &mut UnixStream) -> Reply {
    let frame = frame::read_frame(stream, Some(WAIT), WAIT).expect("a reply frame");
    Reply::decode(frame.kind, &frame.payload).expect("a valid reply")
}

fn expect_error(stream: &mut UnixStream, code: ErrorCode) -> String {
    match read_reply(stream) {
        Reply::Error { code: got, message } => {
            assert_eq!(got, code, "message: {message}");
            message
        }
        other => panic!("expected an error {code:?}, got {other:?}"),
    }
}

/// The agent closed its side: the next read sees EOF (or a reset), promptly.
fn expect_closed(stream: &mut UnixStream) {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected the connection closed, got {n} more bytes"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

fn header(version: u8, kind: u8, len: u32) -> Vec<u8> {
    let mut h = b"OC".to_vec();
    h.push(version);
    h.push(kind);
    h.extend_from_slice(&len.to_be_bytes());
    h
}

fn ping_works(agent: &TestAgent) {
    let info = agent.client().ping().expect("agent still answers");
    assert_eq!(info.protocol, frame::VERSION);
}

#[test]
fn garbage_gets_a_bad_frame_error_and_the_connection_closes() {
    let agent = TestAgent::start();
    let mut s = agent.raw();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let message = expect_error(&mut s, ErrorCode::BadFrame);
    assert!(message.contains("magic"), "{message}");
    expect_closed(&mut s);
    ping_works(&agent);
}

#[test]
fn an_oversized_frame_is_refused_without_reading_its_payload() {
    let agent = TestAgent::start();
    let mut s = agent.raw();
    let started = Instant::now();
    s.write_all(&header(frame::VERSION, 0x01, MAX_PAYLOAD as u32 + 1)).unwrap();
    let message = expect_error(&mut s, ErrorCode::FrameTooLarge);
    assert!(message.contains(&(MAX_PAYLOAD + 1).to_string()), "{message}");
    assert!(started.elapsed() < Duration::from_secs(2), "the agent waited for the payload");
    expect_closed(&mut s);

    let mut s = agent.raw();
    s.write_all(&header(frame::VERSION, 0x01, u32::MAX)).unwrap();
    expect_error(&mut s, ErrorCode::FrameTooLarge);
    ping_works(&agent);
}

#[test]
fn another_protocol_version_is_refused() {
    let agent = TestAgent::start();
    let mut s = agent.raw();
    s.write_all(&header(frame::VERSION + 1, 0x01, 0)).unwrap();
    let message = expect_error(&mut s, ErrorCode::UnsupportedVersion);
    assert!(message.contains("version 2"), "{message}");
    expect_closed(&mut s);
}

#[test]
fn a_truncated_frame_then_half_close_gets_an_error() {
    let agent = TestAgent::start();
    let mut s = agent.raw();
    let bytes = Request::Mkdir { path: "/tmp/somewhere".into() }.to_frame().unwrap();
    s.write_all(&bytes[..bytes.len() - 3]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let message = expect_error(&mut s, ErrorCode::BadFrame);
    assert!(message.contains("closed inside a frame"), "{message}");
    expect_closed(&mut s);
    // Also a header cut short.
    let mut s = agent.raw();
    s.write_all(b"OC\x01").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    expect_error(&mut s, ErrorCode::BadFrame);
}

#[test]
fn a_stalled_frame_times_out_instead_of_hanging() {
    let agent = TestAgent::start_with(|c| c.frame_timeout = Duration::from_millis(300));
    let mut s = agent.raw();
    let mut bytes = header(frame::VERSION, 0x0C, 100);
    bytes.extend_from_slice(&[0; 10]);
    let started = Instant::now();
    s.write_all(&bytes).unwrap();
    let message = expect_error(&mut s, ErrorCode::Timeout);
    assert!(message.contains("18 of 108"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(3));
    expect_closed(&mut s);
}

#[test]
fn malformed_payloads_get_errors_and_the_connection_carries_on() {
    let agent = TestAgent::start();
    let mut s = agent.raw();
    // Unknown kind.
    s.write_all(&header(frame::VERSION, 0x7F, 0)).unwrap();
    let message = expect_error(&mut s, ErrorCode::BadRequest);
    assert!(message.contains("unknown request kind"), "{message}");
    // A reply kind sent as a request.
    s.write_all(&header(frame::VERSION, 0x80, 0)).unwrap();
    expect_error(&mut s, ErrorCode::BadRequest);
    // A run request whose command tag is invalid.
    let mut bad = header(frame::VERSION, 0x02, 3);
    bad.extend_from_slice(&[9, 9, 9]);
    s.write_all(&bad).unwrap();
    expect_error(&mut s, ErrorCode::BadRequest);
    // A valid request with trailing bytes.
    let mut trailing = Request::FileStat { path: "/".into() }.to_frame().unwrap();
    trailing.push(0);
    let len = (trailing.len() - HEADER_LEN) as u32;
    trailing[4..8].copy_from_slice(&len.to_be_bytes());
    s.write_all(&trailing).unwrap();
    let message = expect_error(&mut s, ErrorCode::BadRequest);
    assert!(message.contains("trailing"), "{message}");
    // Frames that only make sense inside an operation.
    s.write_all(&Request::Data(vec![1, 2, 3]).to_frame().unwrap()).unwrap();
    expect_error(&mut s, ErrorCode::BadRequest);
    s.write_all(&Request::StdinClose.to_frame().unwrap()).unwrap();
    expect_error(&mut s, ErrorCode::BadRequest);
    // A hostname the kernel would take but no sandbox should have (refused before any call).
    for name in ["", "two words", "../x", &"a".repeat(65)] {
        s.write_all(&Request::SetHostname { name: name.to_string() }.to_frame().unwrap()).unwrap();
        let message = expect_error(&mut s, ErrorCode::BadRequest);
        assert!(message.contains("not a valid hostname"), "{name:?}: {message}");
    }
    // Still in step.
    s.write_all(&Request::Ping.to_frame().unwrap()).unwrap();
    assert!(matches!(read_reply(&mut s), Reply::Pong { .. }));
}

#[test]
fn a_frame_of_exactly_the_maximum_size_is_accepted() {
    let agent = TestAgent::start();
    let mut s = agent.raw();
    s.write_all(&Request::FileWrite(WriteSpec::new("max.bin")).to_frame().unwrap()).unwrap();
    assert_eq!(read_reply(&mut s), Reply::Ok);
    // Data payload = 4-byte length + bytes.
    let data = vec![0xAB; MAX_PAYLOAD - 4];
    let bytes = Request::Data(data.clone()).to_frame().unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + MAX_PAYLOAD);
    s.write_all(&bytes).unwrap();
    s.write_all(&Request::DataEnd.to_frame().unwrap()).unwrap();
    assert_eq!(read_reply(&mut s), Reply::Written { size: data.len() as u64 });
    assert_eq!(std::fs::read(agent.home.join("max.bin")).unwrap(), data);
}

#[test]
fn the_client_refuses_to_send_an_oversized_request_and_stays_usable() {
    let agent = TestAgent::start();
    let mut client = agent.client();
    let spec = RunSpec {
        command: Command::Shell("x".repeat(MAX_PAYLOAD + 1)),
        env: EnvVars::default(),
        cwd: None,
        timeout_ms: 1000,
        max_output: 1000,
        user: None,
    };
    match client.run(&spec) {
        Err(AgentError::InvalidRequest(m)) => assert!(m.contains("exceeds the limit"), "{m}"),
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    client.ping().unwrap();
}

#[test]
fn random_garbage_never_wedges_the_agent() {
    let agent = TestAgent::start_with(|c| c.frame_timeout = Duration::from_millis(200));
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        seed ^= seed << 7;
        seed ^= seed >> 9;
        seed
    };
    for round in 0..200 {
        let mut s = agent.raw();
        let len = (next() % 64) as usize;
        let mut blob: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Half the blobs start with a valid magic and version, to get past the first checks.
        if round % 2 == 0 {
            let mut framed = vec![b'O', b'C', frame::VERSION];
            framed.append(&mut blob);
            blob = framed;
            // Keep the odd blob that decodes cleanly away from commands and file changes.
            if let Some(kind) = blob.get_mut(3) {
                if matches!(*kind, 0x02 | 0x03 | 0x09 | 0x0C | 0x0D | 0x0E | 0x0F) {
                    *kind = 0x7E;
                }
            }
        }
        let _ = s.write_all(&blob);
        let _ = s.shutdown(Shutdown::Write);
        // Whatever happens, the agent answers within the timeouts and then closes.
        s.set_read_timeout(Some(WAIT)).unwrap();
        let started = Instant::now();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        assert!(started.elapsed() < Duration::from_secs(3), "round {round} took {:?}", started.elapsed());
    }
    ping_works(&agent);
}

/// A stand-in agent for the client tests: accepts one connection, reads one request frame and
/// answers with `reply_bytes` (raw), then holds or closes the connection.
fn fake_agent(reply_bytes: Vec<u8>, close_after: bool) -> (std::path::PathBuf, std::thread::JoinHandle<()>) {
    let dir = std::env::temp_dir().join(format!("oc-fake-agent-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = frame::read_frame(&mut s, Some(WAIT), WAIT);
        let _ = s.write_all(&reply_bytes);
        if close_after {
            drop(s);
        } else {
            std::thread::sleep(Duration::from_secs(3));
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
    (path, handle)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

fn client_for(path: &std::path::Path) -> AgentClient<UnixStream> {
    let timeouts = ClientTimeouts {
        reply: Duration::from_millis(500),
        frame: Duration::from_millis(500),
        file_start: Duration::from_millis(500),
    };
    AgentClient::new(UnixStream::connect(path).unwrap(), timeouts).unwrap()
}

#[test]
fn the_client_rejects_garbage_replies() {
    let (path, h) = fake_agent(b"HTTP/1.1 200 OK\r\n\r\n".to_vec(), true);
    let mut client = client_for(&path);
    match client.ping() {
        Err(AgentError::Protocol(m)) => assert!(m.contains("magic"), "{m}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    // The connection is abandoned: later calls fail at once instead of reading stale bytes.
    assert!(matches!(client.ping(), Err(AgentError::Protocol(m)) if m.contains("unusable")));
    h.join().unwrap();
}

#[test]
fn the_client_rejects_an_oversized_reply_header() {
    let (path, h) = fake_agent(header(frame::VERSION, 0x82, u32::MAX), false);
    let mut client = client_for(&path);
    let started = Instant::now();
    assert!(matches!(client.ping(), Err(AgentError::Protocol(m)) if m.contains("exceeds the limit")));
    assert!(started.elapsed() < Duration::from_secs(2));
    h.join().unwrap();
}

#[test]
fn the_client_reports_a_truncated_or_stalled_reply_without_hanging() {
    let full = Reply::Pong { protocol: 1, agent_version: "x".repeat(50) }.to_frame().unwrap();
    let (path, h) = fake_agent(full[..20].to_vec(), true);
    assert!(matches!(client_for(&path).ping(), Err(AgentError::Protocol(m)) if m.contains("closed inside a frame")));
    h.join().unwrap();

    let (path, h) = fake_agent(full[..20].to_vec(), false);
    let started = Instant::now();
    assert!(matches!(client_for(&path).ping(), Err(AgentError::Protocol(m)) if m.contains("frame timeout")));
    assert!(started.elapsed() < Duration::from_secs(2));
    h.join().unwrap();

    // No reply at all: a timeout, not a hang.
    let (path, h) = fake_agent(Vec::new(), false);
    let started = Instant::now();
    match client_for(&path).ping() {
        Err(AgentError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    h.join().unwrap();
}

#[test]
fn the_client_rejects_a_reply_that_does_not_fit_the_request() {
    let (path, h) = fake_agent(Reply::Written { size: 1 }.to_frame().unwrap(), true);
    assert!(matches!(client_for(&path).ping(), Err(AgentError::Protocol(m)) if m.contains("unexpected reply")));
    h.join().unwrap();

    let mut bad_payload = header(frame::VERSION, 0x82, 2);
    bad_payload.extend_from_slice(&[1, 0]);
    let (path, h) = fake_agent(bad_payload, true);
    assert!(matches!(client_for(&path).ping(), Err(AgentError::Protocol(m)) if m.contains("malformed reply")));
    h.join().unwrap();
}

#[test]
fn frame_errors_name_their_cause() {
    // The client maps these; make sure the texts it relies on stay meaningful.
    assert!(FrameError::TooLarge(5).to_string().contains("exceeds the limit"));
    assert!(FrameError::Truncated { got: 1, want: 2 }.to_string().contains("closed inside a frame"));
    assert!(FrameError::Stalled { got: 1, want: 2 }.to_string().contains("frame timeout"));
}

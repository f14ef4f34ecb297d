//! The egress forwarder: bytes go through unchanged in both directions, half-closes are passed
//! on, and an unreachable upstream closes the client's connection instead of hanging it. The
//! upstream is a local TCP listener standing in for the host's vsock proxy port.

mod agent_common;

use agent_common::pattern;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Starts the forwarder on an ephemeral loopback port, forwarding to `upstream`.
fn forwarder_to(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || init::sandbox::egress_serve(listener, move || TcpStream::connect(upstream)));
    addr
}

#[test]
fn bytes_pass_through_unchanged_in_both_directions() {
    // Upstream: reads everything until the client's half-close, then answers with a digest
    // line followed by the reversed bytes.
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        let sum: u64 = got.iter().map(|&b| u64::from(b)).sum();
        s.write_all(format!("{} {}\n", got.len(), sum).as_bytes()).unwrap();
        got.reverse();
        s.write_all(&got).unwrap();
    });
    let addr = forwarder_to(upstream_addr);

    let data = pattern(1 << 20);
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let writer_data = data.clone();
    let mut writer = client.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        writer.write_all(&writer_data).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).unwrap();
    w.join().unwrap();

    let newline = reply.iter().position(|&b| b == b'\n').unwrap();
    let sum: u64 = data.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(std::str::from_utf8(&reply[..newline]).unwrap(), format!("{} {}", data.len(), sum));
    let mut reversed = data;
    reversed.reverse();
    assert!(reply[newline + 1..] == reversed[..], "returned bytes differ");
}

#[test]
fn an_upstream_that_closes_first_closes_the_client() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        s.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n").unwrap();
        // Dropping closes both directions while the client still has its side open.
    });
    let addr = forwarder_to(upstream_addr);
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).unwrap();
    assert!(reply.starts_with(b"HTTP/1.1 403"));
}

#[test]
fn an_unreachable_upstream_closes_the_client_promptly() {
    // A port that was just free: nothing listens there.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let addr = forwarder_to(dead);
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 8];
    let n = client.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn many_connections_are_forwarded_concurrently() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in upstream.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf).unwrap();
                s.write_all(&buf[..n]).unwrap();
            });
        }
    });
    let addr = forwarder_to(upstream_addr);
    let clients: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let msg = format!("connection {i}");
                c.write_all(msg.as_bytes()).unwrap();
                let mut back = vec![0u8; msg.len()];
                c.read_exact(&mut back).unwrap();
                assert_eq!(back, msg.as_bytes());
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
}

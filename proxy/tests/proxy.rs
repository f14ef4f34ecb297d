//! Host integration tests of the sealing proxy against a loopback echo upstream.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use proxy::{SealRegistry, VsockListener, VsockStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const S1: u32 = 3;
const S2: u32 = 4;

/// Sandbox S1: api.test + other.test allowed; token(1) -> "sk-live-alpha" for api.test only.
/// Sandbox S2: token(2) -> "sk-live-beta" for api.test. Every pattern names the
/// upstream's port (without one, only 443 or 80 would be allowed).
async fn setup(upstream: &Upstream, tweak: impl FnOnce(&mut proxy::ProxyConfig)) -> Harness {
    let reg = Arc::new(SealRegistry::new());
    let p = |host: &str| format!("{host}:{}", upstream.port);
    let (api, other, others) = (p("api.test"), p("*.other.test"), p("other.test"));
    register(&reg, S1, &[&api, &other, &others], vec![(token(1), secret("sk-live-alpha", &[&api]))]);
    register(&reg, S2, &[&api], vec![(token(2), secret("sk-live-beta", &[&api]))]);
    let mut cfg = base_config(upstream);
    tweak(&mut cfg);
    start_proxy(cfg, reg, &[S1, S2]).await
}

const SECRETS: [&str; 2] = ["sk-live-alpha", "sk-live-beta"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_body_substitution() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let t = token(1);
    let body = format!("{{\"key\":\"{t}\",\"again\":\"{t}\"}}");
    let req = format!(
        "POST /v1/chat?k={t} HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {t}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let resp = roundtrip(&mut c, req.as_bytes()).await;
    assert_eq!(resp.status, 200);
    let got = up.next().await;
    assert_eq!(got.request_line(), "POST /v1/chat?k=sk-live-alpha HTTP/1.1");
    assert_eq!(got.header("authorization").as_deref(), Some("Bearer sk-live-alpha"));
    let expected_body = "{\"key\":\"sk-live-alpha\",\"again\":\"sk-live-alpha\"}";
    assert_eq!(String::from_utf8(got.body.clone()).unwrap(), expected_body);
    assert_eq!(got.header("content-length"), Some(expected_body.len().to_string()));
    assert!(!got.chunked);
    assert!(!got.head.contains(&t));
    assert_not_logged(&SECRETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_split_at_every_byte_offset_across_writes() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let t = token(1);
    // Token in a header, and in a chunked body across a chunk boundary.
    let (a, b) = t.split_at(20);
    let req = format!(
        "POST /split HTTP/1.1\r\nHost: api.test\r\nX-Key: {t}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\nv={a}\r\n{:x}\r\n{b};\r\n0\r\n\r\n",
        a.len() + 2,
        b.len() + 1
    );
    let req = req.as_bytes();
    // One keep-alive connection for every split point.
    for k in 0..=req.len() {
        c.get_mut().write_all(&req[..k]).await.unwrap();
        c.get_mut().flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
        let resp = roundtrip(&mut c, &req[k..]).await;
        assert_eq!(resp.status, 200, "split at {k}");
        let got = up.next().await;
        assert_eq!(got.header("x-key").as_deref(), Some("sk-live-alpha"), "split at {k}");
        assert_eq!(got.body, b"v=sk-live-alpha;", "split at {k}");
    }
    // Also a Content-Length body large enough to be streamed, split inside the token.
    let big_prefix = "x".repeat(1024 * 1024 + 10);
    let body = format!("{big_prefix}{t}");
    let head = format!("PUT /big HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\r\n", body.len());
    let mut whole = head.into_bytes();
    whole.extend_from_slice(body.as_bytes());
    for cut in [whole.len() - 43, whole.len() - 30, whole.len() - 1] {
        c.get_mut().write_all(&whole[..cut]).await.unwrap();
        c.get_mut().flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let resp = roundtrip(&mut c, &whole[cut..]).await;
        assert_eq!(resp.status, 200);
        let got = up.next().await;
        assert!(got.chunked, "a large Content-Length body is re-chunked");
        assert_eq!(got.body.len(), big_prefix.len() + "sk-live-alpha".len());
        assert!(got.body.ends_with(b"xsk-live-alpha"));
    }
    assert_not_logged(&SECRETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_content_length_and_compressed_bodies() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let t = token(1);

    // Chunked in, chunked out, trailers kept.
    let req = format!(
        "POST /c HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{t}\r\n0\r\nX-Trailer: {t}\r\n\r\n",
        t.len()
    );
    assert_eq!(roundtrip(&mut c, req.as_bytes()).await.status, 200);
    let got = up.next().await;
    assert!(got.chunked);
    assert_eq!(got.body, b"sk-live-alpha");

    // Large Content-Length body (3 MiB) with a token every 64 KiB: streamed, re-chunked.
    let mut body = Vec::new();
    let mut n_tokens = 0;
    while body.len() < 3 * 1024 * 1024 {
        body.extend_from_slice(&vec![b'.'; 64 * 1024 - 43]);
        body.extend_from_slice(t.as_bytes());
        n_tokens += 1;
    }
    let mut req =
        format!("POST /big HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    req.extend_from_slice(&body);
    assert_eq!(roundtrip(&mut c, &req).await.status, 200);
    let got = up.next().await;
    assert!(got.chunked && got.header("content-length").is_none());
    let text = String::from_utf8(got.body).unwrap();
    assert_eq!(text.matches("sk-live-alpha").count(), n_tokens);
    assert!(!text.contains(&t));

    // gzip body with Content-Length: decoded, rewritten, re-compressed, length fixed.
    let plain = format!("{{\"api_key\":\"{t}\",\"pad\":\"{}\"}}", "z".repeat(5000));
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(plain.as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    let mut req = format!(
        "POST /gz HTTP/1.1\r\nHost: api.test\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        gz.len()
    )
    .into_bytes();
    req.extend_from_slice(&gz);
    assert_eq!(roundtrip(&mut c, &req).await.status, 200);
    let got = up.next().await;
    assert_eq!(got.header("content-length"), Some(got.body.len().to_string()));
    let mut decoded = String::new();
    flate2::read::GzDecoder::new(&got.body[..]).read_to_string(&mut decoded).unwrap();
    assert_eq!(decoded, plain.replace(&t, "sk-live-alpha"));

    // A gzip body without any token is forwarded byte for byte.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(b"no tokens here").unwrap();
    let gz = enc.finish().unwrap();
    let mut req = format!(
        "POST /gz2 HTTP/1.1\r\nHost: api.test\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        gz.len()
    )
    .into_bytes();
    req.extend_from_slice(&gz);
    assert_eq!(roundtrip(&mut c, &req).await.status, 200);
    assert_eq!(up.next().await.body, gz);
    assert_not_logged(&SECRETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_requests_on_one_keep_alive_connection() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let t = token(1);
    let mut conns = Vec::new();
    for i in 0..6 {
        let req = if i % 2 == 0 {
            format!("GET /r{i}?t={t} HTTP/1.1\r\nHost: api.test\r\n\r\n")
        } else {
            format!("POST /r{i} HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\r\n{t}", t.len())
        };
        let resp = roundtrip(&mut c, req.as_bytes()).await;
        assert_eq!(resp.status, 200);
        assert!(resp.body_str().starts_with(&format!("{} /r{i}", if i % 2 == 0 { "GET" } else { "POST" })));
        let got = up.next().await;
        conns.push(got.conn);
        if i % 2 == 1 {
            assert_eq!(got.body, b"sk-live-alpha");
        } else {
            assert!(got.request_line().contains("t=sk-live-alpha"));
        }
    }
    assert!(conns.iter().all(|c| *c == conns[0]), "all requests used one upstream connection: {conns:?}");
    // A body announced with Expect: 100-continue is streamed (head sent at once).
    let req =
        format!("PUT /e HTTP/1.1\r\nHost: api.test\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{t}", t.len());
    assert_eq!(roundtrip(&mut c, req.as_bytes()).await.status, 200);
    let got = up.next().await;
    assert!(got.chunked);
    assert_eq!(got.body, b"sk-live-alpha");
    // Unregistering the sandbox stops its open connection at the next request.
    assert!(h.registry.unregister(S1));
    let req = format!("GET /after HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {t}\r\n\r\n");
    c.get_mut().write_all(req.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await.expect("closed in time");
    assert!(up.try_next().is_none(), "nothing forwarded after unregister");
    assert_not_logged(&SECRETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sandboxs_token_is_forwarded_untouched() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let foreign = token(2); // minted for S2
    let req = format!("GET / HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {foreign}\r\n\r\n");
    assert_eq!(roundtrip(&mut c, req.as_bytes()).await.status, 200);
    let got = up.next().await;
    assert_eq!(got.header("authorization"), Some(format!("Bearer {foreign}")));
    assert!(!got.head.contains("sk-live-beta"));
    // The same token from its own sandbox is replaced.
    let mut c2 = connect_tls(&h, S2, "api.test", up.port).await.unwrap();
    assert_eq!(roundtrip(&mut c2, req.as_bytes()).await.status, 200);
    assert_eq!(up.next().await.header("authorization").as_deref(), Some("Bearer sk-live-beta"));
    assert_not_logged(&SECRETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_towards_host_its_secret_may_not_reach_is_untouched() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let t = token(1); // secret allowed for api.test only
    for host in ["other.test", "x.other.test"] {
        let mut c = connect_tls(&h, S1, host, up.port).await.unwrap();
        let body = format!("k={t}");
        let req = format!(
            "POST / HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {t}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let resp = roundtrip(&mut c, req.as_bytes()).await;
        assert_eq!(resp.status, 200);
        let got = up.next().await;
        assert_eq!(got.header("authorization"), Some(format!("Bearer {t}")));
        assert_eq!(got.body, body.as_bytes());
        assert!(!resp.body_str().contains("sk-live-alpha"));
    }
    assert!(up.try_next().is_none());
    assert_not_logged(&SECRETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_outside_allowlist_gets_403_naming_the_host() {
    let up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let resp = connect_raw(h.listeners[&S1], &format!("blocked.test:{}", up.port)).await.err().unwrap();
    assert_eq!(resp.status, 403);
    assert!(resp.body_str().contains("blocked.test"), "{}", resp.body_str());
    // Plain HTTP too.
    let tcp = TcpStream::connect(h.listeners[&S1]).await.unwrap();
    let mut r = BufReader::new(tcp);
    r.get_mut().write_all(b"GET http://blocked.test/ HTTP/1.1\r\nHost: blocked.test\r\n\r\n").await.unwrap();
    let resp = read_response(&mut r).await.unwrap();
    assert_eq!(resp.status, 403);
    assert!(resp.body_str().contains("blocked.test"));
    // An unregistered sandbox (listener exists, no bindings) is refused outright.
    h.registry.unregister(S2);
    let resp = connect_raw(h.listeners[&S2], &format!("api.test:{}", up.port)).await.err().unwrap();
    assert_eq!(resp.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_destination_is_refused_without_explicit_allowance() {
    let mut up = start_upstream(true).await;
    // No allowance for 127.0.0.0/8 in this proxy.
    let h = setup(&up, |cfg| cfg.allowed_private.clear()).await;
    let t = token(1);
    let cases =
        [("api.test".to_string(), up.port), ("127.0.0.1".to_string(), up.port), ("169.254.169.254".to_string(), 443)];
    let allowed: Vec<String> = cases.iter().map(|(host, port)| format!("{host}:{port}")).collect();
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
    for (host, port) in cases {
        let reg = &h.registry;
        register(reg, S1, &allowed, vec![(token(1), secret("sk-live-alpha", &allowed))]);
        let mut c = connect_tls(&h, S1, &host, port).await.unwrap();
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {t}\r\n\r\n");
        let resp = roundtrip(&mut c, req.as_bytes()).await;
        assert_eq!(resp.status, 403, "{host}: {}", resp.body_str());
        let body = resp.body_str();
        assert!(body.contains("refused") && body.contains(&host), "{body}");
        assert!(body.contains("loopback") || body.contains("link-local"), "{body}");
    }
    assert!(up.try_next().is_none(), "nothing reached the upstream");
    assert_not_logged(&SECRETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_certificate_failure_is_502_saying_why() {
    let up = start_upstream(true).await;
    let other_ca = upstream_pki(&["unrelated.test"]).ca_pem;
    let h = setup(&up, |cfg| cfg.upstream_trust.operator_bundle_pem = Some(other_ca.into_bytes())).await;
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let t = token(1);
    let req = format!("GET / HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {t}\r\n\r\n");
    let resp = roundtrip(&mut c, req.as_bytes()).await;
    assert_eq!(resp.status, 502);
    let body = resp.body_str();
    assert!(body.contains("api.test") && body.contains("certificate"), "{body}");
    assert_not_logged(&SECRETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_tls_garbage_and_slow_clients_neither_crash_nor_leak() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |cfg| {
        cfg.timeouts.header = Duration::from_millis(400);
        cfg.limits.max_header_bytes = 4096;
    })
    .await;
    let addr = h.listeners[&S1];
    let t = token(1);
    let mut answers = Vec::new();

    // Garbage instead of a proxy request.
    for garbage in [
        &b"\x16\x03\x01\x02\x00garbage\r\n\r\n"[..],
        b"GET  / HTTP/1.1\r\n\r\n",
        b"HELLO\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ] {
        let mut r = BufReader::new(TcpStream::connect(addr).await.unwrap());
        r.get_mut().write_all(garbage).await.unwrap();
        let resp = read_response(&mut r).await.unwrap();
        assert_eq!(resp.status, 400);
        answers.push(resp.body_str());
    }
    // TLS garbage inside the tunnel: the proxy just drops the connection.
    let mut raw = connect_raw(addr, &format!("api.test:{}", up.port)).await.unwrap();
    raw.get_mut().write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8]).await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await.expect("closed in time");

    // Malformed requests inside TLS: 400 on the first request, then closed.
    let bad_requests = [
        format!("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nX: {t}\r\n\r\n"),
        format!("GET / HTTP/1.1\r\nBad Header {t}\r\n\r\n"),
        format!("GET /{t} HTTP/1.1\nHost: a\r\n\r\n"),
    ];
    for bad in &bad_requests {
        let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
        let resp = roundtrip(&mut c, bad.as_bytes()).await;
        assert_eq!(resp.status, 400);
        answers.push(resp.body_str());
    }
    // A bad chunk after a good start: the connection is closed, nothing half-sent
    // reaches the upstream as a complete request.
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let req = format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{}\r\nZZ\r\n", &t[..5]);
    c.get_mut().write_all(req.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await.expect("closed in time");

    // Oversized head.
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(8000));
    let resp = roundtrip(&mut c, huge.as_bytes()).await;
    assert_eq!(resp.status, 431);

    // Slow client: a head trickling in slower than the header timeout.
    let start = Instant::now();
    let mut r = BufReader::new(TcpStream::connect(addr).await.unwrap());
    let slow = format!("CONNECT api.test:{} HTTP/1.1\r\nX-Slow: ", up.port);
    for b in slow.bytes() {
        if r.get_mut().write_all(&[b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let resp = read_response(&mut r).await.unwrap();
    assert_eq!(resp.status, 408);
    assert!(start.elapsed() < Duration::from_secs(5));
    // A client that opens a tunnel and never speaks TLS is dropped after the timeout.
    let mut idle = connect_raw(addr, &format!("api.test:{}", up.port)).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut buf)).await.expect("dropped in time");
    assert_eq!(n.unwrap_or(0), 0);

    // The proxy still works, and nothing leaked anywhere.
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let req = format!("GET / HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {t}\r\n\r\n");
    assert_eq!(roundtrip(&mut c, req.as_bytes()).await.status, 200);
    let mut seen = Vec::new();
    while let Some(r) = up.try_next() {
        seen.push(r);
    }
    assert_eq!(seen.len(), 1, "only the good request reached the upstream: {seen:?}");
    for a in &answers {
        for s in SECRETS {
            assert!(!a.contains(s), "secret in an error answer: {a}");
        }
    }
    assert_not_logged(&SECRETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_forwarded_but_never_substituted() {
    let mut plain = start_upstream(false).await;
    let h = setup(&plain, |_| {}).await;
    let t = token(1);
    let mut r = BufReader::new(TcpStream::connect(h.listeners[&S1]).await.unwrap());
    let req = format!(
        "GET http://api.test:{}/p?x={t} HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {t}\r\nProxy-Authorization: x\r\n\r\n",
        plain.port
    );
    r.get_mut().write_all(req.as_bytes()).await.unwrap();
    let resp = read_response(&mut r).await.unwrap();
    assert_eq!(resp.status, 200);
    let got = plain.next().await;
    assert_eq!(got.request_line(), format!("GET /p?x={t} HTTP/1.1"));
    assert_eq!(got.header("authorization"), Some(format!("Bearer {t}")));
    assert!(got.header("proxy-authorization").is_none());
    assert_eq!(got.header("connection").as_deref(), Some("close"));
    assert_not_logged(&SECRETS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_sandbox_are_limited() {
    let up = start_upstream(true).await;
    let h = setup(&up, |cfg| cfg.limits.max_connections_per_sandbox = 2).await;
    let a = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let b = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let third = connect_raw(h.listeners[&S1], &format!("api.test:{}", up.port)).await.err().unwrap();
    assert_eq!(third.status, 429);
    // Another sandbox is not affected.
    assert!(connect_tls(&h, S2, "api.test", up.port).await.is_ok());
    drop((a, b));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(connect_tls(&h, S1, "api.test", up.port).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsock_listener_reports_peer_cid_when_loopback_transport_exists() {
    let listener = match VsockListener::bind_cid(libc::VMADDR_CID_ANY, libc::VMADDR_PORT_ANY) {
        Ok(l) => l,
        Err(e) => {
            // No vsock transport in this machine: the error is clean, not a panic.
            eprintln!("vsock unavailable here: {e}");
            assert!(e.raw_os_error().is_some());
            return;
        }
    };
    let port = listener.local_port().unwrap();
    let accept = tokio::spawn(async move { listener.accept().await });
    // The kernel bounds a vsock connect (2 s by default), so this must finish.
    let connect = tokio::time::timeout(Duration::from_secs(10), VsockStream::connect(libc::VMADDR_CID_LOCAL, port))
        .await
        .expect("vsock connect neither succeeded nor failed");
    match connect {
        Ok(mut client) => {
            let (mut server, cid) =
                tokio::time::timeout(Duration::from_secs(5), accept).await.unwrap().unwrap().unwrap();
            assert_eq!(cid, libc::VMADDR_CID_LOCAL);
            client.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
        }
        Err(e) => {
            // This machine has no vsock loopback transport (it is itself a guest).
            eprintln!("vsock loopback transport unavailable: {e}");
            assert!(e.raw_os_error().is_some(), "a clean OS error, got {e:?}");
            accept.abort();
        }
    }
}

// ---------- one destination per tunnel ----------

/// The upstream never saw a connection, let alone a request.
fn assert_upstream_untouched(up: &mut Upstream) {
    assert_eq!(up.accepted.load(std::sync::atomic::Ordering::SeqCst), 0, "an upstream connection was opened");
    assert!(up.try_next().is_none(), "a request reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_naming_another_host_gets_421_and_opens_no_upstream() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let t = token(1);
    let tunnel = format!("api.test:{}", up.port);
    let cases = [
        ("evil.example.com", "evil.example.com"),
        ("EVIL.Example.com.", "evil.example.com"),
        ("api.test.evil.example.com", "api.test.evil.example.com"),
        ("api.test:1", "api.test:1"),
    ];
    for (host, named) in cases {
        let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
        let req = format!("GET /v1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {t}\r\n\r\n");
        let resp = roundtrip(&mut c, req.as_bytes()).await;
        assert_eq!(resp.status, 421, "Host: {host}: {}", resp.body_str());
        assert!(resp.head.starts_with("HTTP/1.1 421 Misdirected Request\r\n"), "{}", resp.head);
        let body = resp.body_str();
        assert!(body.contains(&format!("this tunnel is to {tunnel}; the request names {named}")), "{body}");
    }
    // A Host that is itself a token is refused without being spelled out.
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let resp = roundtrip(&mut c, format!("GET / HTTP/1.1\r\nHost: {t}\r\n\r\n").as_bytes()).await;
    assert_eq!(resp.status, 421);
    assert!(!resp.body_str().contains(&t), "{}", resp.body_str());
    // Two Host headers: a later hop might pick the second one.
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let req = format!("GET / HTTP/1.1\r\nHost: api.test\r\nHost: evil.example.com\r\nX-Key: {t}\r\n\r\n");
    let resp = roundtrip(&mut c, req.as_bytes()).await;
    assert_eq!(resp.status, 400, "{}", resp.body_str());
    assert!(resp.body_str().contains("more than one Host header"));
    assert_upstream_untouched(&mut up);

    // The tunnel's own host, with or without its port, in any case, still works.
    for host in ["api.test".to_string(), tunnel.clone(), "API.Test".to_string(), format!("Api.TEST.:{}", up.port)] {
        let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
        let req = format!("GET /ok HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {t}\r\n\r\n");
        assert_eq!(roundtrip(&mut c, req.as_bytes()).await.status, 200, "Host: {host}");
        let got = up.next().await;
        assert_eq!(got.header("host"), Some(host.clone()));
        assert_eq!(got.header("authorization").as_deref(), Some("Bearer sk-live-alpha"));
    }
    assert_not_logged(&[SECRETS[0], SECRETS[1], &t]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_target_naming_another_host_gets_421_and_opens_no_upstream() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let t = token(1);
    let tunnel = format!("api.test:{}", up.port);
    let cases = [
        (format!("GET https://evil.example.com/v1?k={t} HTTP/1.1\r\nHost: api.test\r\n\r\n"), "evil.example.com"),
        // HTTP/1.0 without Host: judged by the target alone.
        (format!("GET http://evil.example.com/ HTTP/1.0\r\nAuthorization: Bearer {t}\r\n\r\n"), "evil.example.com"),
        (format!("GET https://api.test:1/ HTTP/1.1\r\nHost: api.test\r\nX-Key: {t}\r\n\r\n"), "api.test:1"),
    ];
    for (req, named) in &cases {
        let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
        let resp = roundtrip(&mut c, req.as_bytes()).await;
        assert_eq!(resp.status, 421, "{req}: {}", resp.body_str());
        let body = resp.body_str();
        assert!(body.contains(&format!("this tunnel is to {tunnel}; the request names {named}")), "{body}");
    }
    // User info in the authority only serves to confuse: refused outright.
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let req = "GET https://api.test@evil.example.com/ HTTP/1.1\r\nHost: api.test\r\n\r\n";
    assert_eq!(roundtrip(&mut c, req.as_bytes()).await.status, 400);
    assert_upstream_untouched(&mut up);

    // Absolute-form naming the tunnel's host, and HTTP/1.0 without Host, still work.
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let req = format!("GET https://API.test:{}/ok?k={t} HTTP/1.1\r\nHost: api.test\r\n\r\n", up.port);
    assert_eq!(roundtrip(&mut c, req.as_bytes()).await.status, 200);
    assert!(up.next().await.request_line().contains("/ok?k=sk-live-alpha "));
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let req = format!("GET /old?k={t} HTTP/1.0\r\n\r\n");
    assert_eq!(roundtrip(&mut c, req.as_bytes()).await.status, 200);
    assert_eq!(up.next().await.request_line(), "GET /old?k=sk-live-alpha HTTP/1.0");
    assert_not_logged(&[SECRETS[0], SECRETS[1], &t]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_naming_another_host_is_refused_at_the_handshake() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let t = token(1);
    for sni in ["evil.example.com", "api.test.evil.example.com"] {
        // The client accepts any certificate: only the proxy's check can stop it.
        let Err(err) = connect_tls_with_sni(&h, S1, "api.test", up.port, sni).await else {
            panic!("{sni}: handshake accepted");
        };
        let alert = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
        let expected = rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName);
        assert_eq!(alert, Some(&expected), "{sni}: {err}");
    }
    assert_upstream_untouched(&mut up);
    // A matching SNI in another case still works, and the token is replaced.
    let mut c = connect_tls_with_sni(&h, S1, "api.test", up.port, "API.Test").await.unwrap();
    let req = format!("GET / HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {t}\r\n\r\n");
    assert_eq!(roundtrip(&mut c, req.as_bytes()).await.status, 200);
    assert_eq!(up.next().await.header("authorization").as_deref(), Some("Bearer sk-live-alpha"));
    assert!(logs()
        .iter()
        .any(|l| l.contains("TLS server name evil.example.com does not match the tunnel to api.test")));
    assert_not_logged(&[SECRETS[0], SECRETS[1], &t]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_request_naming_another_host_on_a_kept_alive_tunnel_gets_421() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let t = token(1);
    let tunnel = format!("api.test:{}", up.port);
    let good = format!("GET /first HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {t}\r\n\r\n");
    let bad = format!("GET /second HTTP/1.1\r\nHost: evil.example.com\r\nAuthorization: Bearer {t}\r\n\r\n");

    // One after the other.
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let resp = roundtrip(&mut c, good.as_bytes()).await;
    assert_eq!(resp.status, 200);
    assert_eq!(up.next().await.header("authorization").as_deref(), Some("Bearer sk-live-alpha"));
    let resp = roundtrip(&mut c, bad.as_bytes()).await;
    assert_eq!(resp.status, 421, "{}", resp.body_str());
    assert!(resp.body_str().contains(&format!("this tunnel is to {tunnel}; the request names evil.example.com")));
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await.expect("closed after 421");

    // Pipelined in one write: the first response comes first, then the 421.
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    c.get_mut().write_all(format!("{good}{bad}").as_bytes()).await.unwrap();
    c.get_mut().flush().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), read_response(&mut c)).await.unwrap().unwrap();
    assert_eq!(first.status, 200);
    assert!(first.body_str().starts_with("GET /first "));
    let second = tokio::time::timeout(Duration::from_secs(10), read_response(&mut c)).await.unwrap().unwrap();
    assert_eq!(second.status, 421, "{}", second.body_str());
    assert!(up.next().await.request_line().starts_with("GET /first "));

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(up.try_next().is_none(), "the second request reached the upstream");
    assert_eq!(up.accepted.load(std::sync::atomic::Ordering::SeqCst), 2, "one upstream connection per tunnel");
    assert_not_logged(&[SECRETS[0], SECRETS[1], &t]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_host_must_match_its_target_and_is_never_substituted() {
    let mut plain = start_upstream(false).await;
    let h = setup(&plain, |_| {}).await;
    let t = token(1);
    let target = format!("http://api.test:{}/p?x={t}", plain.port);
    let send = |host: String| {
        let addr = h.listeners[&S1];
        let req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {t}\r\n\r\n");
        async move {
            let mut r = BufReader::new(TcpStream::connect(addr).await.unwrap());
            r.get_mut().write_all(req.as_bytes()).await.unwrap();
            read_response(&mut r).await.unwrap()
        }
    };
    let resp = send("evil.example.com".into()).await;
    assert_eq!(resp.status, 421, "{}", resp.body_str());
    let expected = format!("the request target names api.test:{}; the request names evil.example.com", plain.port);
    assert!(resp.body_str().contains(&expected), "{}", resp.body_str());
    assert_upstream_untouched(&mut plain);
    // Matching Host (other case): forwarded, and the token is not replaced.
    let resp = send(format!("API.test:{}", plain.port)).await;
    assert_eq!(resp.status, 200);
    let got = plain.next().await;
    assert_eq!(got.request_line(), format!("GET /p?x={t} HTTP/1.1"));
    assert_eq!(got.header("authorization"), Some(format!("Bearer {t}")));
    assert_not_logged(&SECRETS);
}

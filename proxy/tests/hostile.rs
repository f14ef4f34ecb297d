//! The sealing promise against a hostile sandbox and an upstream that echoes what it
//! receives: whatever the response form, the sandbox gets its token back, never the
//! value; policy changes reach a live tunnel; decompression bombs are refused.

mod common;

use std::io::Write as _;
use std::sync::Arc;

use common::*;
use proxy::SealRegistry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const S1: u32 = 3;
const VALUE: &str = "sk-live-alpha/9+Q";
const NEW_VALUE: &str = "sk-live-rotated-42";

async fn setup(up: &Upstream, tweak: impl FnOnce(&mut proxy::ProxyConfig)) -> Harness {
    let reg = Arc::new(SealRegistry::new());
    let api = format!("api.test:{}", up.port);
    register(&reg, S1, &[&api], vec![(token(1), secret(VALUE, &[&api]))]);
    let mut cfg = base_config(up);
    tweak(&mut cfg);
    start_proxy(cfg, reg, &[S1]).await
}

fn echo_request(mode: &str, t: &str) -> String {
    let body = format!("v={t}&json=\"{t}\"");
    format!(
        "POST /v1/echo?key={t} HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {t}\r\nX-Echo-Mode: {mode}\r\nAccept-Encoding: gzip, deflate, br, zstd\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Every form a value can take on the way back (raw, percent-encoded, JSON-escaped).
fn assert_no_value(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    for form in [VALUE, "sk-live-alpha%2F9%2BQ", "sk-live-alpha%2f9%2bQ", "sk-live-alpha\\/9+Q", "sk-live-alpha"] {
        assert!(!text.contains(form), "{what}: the sandbox received {form:?}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_values_come_back_as_the_sandboxs_token() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let t = token(1);
    for mode in ["status", "header", "identity", "chunked", "gzip", "deflate", "split"] {
        let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
        let resp = roundtrip(&mut c, echo_request(mode, &t).as_bytes()).await;
        let got = up.next().await;
        assert!(got.head.contains(&format!("Bearer {VALUE}")), "{mode}: the upstream got the real value");
        assert!(!got.head.to_ascii_lowercase().contains("br"), "{mode}: br is not offered: {}", got.head);
        assert_no_value(mode, resp.head.as_bytes());
        assert_no_value(mode, &resp.body);
        let all = format!("{}{}", resp.head, resp.body_str());
        assert!(all.contains(&t), "{mode}: the token stands where the value was:\n{all}");
        if mode == "gzip" || mode == "deflate" {
            assert!(!resp.head.to_ascii_lowercase().contains("content-encoding"), "{mode}: sent decoded");
            assert!(resp.body_str().contains(&format!("Authorization: Bearer {t}")), "{mode}");
        }
    }
    // A body delimited by the upstream closing the connection.
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    c.get_mut().write_all(echo_request("close", &t).as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), c.read_to_end(&mut raw)).await;
    assert!(String::from_utf8_lossy(&raw).contains(&format!("key={t}")));
    assert_no_value("close", &raw);
    assert_not_logged(&[VALUE]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoding_the_proxy_cannot_decode_is_refused_with_502() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let resp = roundtrip(&mut c, echo_request("br", &token(1)).as_bytes()).await;
    assert_eq!(resp.status, 502, "{}", resp.body_str());
    assert!(resp.body_str().contains("cannot decode"), "{}", resp.body_str());
    assert_no_value("br", &resp.body);
    let _ = up.next().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_101_are_scrubbed() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let t = token(1);
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let req = format!(
        "GET /ws?key={t} HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {t}\r\nConnection: Upgrade\r\nUpgrade: echo\r\nSec-WebSocket-Extensions: permessage-deflate\r\nX-Echo-Mode: upgrade\r\n\r\n"
    );
    c.get_mut().write_all(req.as_bytes()).await.unwrap();
    c.get_mut().write_all(format!("raw bytes with {t} inside").as_bytes()).await.unwrap();
    c.get_mut().flush().await.unwrap();
    let got = up.next().await;
    assert!(got.header("sec-websocket-extensions").is_none(), "compression is not offered: {}", got.head);
    c.get_mut().shutdown().await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), c.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.contains(&format!("Authorization: Bearer {t}")), "{text}");
    assert_no_value("upgrade", &raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frames_are_scrubbed_and_reframed() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let t = token(1);
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: api.test\r\nAuthorization: {t}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-Echo-Mode: websocket\r\n\r\n"
    );
    c.get_mut().write_all(req.as_bytes()).await.unwrap();
    c.get_mut().flush().await.unwrap();
    let got = up.next().await;
    assert!(got.head.contains(VALUE), "the upstream got the value");
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), c.read_to_end(&mut raw)).await;
    assert_no_value("websocket", &raw);
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("101 head") + 4;
    assert!(raw.starts_with(b"HTTP/1.1 101"));
    // Reassemble messages: every frame parses, fragments join, control frames stand alone.
    let (mut messages, mut controls, mut current) = (Vec::new(), Vec::new(), Vec::new());
    let mut in_message = false;
    for (fin, opcode, payload) in ws_parse(&raw[end..]) {
        if opcode >= 8 {
            assert!(fin && payload.len() <= 125);
            controls.push((opcode, payload));
            continue;
        }
        assert_eq!(opcode == 0, in_message, "a message starts with its opcode, continues with 0");
        in_message = !fin;
        current.extend_from_slice(&payload);
        if fin {
            messages.push(String::from_utf8(std::mem::take(&mut current)).unwrap());
        }
    }
    assert_eq!(messages, vec![format!("echo: {t}"), format!("part one {t} part two")]);
    assert_eq!(controls[0], (9, t.as_bytes().to_vec()));
    assert_eq!(controls[1].0, 8);
    assert_eq!(controls[1].1[..2], 1000u16.to_be_bytes(), "the close code survives");
    assert!(controls[1].1[2..].starts_with(b"bye osb_sealed_"), "the reason is scrubbed (and cut to 125 bytes)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_change_deletion_and_allowlist_change_reach_a_live_tunnel() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |_| {}).await;
    let t = token(1);
    let api = format!("api.test:{}", up.port);
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let req = |mode: &str| echo_request(mode, &t);

    assert_eq!(roundtrip(&mut c, req("identity").as_bytes()).await.status, 200);
    assert!(up.next().await.head.contains(VALUE));

    // New value: used from the next request on the same tunnel; both values scrubbed.
    register(&h.registry, S1, &[&api], vec![(token(1), secret(NEW_VALUE, &[&api]))]);
    let resp = roundtrip(&mut c, req("identity").as_bytes()).await;
    assert!(up.next().await.head.contains(NEW_VALUE));
    assert!(!resp.body_str().contains(NEW_VALUE) && resp.body_str().contains(&t), "{}", resp.body_str());

    // Deleted: the token is no longer replaced.
    register(&h.registry, S1, &[&api], vec![]);
    let resp = roundtrip(&mut c, req("identity").as_bytes()).await;
    let got = up.next().await;
    assert!(got.head.contains(&format!("Bearer {t}")) && !got.head.contains(NEW_VALUE), "{}", got.head);
    assert_eq!(resp.status, 200);

    // Host removed from the allowlist: the next request is refused, nothing sent.
    register(&h.registry, S1, &[&format!("other.test:{}", up.port)], vec![]);
    let resp = roundtrip(&mut c, req("identity").as_bytes()).await;
    assert_eq!(resp.status, 403, "{}", resp.body_str());
    assert!(resp.body_str().contains("api.test"), "{}", resp.body_str());
    assert!(up.try_next().is_none());
    drop(c);
    // The egress record: the tunnel's requests and the refusal, counted and logged,
    // with no value and no token in any line.
    let counts = h.counters.snapshot();
    assert_eq!(counts.decisions[0], ("forwarded", 3));
    assert_eq!(counts.decisions[1], ("refused", 1));
    assert!(
        counts.values_scrubbed >= 2 && counts.bytes_to_sandboxes > 0 && counts.bytes_from_sandboxes > 0,
        "{counts:?}"
    );
    let record = format!("egress: sandbox {S1}: tunnel to api.test:{}: 3 request(s) forwarded", up.port);
    assert!(logs().iter().any(|l| l.contains(&record)), "no line with {record:?}: {:#?}", logs());
    assert!(logs().iter().any(|l| l.contains("egress: sandbox 3: refused (403 Forbidden)")));
    assert_not_logged(&[VALUE, NEW_VALUE, &t]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_needs_its_own_allowlist_entry() {
    let up = start_upstream(true).await;
    let reg = Arc::new(SealRegistry::new());
    register(&reg, S1, &["api.test"], vec![]);
    let h = start_proxy(base_config(&up), reg, &[S1]).await;
    let refused = connect_raw(h.listeners[&S1], &format!("api.test:{}", up.port)).await.err().unwrap();
    assert_eq!(refused.status, 403);
    assert!(refused.body_str().contains("admits only port 443"), "{}", refused.body_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_body_inflating_past_the_cap_gets_413_and_nothing_is_forwarded() {
    let mut up = start_upstream(true).await;
    let h = setup(&up, |cfg| cfg.limits.max_inflated_body = 4 << 20).await;
    let t = token(1);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(t.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..16 {
        gz.write_all(&zeros).unwrap();
    }
    let body = gz.finish().unwrap();
    let mut c = connect_tls(&h, S1, "api.test", up.port).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: api.test\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(&body);
    let resp = roundtrip(&mut c, &req).await;
    assert_eq!(resp.status, 413, "{}", resp.body_str());
    assert!(resp.body_str().contains("MiB"), "{}", resp.body_str());
    assert!(up.try_next().is_none(), "nothing reached the upstream");
}

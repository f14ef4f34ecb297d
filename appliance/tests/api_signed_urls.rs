//! Signed, expiring file URLs over real HTTP: signed with a key, used without one, refused when
//! expired, changed or used for anything else, and still valid after a restart and a master-key
//! rotation.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn sandbox(c: &mut Client, body: &str) -> String {
    let (status, s) = c.call("POST", "/api/sandboxes", body);
    assert_eq!(status, 201, "{s}");
    s["sandboxID"].as_str().expect("id").to_string()
}

/// Signs `kind` (`download` or `upload`) for `path`; returns the answer's status and body.
fn sign(c: &mut Client, id: &str, kind: &str, body: &Value) -> (u16, Value) {
    c.call("POST", &format!("/api/sandboxes/{id}/files/{kind}-url"), &body.to_string())
}

/// The path and query of a signed URL (the harness's client sends `Host: localhost`, plain HTTP).
fn target(url: &str) -> String {
    url.strip_prefix("http://localhost").unwrap_or_else(|| panic!("the URL's origin: {url}")).to_string()
}

fn signed(c: &mut Client, id: &str, kind: &str, path: &str) -> String {
    let (status, answer) = sign(c, id, kind, &json!({ "path": path }));
    assert_eq!(status, 200, "{answer}");
    target(answer["url"].as_str().expect("url"))
}

fn anonymous(h: &Harness) -> Client {
    Client::new(h.addr, None)
}

/// `target` with query parameter `name` set to `value` (already encoded).
fn with_param(target: &str, name: &str, value: &str) -> String {
    let (path, query) = target.split_once('?').expect("query");
    let pairs: Vec<String> = query
        .split('&')
        .map(|p| if p.split('=').next() == Some(name) { format!("{name}={value}") } else { p.to_string() })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

fn param(target: &str, name: &str) -> String {
    let query = target.split_once('?').expect("query").1;
    query.split('&').find_map(|p| p.strip_prefix(&format!("{name}="))).expect("param").to_string()
}

fn error_of(r: &appliance::client::HttpResponse) -> String {
    let v: Value = serde_json::from_slice(&r.body).expect("json error");
    v["error"].as_str().expect("error").to_string()
}

#[test]
fn a_signed_url_downloads_and_uploads_without_a_key_and_the_audit_shows_no_signature() {
    let h = Harness::start("signed-use");
    let mut op = h.client();
    let id = sandbox(&mut op, "{}");
    let path = "/tmp/a b+c&d.txt";
    let content = b"signed content \x00\xff".to_vec();
    let plain = format!("/api/sandboxes/{id}/files?path=%2Ftmp%2Fa%20b%2Bc%26d.txt");
    assert_eq!(op.raw("PUT", &plain, &content).status, 204);

    let before = appliance::clock::now_unix();
    let (status, answer) = sign(&mut op, &id, "download", &json!({ "path": path }));
    assert_eq!(status, 200, "{answer}");
    let url = answer["url"].as_str().expect("url");
    assert!(url.starts_with(&format!("http://localhost/api/sandboxes/{id}/files/download?path=")), "{url}");
    let expires: i64 = param(url, "expires").parse().expect("unix seconds");
    assert!((before + 3600..=before + 3602).contains(&expires), "default expiry: {expires} vs {before}");
    assert_eq!(answer["expiresAt"], appliance::clock::rfc3339(expires));
    assert_eq!(param(url, "signature").len(), 64, "hex HMAC-SHA256");
    let got = anonymous(&h).raw("GET", &target(url), b"");
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    assert_eq!(got.body, content);

    let (status, answer) = sign(&mut op, &id, "upload", &json!({"path": "/tmp/up.bin", "expiresIn": 60}));
    assert_eq!(status, 200, "{answer}");
    let up = target(answer["url"].as_str().expect("url"));
    assert!(up.starts_with(&format!("/api/sandboxes/{id}/files/upload?path=/tmp/up.bin&expires=")), "{up}");
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let put = anonymous(&h).raw("PUT", &up, &body);
    assert_eq!(put.status, 204, "{}", String::from_utf8_lossy(&put.body));
    assert_eq!(op.raw("GET", &format!("/api/sandboxes/{id}/files?path=/tmp/up.bin"), b"").body, body);
    // Used again until it expires: each use is the one operation it names.
    assert_eq!(anonymous(&h).raw("PUT", &up, b"second").status, 204);
    assert_eq!(op.raw("GET", &format!("/api/sandboxes/{id}/files?path=/tmp/up.bin"), b"").body, b"second");

    // The audit trail has the signed upload, named as one, with its path but not its query.
    let (_, audit) = op.call("GET", "/api/audit", "");
    let entries = audit["entries"].as_array().expect("entries");
    let uploads: Vec<&Value> = entries.iter().filter(|e| e["route"] == "/api/sandboxes/{id}/files/upload").collect();
    assert_eq!(uploads.len(), 2, "{audit}");
    assert_eq!(uploads[0]["keyID"], "signed-url");
    assert_eq!(uploads[0]["method"], "PUT");
    assert_eq!(uploads[0]["status"], 204);
    assert_eq!(uploads[0]["target"], format!("/api/sandboxes/{id}/files/upload"));
    assert!(entries.iter().any(|e| e["route"] == "/api/sandboxes/{id}/files/upload-url" && e["keyID"] == "admin"));
    let signature = param(&up, "signature");
    assert!(!audit.to_string().contains(&signature), "{audit}");
    let metrics = op.raw("GET", "/metrics", b"");
    assert!(!String::from_utf8_lossy(&metrics.body).contains(&signature));
    assert!(String::from_utf8_lossy(&metrics.body).contains("/api/sandboxes/{id}/files/download"));
}

#[test]
fn changed_expired_or_misused_urls_are_403_and_no_key_no_signature_is_401() {
    let h = Harness::start("signed-refused");
    let mut op = h.client();
    let id = sandbox(&mut op, "{}");
    let other = sandbox(&mut op, "{}");
    assert_eq!(op.raw("PUT", &format!("/api/sandboxes/{id}/files?path=/tmp/f"), b"f").status, 204);
    assert_eq!(op.raw("PUT", &format!("/api/sandboxes/{id}/files?path=/tmp/g"), b"g").status, 204);
    assert_eq!(op.raw("PUT", &format!("/api/sandboxes/{other}/files?path=/tmp/f"), b"o").status, 204);
    let down = signed(&mut op, &id, "download", "/tmp/f");
    let up = signed(&mut op, &id, "upload", "/tmp/f");
    let mut anon = anonymous(&h);
    assert_eq!(anon.raw("GET", &down, b"").status, 200, "the untouched URL works");

    let expires: i64 = param(&down, "expires").parse().expect("expires");
    let signature = param(&down, "signature");
    let mut flipped = signature.clone();
    let last = flipped.pop().expect("hex");
    flipped.push(if last == '0' { '1' } else { '0' });
    let refused = [
        ("GET", with_param(&down, "path", "/tmp/g"), "path"),
        ("GET", with_param(&down, "expires", &(expires + 1).to_string()), "expires"),
        ("GET", with_param(&down, "expires", "soon"), "expires not a number"),
        ("GET", with_param(&down, "signature", &flipped), "signature"),
        ("GET", with_param(&down, "signature", "not-hex"), "signature not hex"),
        ("GET", down.replace(&id, &other), "sandbox"),
        ("GET", down.replace(&id, "not-a-uuid"), "sandbox not a UUID"),
        ("GET", down.replace("path=/tmp/f&", ""), "no path"),
        ("PUT", down.clone(), "a download URL used with PUT"),
        ("GET", up.clone(), "an upload URL used with GET"),
        ("PUT", down.replace("/files/download?", "/files/upload?"), "a download signature on the upload route"),
        ("GET", up.replace("/files/upload?", "/files/download?"), "an upload signature on the download route"),
        ("DELETE", down.clone(), "a download URL used with DELETE"),
    ];
    for (method, path, what) in &refused {
        let got = anon.raw(method, path, b"x");
        assert_eq!(got.status, 403, "{what}: {method} {path}: {}", String::from_utf8_lossy(&got.body));
        assert!(error_of(&got).starts_with("this signed URL does not grant"), "{what}: {}", error_of(&got));
        // A key beside a signature does not make a bad signature good.
        let got = op.raw(method, path, b"x");
        assert_eq!(got.status, 403, "{what} with a key: {method} {path}");
    }
    // Nothing was written by the refused uploads.
    assert_eq!(op.raw("GET", &format!("/api/sandboxes/{id}/files?path=/tmp/f"), b"").body, b"f");

    // Expired: signed for a second, used after two.
    let (status, answer) = sign(&mut op, &id, "download", &json!({"path": "/tmp/f", "expiresIn": 1}));
    assert_eq!(status, 200, "{answer}");
    let short = target(answer["url"].as_str().expect("url"));
    std::thread::sleep(Duration::from_millis(2100));
    let got = anon.raw("GET", &short, b"");
    assert_eq!(got.status, 403);
    assert!(error_of(&got).contains("expired"), "{}", error_of(&got));

    // Neither a key nor a signature: 401, as every route.
    for (method, path) in [
        ("GET", format!("/api/sandboxes/{id}/files/download?path=/tmp/f")),
        ("PUT", format!("/api/sandboxes/{id}/files/upload?path=/tmp/f")),
        ("POST", format!("/api/sandboxes/{id}/files/download-url")),
        ("POST", format!("/api/sandboxes/{id}/files/upload-url")),
    ] {
        assert_eq!(anon.raw(method, &path, b"{}").status, 401, "{method} {path}");
    }
    // A key and no signature: the routes are plain file routes.
    assert_eq!(op.raw("PUT", &format!("/api/sandboxes/{id}/files/upload?path=/tmp/k"), b"keyed").status, 204);
    let got = op.raw("GET", &format!("/api/sandboxes/{id}/files/download?path=/tmp/k"), b"");
    assert_eq!((got.status, got.body.as_slice()), (200, &b"keyed"[..]));
    assert_eq!(op.raw("PUT", &format!("/api/sandboxes/{id}/files/download?path=/tmp/k"), b"x").status, 405);

    // The signed routes grant nothing else: a signature on another route is not looked at.
    let on_files = down.replace("/files/download?", "/files?");
    assert_eq!(anon.raw("GET", &on_files, b"").status, 401);
}

#[test]
fn signing_checks_the_key_scope_the_body_the_host_and_the_sandbox() {
    let h = Harness::start("signed-sign");
    let mut op = h.client();
    let (_, a) = op.call("POST", "/api/projects", r#"{"name":"a"}"#);
    let (_, b) = op.call("POST", "/api/projects", r#"{"name":"b"}"#);
    let sa = sandbox(&mut op, r#"{"project":"a"}"#);
    let sb = sandbox(&mut op, r#"{"project":"b"}"#);
    let (_, key) = op.call("POST", "/api/keys", r#"{"name":"agent-a","projects":["a"]}"#);
    let mut pk = Client::new(h.addr, Some(key["key"].as_str().expect("key")));
    assert!(a["id"].is_string() && b["id"].is_string());

    // A project key signs for its own sandboxes only.
    let (status, answer) = sign(&mut pk, &sb, "download", &json!({"path": "/tmp/f"}));
    assert_eq!(status, 403, "{answer}");
    assert!(answer["error"].as_str().expect("error").contains("scope"), "{answer}");
    assert_eq!(sign(&mut pk, &sb, "upload", &json!({"path": "/tmp/f"})).0, 403);
    let (status, answer) = sign(&mut pk, &sa, "upload", &json!({"path": "/tmp/mine"}));
    assert_eq!(status, 200, "{answer}");
    let up = target(answer["url"].as_str().expect("url"));
    assert_eq!(anonymous(&h).raw("PUT", &up, b"from a").status, 204);
    // What it signed reaches its sandbox only.
    assert_eq!(anonymous(&h).raw("PUT", &up.replace(&sa, &sb), b"x").status, 403);

    for (body, what) in [
        (json!({"path": "/tmp/f", "expiresIn": 0}), "expiresIn 0"),
        (json!({"path": "/tmp/f", "expiresIn": 86401}), "expiresIn 86401"),
        (json!({"path": "/tmp/f", "expiresIn": -1}), "expiresIn -1"),
        (json!({"path": "/tmp/f", "expiresIn": "60"}), "expiresIn a string"),
        (json!({"expiresIn": 60}), "no path"),
        (json!({"path": ""}), "an empty path"),
    ] {
        let (status, answer) = sign(&mut op, &sa, "download", &body);
        assert_eq!(status, 400, "{what}: {answer}");
    }
    let (status, answer) = sign(&mut op, &sa, "download", &json!({"path": "/tmp/../etc/shadow"}));
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = sign(&mut op, &sa, "download", &json!({"path": "/tmp/f", "expiresIn": 86400}));
    assert_eq!(status, 200, "the longest allowed: {answer}");
    assert_eq!(op.call("GET", &format!("/api/sandboxes/{sa}/files/download-url"), "").0, 405);
    let unknown = "8d1f4c2e-6a0b-4c1d-9e2f-3a4b5c6d7e8f";
    assert_eq!(sign(&mut op, unknown, "download", &json!({"path": "/tmp/f"})).0, 404);

    // No Host header: nothing to build the URL on.
    let body = r#"{"path":"/tmp/f"}"#;
    let mut s = TcpStream::connect(h.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(
        s,
        "POST /api/sandboxes/{sa}/files/download-url HTTP/1.0\r\nX-API-Key: {ADMIN_KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.0 400"), "{answer}");
    assert!(answer.contains("Host"), "{answer}");
    // A Host that is not a host is refused too, never put in a URL.
    let mut s = TcpStream::connect(h.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(
        s,
        "POST /api/sandboxes/{sa}/files/download-url HTTP/1.1\r\nHost: evil/\"x\r\nConnection: close\r\n\
         X-API-Key: {ADMIN_KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[test]
fn a_stopped_sandbox_s_urls_answer_as_its_file_routes_do() {
    let h = Harness::start("signed-stopped");
    let mut op = h.client();
    let id = sandbox(&mut op, "{}");
    assert_eq!(op.raw("PUT", &format!("/api/sandboxes/{id}/files?path=/tmp/f"), b"f").status, 204);
    let down = signed(&mut op, &id, "download", "/tmp/f");
    let up = signed(&mut op, &id, "upload", "/tmp/f");
    h.runtime.kill_vmm(&id);
    wait_ended(&mut op, &id);
    let plain = op.raw("GET", &format!("/api/sandboxes/{id}/files?path=/tmp/f"), b"").status;
    assert_eq!(plain, 409);
    assert_eq!(anonymous(&h).raw("GET", &down, b"").status, plain);
    assert_eq!(anonymous(&h).raw("PUT", &up, b"x").status, plain);
    assert_eq!(sign(&mut op, &id, "download", &json!({"path": "/tmp/f"})).0, 409, "nothing to sign for");
    // Deleted: the URL answers as the file route does.
    assert_eq!(op.call("DELETE", &format!("/api/sandboxes/{id}"), "").0, 204);
    let plain = op.raw("GET", &format!("/api/sandboxes/{id}/files?path=/tmp/f"), b"").status;
    assert!(plain == 404 || plain == 409, "{plain}");
    assert_eq!(anonymous(&h).raw("GET", &down, b"").status, plain);
}

#[test]
fn urls_signed_before_a_restart_and_a_master_key_rotation_still_verify() {
    let mut h = Harness::start("signed-rotate");
    let mut op = h.client();
    let id = sandbox(&mut op, "{}");
    assert_eq!(op.raw("PUT", &format!("/api/sandboxes/{id}/files?path=/tmp/f"), b"kept").status, 204);
    let down = signed(&mut op, &id, "download", "/tmp/f");
    let fetch = |h: &Harness| {
        let got = anonymous(h).raw("GET", &down, b"");
        (got.status, got.body)
    };
    assert_eq!(fetch(&h), (200, b"kept".to_vec()));

    h.restart();
    assert_eq!(fetch(&h), (200, b"kept".to_vec()), "after a restart");

    let mut op = h.client();
    let (status, answer) = op.call("POST", "/api/system/master-key/rotate", "");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(fetch(&h), (200, b"kept".to_vec()), "after a rotation");
    // The store now holds the key sealed under the new master key only: a restart opens it.
    h.restart();
    assert_eq!(fetch(&h), (200, b"kept".to_vec()), "after a rotation and a restart");
    let mut op = h.client();
    let again = signed(&mut op, &id, "download", "/tmp/f");
    assert_eq!(param(&again, "signature").len(), 64);
    assert_eq!(anonymous(&h).raw("GET", &again, b"").status, 200);

    // The key itself is in no file of the data directory in the clear, nor is any signature
    // derived from it anywhere but in the answers.
    h.stop();
    let signature = param(&down, "signature");
    for file in files_under(&h.data_dir) {
        let bytes = std::fs::read(&file).expect("read");
        assert!(!bytes.windows(signature.len()).any(|w| w == signature.as_bytes()), "{}", file.display());
    }
}

#[test]
fn over_https_the_url_is_an_https_url_on_the_request_s_host() {
    use appliance::client::HttpClient;
    let dir = temp_dir("signed-tls");
    let trust = dir.join("api-ca.pem");
    let trust_out = trust.clone();
    let h = Harness::start_configured(dir, std::sync::Arc::default(), std::sync::Arc::default(), move |c| {
        c.tls = appliance::api_tls::TlsChoice::Generated;
        c.tls_trust_out = Some(trust_out);
    });
    let tls = HttpClient::tls_trusting(&std::fs::read_to_string(&trust).expect("trust file")).expect("roots");
    let connect = |key: Option<&str>| {
        HttpClient::connect_tls(h.addr, key.map(String::from), tls.clone(), "localhost").expect("TLS connection")
    };
    let mut op = connect(Some(ADMIN_KEY));
    let created = op.request("POST", "/api/sandboxes", b"{}").expect("create");
    let id =
        serde_json::from_slice::<Value>(&created.body).expect("json")["sandboxID"].as_str().expect("id").to_string();
    assert_eq!(
        op.request("PUT", &format!("/api/sandboxes/{id}/files?path=/tmp/f"), b"over tls").expect("put").status,
        204
    );
    let answer =
        op.request("POST", &format!("/api/sandboxes/{id}/files/download-url"), br#"{"path":"/tmp/f"}"#).expect("sign");
    assert_eq!(answer.status, 200);
    let url = serde_json::from_slice::<Value>(&answer.body).expect("json")["url"].as_str().expect("url").to_string();
    let rest = url.strip_prefix("https://localhost/").unwrap_or_else(|| panic!("an https URL on the Host: {url}"));
    let got = connect(None).request("GET", &format!("/{rest}"), b"").expect("download");
    assert_eq!((got.status, got.body.as_slice()), (200, &b"over tls"[..]));
}

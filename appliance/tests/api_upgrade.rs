//! `POST /api/system/upgrade` refuses an image without a valid signature from a trusted key
//! before receiving any of it, over real HTTP; nothing is staged. (The signature checks
//! themselves, valid and modified images included, are unit-tested in upgrade/signature.rs; an
//! upgrade that installs and boots is in the end-to-end disk suite.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{Harness, ADMIN_KEY};

/// Sends an upload with `signature` (if any) in the signature header; returns status and body.
fn upload(h: &Harness, signature: Option<&str>) -> (u16, serde_json::Value) {
    let body = vec![0x55u8; 4096];
    let mut head = format!(
        "POST /api/system/upgrade HTTP/1.1\r\nHost: x\r\nX-API-Key: {ADMIN_KEY}\r\nConnection: close\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(line) = signature {
        head.push_str(&format!("{}: {line}\r\n", boot_disk::signature::HEADER));
    }
    head.push_str("\r\n");
    let mut stream = TcpStream::connect(h.addr).expect("connect");
    stream.write_all(head.as_bytes()).expect("head");
    stream.write_all(&body).expect("body");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status");
    let json = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (status, serde_json::from_str(json).unwrap_or_default())
}

#[test]
fn unsigned_untrusted_and_garbled_uploads_are_refused_and_nothing_is_staged() {
    let h = Harness::start("upgrade-signature");
    let (status, v) = upload(&h, None);
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("unsigned"), "{v}");

    // Well formed, but by a key this appliance (trusting none here) does not trust.
    let statement = boot_disk::signature::Statement {
        image_sha256: "ab".repeat(32),
        manifest_sha256: "cd".repeat(32),
        version: "9".into(),
        key: "ef".repeat(32),
    };
    let (status, v) = upload(&h, Some(&statement.render(&[1u8; 64])));
    assert_eq!(status, 403, "{v}");
    let said = v["error"].as_str().unwrap_or("");
    assert!(said.contains("does not trust") && said.contains(&"ef".repeat(8)), "{v}");

    let (status, v) = upload(&h, Some("oc-image-signature-v1 image-sha256=zz"));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("image-sha256="), "{v}");

    assert!(!h.data_dir.join("upgrade").join("upload.img").exists(), "nothing may be staged");
}

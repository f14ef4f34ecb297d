//! Templates made on the appliance, through the real HTTP server and the real import (archive
//! checks, unpacking, `mke2fs`): imports of OCI, docker and root filesystem archives, hostile
//! archives refused with nothing left on the data disk, sandboxes saved as templates, the image's
//! defaults in the template's sandboxes, deletes refused while in use, scopes.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::Harness;
use serde_json::{json, Value};

const ROOTFS: &str = "application/vnd.opencomputer.rootfs+tar";

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A tar archive of `entries` (path, content; a path ending in `/` is a directory).
fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in entries {
        let mut header = tar::Header::new_gnu();
        if path.ends_with('/') {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o755);
            header.set_size(content.len() as u64);
        }
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        // Written as is (the builder's own path setter refuses `..`, which hostile cases need).
        let name = &mut header.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_cksum();
        builder.append(&header, *content).expect("append");
    }
    builder.into_inner().expect("tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

/// An OCI image layout archive with one gzip layer of `layer` (a tar) and `config`.
fn oci_archive(layer: &[u8], config: &Value) -> Vec<u8> {
    let layer_gz = gzip(layer);
    let config_bytes = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(layer))]},
    }))
    .expect("config");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&config_bytes)),
            "size": config_bytes.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{}", sha256_hex(&layer_gz)),
            "size": layer_gz.len(),
        }],
    }))
    .expect("manifest");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&manifest)),
            "size": manifest.len(),
        }],
    }))
    .expect("index");
    let blob = |data: &[u8]| format!("blobs/sha256/{}", sha256_hex(data));
    let (layer_path, config_path, manifest_path) = (blob(&layer_gz), blob(&config_bytes), blob(&manifest));
    tar_of(&[
        ("oci-layout", br#"{"imageLayoutVersion": "1.0.0"}"#),
        ("index.json", &index),
        ("blobs/", b""),
        ("blobs/sha256/", b""),
        (&manifest_path, &manifest),
        (&config_path, &config_bytes),
        (&layer_path, &layer_gz),
    ])
}

fn sample_rootfs() -> Vec<u8> {
    tar_of(&[
        ("etc/", b""),
        ("etc/greeting", b"hello from the image\n"),
        ("usr/", b""),
        ("usr/bin/", b""),
        ("usr/bin/hello", b"#!/bin/sh\necho hello\n"),
        ("srv/", b""),
    ])
}

/// The content of `path` in the ext4 disk `disk` (debugfs, from e2fsprogs).
fn file_in_disk(disk: &Path, path: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(format!("cat {path}")).arg(disk).output().expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn names(list: &Value) -> Vec<String> {
    list.as_array().expect("array").iter().map(|t| t["name"].as_str().expect("name").to_string()).collect()
}

fn work_dir_is_empty(h: &Harness) -> bool {
    let work = h.data_dir.join("template-work");
    !work.exists() || std::fs::read_dir(&work).expect("read").next().is_none()
}

#[test]
fn an_oci_archive_becomes_a_template_whose_sandboxes_get_the_images_defaults() {
    let mut h = Harness::start("templates-oci");
    let mut c = h.client();
    let (status, list) = c.call("GET", "/api/templates", "");
    assert_eq!(status, 200);
    assert_eq!(names(&list), ["base", "node", "python"]);
    assert_eq!(list[0]["builtIn"], true);
    assert_eq!(list[0]["source"], "image");

    let config = json!({"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hi"], "WorkingDir": "/srv",
        "User": "1000", "Entrypoint": ["/usr/bin/hello"], "Cmd": ["--loud"]});
    let archive = oci_archive(&sample_rootfs(), &config);
    let (status, body) = c.upload("/api/templates?name=greeter&tag=v1", "application/x-tar", &archive);
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["templateID"], "greeter");
    assert_eq!(body["name"], "greeter");
    assert_eq!(body["tag"], "v1");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["builtIn"], false);
    assert_eq!(body["source"], "oci-archive");
    assert_eq!(body["sourceDigest"], format!("sha256:{}", sha256_hex(&archive)));
    assert_eq!(body["defaults"]["env"]["GREETING"], "hi");
    assert_eq!(body["defaults"]["workingDir"], "/srv");
    assert_eq!(body["defaults"]["user"], "1000");
    assert_eq!(body["defaults"]["entrypoint"], json!(["/usr/bin/hello"]));
    assert_eq!(body["defaults"]["cmd"], json!(["--loud"]));
    assert!(body["diskMB"].as_u64().expect("diskMB") >= 1024, "{body}");
    assert!(body["createdAt"].is_string());
    assert!(work_dir_is_empty(&h), "the import's work directory is gone");

    // The runtime was handed a real ext4 disk with the image's files and the sandbox's own.
    let disk = h.runtime.made_templates.lock().expect("lock").get("greeter").cloned().expect("installed");
    assert_eq!(file_in_disk(&disk, "/etc/greeting"), "hello from the image\n");
    assert_eq!(file_in_disk(&disk, "/usr/bin/hello"), "#!/bin/sh\necho hello\n");
    assert!(file_in_disk(&disk, "/etc/hosts").starts_with("127.0.0.1\tlocalhost"));

    let (status, got) = c.call("GET", "/api/templates/greeter", "");
    assert_eq!((status, &got["sourceDigest"]), (200, &body["sourceDigest"]));
    assert_eq!(names(&c.call("GET", "/api/templates", "").1), ["base", "greeter", "node", "python"]);

    // A sandbox of it gets the image's Env (the request's envs win) and runs in its WorkingDir.
    let (status, sandbox) =
        c.call("POST", "/api/sandboxes", r#"{"templateID": "greeter", "envs": {"GREETING": "from the request"}}"#);
    assert_eq!(status, 201, "{sandbox}");
    let id = sandbox["sandboxID"].as_str().expect("id").to_string();
    let env = h.runtime.env_of(&id);
    assert!(env.iter().any(|(k, v)| k == "PATH" && v == "/usr/local/bin:/usr/bin:/bin"), "{env:?}");
    let (_, out) = c.call("POST", &format!("/api/sandboxes/{id}/exec/run"), r#"{"cmd": "echo $GREETING"}"#);
    assert_eq!(out["stdout"], "from the request\n");
    let (_, out) = c.call("POST", &format!("/api/sandboxes/{id}/exec/run"), r#"{"cmd": "pwd"}"#);
    assert_eq!(out["stdout"], "/srv\n");
    let (_, out) = c.call("POST", &format!("/api/sandboxes/{id}/exec/run"), r#"{"cmd": "pwd", "cwd": "/tmp"}"#);
    assert_eq!(out["stdout"], "/tmp\n", "a command's own cwd wins");

    // In use: not deleted; once the sandbox is gone, deleted.
    let (status, refused) = c.call("DELETE", "/api/templates/greeter", "");
    assert_eq!(status, 409, "{refused}");
    assert!(refused["error"].as_str().expect("error").contains(&id), "{refused}");
    assert_eq!(c.call("DELETE", &format!("/api/sandboxes/{id}"), "").0, 204);
    common::wait_ended(&mut c, &id);
    assert_eq!(c.call("DELETE", "/api/templates/greeter", "").0, 204);
    assert_eq!(c.call("GET", "/api/templates/greeter", "").0, 404);
    assert!(!disk.exists(), "its disk is gone");

    // The record survives a restart; a shipped template is never deleted.
    let archive = oci_archive(&sample_rootfs(), &json!({}));
    assert_eq!(c.upload("/api/templates?name=kept", "application/x-tar", &archive).0, 201);
    h.restart();
    let mut c = h.client();
    assert_eq!(c.call("GET", "/api/templates/kept", "").1["source"], "oci-archive");
    let (status, refused) = c.call("DELETE", "/api/templates/base", "");
    assert_eq!(status, 403, "{refused}");
    assert!(refused["error"].as_str().expect("error").contains("shipped"), "{refused}");
}

#[test]
fn a_root_filesystem_tarball_compressed_or_not_becomes_a_template() {
    let h = Harness::start("templates-rootfs");
    let mut c = h.client();
    let plain = sample_rootfs();
    let (status, body) = c.upload("/api/templates?name=plain", ROOTFS, &plain);
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["source"], "rootfs-tarball");
    assert_eq!(body["defaults"]["env"], json!({}));
    let zstd = zstd::encode_all(&plain[..], 3).expect("zstd");
    let (status, body) = c.upload("/api/templates?name=squeezed", ROOTFS, &zstd);
    assert_eq!(status, 201, "{body}");
    let disk = h.runtime.made_templates.lock().expect("lock").get("squeezed").cloned().expect("installed");
    assert_eq!(file_in_disk(&disk, "/etc/greeting"), "hello from the image\n");
}

#[test]
fn bad_requests_and_hostile_archives_are_refused_and_leave_nothing_behind() {
    let h = Harness::start("templates-hostile");
    let mut c = h.client();
    let good = oci_archive(&sample_rootfs(), &json!({}));
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("/api/templates", "application/x-tar", good.clone(), 400, "name is required"),
        ("/api/templates?name=../x", "application/x-tar", good.clone(), 400, "invalid template"),
        ("/api/templates?name=base", "application/x-tar", good.clone(), 409, "exists already"),
        ("/api/templates?name=default", "application/x-tar", good.clone(), 409, "exists already"),
        ("/api/templates?name=x", "text/plain", good.clone(), 415, "Content-Type"),
        (
            "/api/templates?name=x",
            "application/json",
            br#"{"name":"x","dockerfile":"FROM debian"}"#.to_vec(),
            400,
            "Dockerfile",
        ),
        ("/api/templates?name=x", "application/x-tar", b"not an archive at all".to_vec(), 400, "refused"),
        ("/api/templates?name=x", "application/x-tar", tar_of(&[("hello", b"x")]), 400, "refused"),
        ("/api/templates?name=x", "application/x-tar", good[..good.len() / 2].to_vec(), 400, "refused"),
        ("/api/templates?name=x", ROOTFS, tar_of(&[("../escape", b"x")]), 400, ".."),
    ];
    for (path, content_type, body, want, says) in cases {
        let (status, answer) = c.upload(path, content_type, &body);
        assert_eq!(status, want, "{path} {content_type}: {answer}");
        let error = answer["error"].as_str().expect("error");
        assert!(error.contains(says), "{path} {content_type}: {error}");
        assert!(work_dir_is_empty(&h), "{path}: work left behind");
    }
    // A device node.
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Char);
    header.set_device_major(1).expect("major");
    header.set_device_minor(3).expect("minor");
    header.set_mode(0o666);
    header.set_size(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    builder.append_data(&mut header, "dev/null", &[][..]).expect("append");
    let (status, answer) = c.upload("/api/templates?name=x", ROOTFS, &builder.into_inner().expect("tar"));
    assert_eq!(status, 400, "{answer}");
    assert!(work_dir_is_empty(&h));
    assert_eq!(names(&c.call("GET", "/api/templates", "").1), ["base", "node", "python"], "nothing was added");
    assert!(h.runtime.made_templates.lock().expect("lock").is_empty());
}

#[test]
fn a_sandbox_saved_as_a_template_carries_its_files_and_only_the_operator_makes_templates() {
    let h = Harness::start("templates-save");
    let mut c = h.client();
    let (status, sandbox) = c.call("POST", "/api/sandboxes", r#"{"templateID": "base"}"#);
    assert_eq!(status, 201, "{sandbox}");
    let id = sandbox["sandboxID"].as_str().expect("id").to_string();
    h.runtime.with_sandbox(&id, |s| s.files.insert("/root/notes.txt".into(), b"saved state".to_vec())).expect("file");
    let (status, body) = c.call("POST", &format!("/api/sandboxes/{id}/template"), r#"{"name": "snap-1"}"#);
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["source"], "sandbox");
    assert_eq!(body["sourceDigest"], format!("sandbox:{id}"));
    let disk = h.runtime.made_templates.lock().expect("lock").get("snap-1").cloned().expect("installed");
    assert!(std::fs::read_to_string(&disk).expect("disk").contains("/root/notes.txt=saved state"));
    assert_eq!(c.call("POST", &format!("/api/sandboxes/{id}/template"), r#"{"name": "snap-1"}"#).0, 409);
    assert_eq!(c.call("POST", &format!("/api/sandboxes/{id}/template"), "{}").0, 400);

    // A project key reads templates and makes none.
    let (status, project) = c.call("POST", "/api/projects", r#"{"name": "p1"}"#);
    assert_eq!(status, 201, "{project}");
    let (status, key) = c.call("POST", "/api/keys", r#"{"name": "k1", "projects": ["p1"]}"#);
    assert_eq!(status, 201, "{key}");
    let mut scoped = common::Client::new(h.addr, key["key"].as_str());
    assert_eq!(scoped.call("GET", "/api/templates", "").0, 200);
    assert_eq!(scoped.call("GET", "/api/templates/snap-1", "").0, 200);
    let (status, refused) = scoped.upload("/api/templates?name=mine", ROOTFS, &sample_rootfs());
    assert_eq!(status, 403, "{refused}");
    assert_eq!(scoped.call("DELETE", "/api/templates/snap-1", "").0, 403);
    assert_eq!(scoped.call("POST", &format!("/api/sandboxes/{id}/template"), r#"{"name": "x"}"#).0, 403);
}

#[test]
fn an_archive_larger_than_the_free_space_is_refused_with_413_before_it_is_stored() {
    // All but 4 MiB of the free space is kept in reserve; the archive announces 128 MiB.
    let probe = common::temp_dir("templates-full-probe");
    let free = appliance::capacity::free_disk_mb(&probe).expect("free space");
    let capacity =
        appliance::capacity::CapacityConfig { disk_reserve_mb: free.saturating_sub(4), ..common::roomy_capacity() };
    let h = Harness::start_with_capacity("templates-full", capacity);
    let mut c = h.client();
    let archive = vec![0u8; 128 << 20];
    let (status, answer) = c.upload("/api/templates?name=big", ROOTFS, &archive);
    assert_eq!(status, 413, "{answer}");
    assert!(answer["error"].as_str().expect("error").contains("free space on the data disk"), "{answer}");
    assert!(work_dir_is_empty(&h));
    // The connection was drained: the next request on it is answered.
    assert_eq!(c.call("GET", "/api/templates/big", "").0, 404);
}

#[test]
fn a_chunked_archive_is_refused_with_411() {
    use std::io::{BufRead, BufReader};
    let h = Harness::start("templates-chunked");
    let mut stream = std::net::TcpStream::connect(h.addr).expect("connect");
    let request = format!(
        "POST /api/templates?name=x HTTP/1.1\r\nHost: x\r\nX-API-Key: {}\r\nContent-Type: application/x-tar\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        common::ADMIN_KEY
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut status = String::new();
    BufReader::new(stream).read_line(&mut status).expect("status line");
    // A connection cut in the middle of a chunk could not be told from the end of the archive.
    assert!(status.starts_with("HTTP/1.1 411"), "{status}");
}

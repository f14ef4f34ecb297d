//! Image archive formats: OCI layouts (plain, gzip and zstd layers, nested indexes), docker
//! save archives, what their configs carry, and archives that are malformed, truncated, or do
//! not match their digests.

mod common;

use std::fs;

use common::{assert_invalid, config, docker_save, gzip, oci, oci_with, zstd, Outer, Scratch, Tar, GZIP, PLAIN, ZSTD};
use image_archive::{ArchiveKind, ImageConfig, Progress};
use serde_json::json;

fn run_config() -> serde_json::Value {
    json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin", "LANG=C.UTF-8"],
            "WorkingDir": "/app",
            "User": "1000:1000",
            "Entrypoint": ["/docker-entrypoint.sh"],
            "Cmd": ["node", "server.js"]
        },
        "rootfs": {"type": "layers", "diff_ids": []}
    })
}

fn expected_config() -> ImageConfig {
    ImageConfig {
        env: vec![("PATH".into(), "/usr/local/bin:/usr/bin".into()), ("LANG".into(), "C.UTF-8".into())],
        working_dir: Some("/app".into()),
        user: Some("1000:1000".into()),
        entrypoint: vec!["/docker-entrypoint.sh".into()],
        cmd: vec!["node".into(), "server.js".into()],
    }
}

#[test]
fn an_oci_layout_with_gzip_and_zstd_layers_carries_its_config() {
    let s = Scratch::new("oci");
    let base = Tar::new().file("etc/os-release", b"ID=base").file("bin/sh", b"sh").bytes();
    let middle = Tar::new().file("app/server.js", b"js").bytes();
    let top = Tar::new().file("app/.wh.server.js", b"").file("app/main.js", b"main").bytes();
    let archive = oci_with(&run_config(), &[(GZIP, gzip(&base)), (ZSTD, zstd(&middle)), (PLAIN, top)]);
    let mut reports: Vec<Progress> = Vec::new();
    let unpacked = s.image_with(&archive, common::LIMITS, &mut |p| reports.push(*p)).expect("unpack");
    assert_eq!(unpacked.kind, ArchiveKind::Oci);
    assert_eq!(unpacked.layers, 3);
    assert_eq!(unpacked.config, expected_config());
    assert_eq!(unpacked.unpacked_bytes, 7 + 2 + 2 + 4);
    assert_eq!(fs::read(s.path("etc/os-release")).expect("base"), b"ID=base");
    assert_eq!(fs::read(s.path("app/main.js")).expect("top"), b"main");
    assert!(!s.path("app/server.js").exists());
    let starts: Vec<(usize, usize, u64)> = reports.iter().map(|p| (p.layer, p.layers, p.bytes_in)).collect();
    assert_eq!(starts, [(1, 3, 0), (2, 3, 0), (3, 3, 0)], "one report at each layer's start");
    assert_eq!(reports[2].unpacked_bytes, 11, "bytes unpacked by the layers before");
    s.assert_contained();
}

#[test]
fn a_nested_index_is_followed_to_the_linux_amd64_image() {
    let s = Scratch::new("nested");
    let mut outer = Outer::default();
    let mut arm = outer.image(&config(), &[(PLAIN, Tar::new().file("arch", b"arm64").bytes())]);
    arm["platform"] = json!({"os": "linux", "architecture": "arm64"});
    let mut amd = outer.image(&run_config(), &[(GZIP, gzip(&Tar::new().file("arch", b"amd64").bytes()))]);
    amd["platform"] = json!({"os": "linux", "architecture": "amd64"});
    let mut attestation = outer.image(&config(), &[]);
    attestation["platform"] = json!({"os": "unknown", "architecture": "unknown"});
    let nested = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [arm, amd, attestation]});
    let nested = outer.blob("application/vnd.oci.image.index.v1+json", &serde_json::to_vec(&nested).expect("json"));
    outer.index(&[nested]);
    let unpacked = s.image(&outer.bytes()).expect("unpack");
    assert_eq!(fs::read(s.path("arch")).expect("arch"), b"amd64");
    assert_eq!(unpacked.config, expected_config());
    s.assert_contained();

    // An index with platforms but none of ours is refused, naming what it has.
    let s = Scratch::new("nested-arm");
    let mut outer = Outer::default();
    let mut arm = outer.image(&config(), &[]);
    arm["platform"] = json!({"os": "linux", "architecture": "arm64"});
    outer.index(&[arm]);
    assert_invalid(s.image(&outer.bytes()), "index.json has no linux/amd64 image (it has linux/arm64)");
    s.assert_contained();
}

#[test]
fn a_docker_save_archive_is_unpacked_and_checked_against_its_diff_ids() {
    let s = Scratch::new("docker");
    let base = Tar::new().file("etc/hostname", b"base").bytes();
    let top = Tar::new().file("etc/.wh.hostname", b"").file("srv/index.html", b"<p>").bytes();
    let archive = docker_save(&run_config(), &[base.clone(), top.clone()], &[base.clone(), top.clone()]).bytes();
    let unpacked = s.image(&archive).expect("unpack");
    assert_eq!((unpacked.kind, unpacked.layers), (ArchiveKind::Docker, 2));
    assert_eq!(unpacked.config, expected_config());
    assert!(!s.path("etc/hostname").exists());
    assert_eq!(fs::read(s.path("srv/index.html")).expect("top"), b"<p>");
    s.assert_contained();

    // Compressed layers are detected by their magic bytes; diff_ids are of the tar streams.
    let s = Scratch::new("docker-gz");
    let archive = docker_save(&run_config(), &[gzip(&base), zstd(&top)], &[base.clone(), top.clone()]).bytes();
    s.image(&archive).expect("compressed layers");
    assert!(s.path("srv/index.html").exists());
    s.assert_contained();

    // A layer whose content is not what the config's diff_ids say is refused.
    let s = Scratch::new("docker-diff");
    let other = Tar::new().file("etc/hostname", b"evil").bytes();
    let archive = docker_save(&run_config(), &[other, top.clone()], &[base.clone(), top.clone()]).bytes();
    let m = assert_invalid(s.image(&archive), "does not match its digest");
    assert!(m.starts_with("layer 1 (sha256:"), "{m}");
    s.assert_contained();
}

#[test]
fn docker_save_layers_may_be_symlinks_to_a_shared_layer_or_content_addressed() {
    let s = Scratch::new("docker-shared");
    let layer = Tar::new().file("shared", b"once").bytes();
    let mut outer = docker_save(&config(), std::slice::from_ref(&layer), &[layer.clone(), layer.clone()]);
    // manifest.json is rewritten to list the layer twice, the second time through a symlink.
    let manifest_at = outer.members.iter().position(|(p, _)| p == "manifest.json").expect("manifest");
    let (_, manifest) = outer.members.remove(manifest_at);
    let mut manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("json");
    manifest[0]["Layers"] = json!(["layer0/layer.tar", "layer1/layer.tar"]);
    let mut tar = Tar::new();
    for (path, data) in &outer.members {
        tar = tar.file(path, data);
    }
    let archive = tar
        .symlink("layer1/layer.tar", "../layer0/layer.tar")
        .file("manifest.json", &serde_json::to_vec(&manifest).expect("json"))
        .bytes();
    assert_eq!(s.image(&archive).expect("unpack").layers, 2);
    assert_eq!(fs::read(s.path("shared")).expect("shared"), b"once");
    s.assert_contained();

    // Newer docker names the config and layers by digest, which they are checked against.
    let s = Scratch::new("docker-blobs");
    let mut outer = Outer::default();
    let layer_desc = outer.blob(PLAIN, &layer);
    let config_desc =
        outer.blob("application/vnd.oci.image.config.v1+json", &serde_json::to_vec(&config()).expect("json"));
    let path = |d: &serde_json::Value| format!("blobs/sha256/{}", &d["digest"].as_str().expect("digest")[7..]);
    let manifest = json!([{"Config": path(&config_desc), "Layers": [path(&layer_desc)]}]);
    outer.add("manifest.json", &serde_json::to_vec(&manifest).expect("json"));
    assert_eq!(s.image(&outer.bytes()).expect("unpack").kind, ArchiveKind::Docker);
    assert!(s.path("shared").exists());
    s.assert_contained();
}

#[test]
fn index_json_is_preferred_when_valid_and_manifest_json_is_the_fallback() {
    let layer = Tar::new().file("from", b"oci").bytes();
    let docker_layer = Tar::new().file("from", b"docker").bytes();
    let both = |index_valid: bool| {
        let mut outer =
            docker_save(&config(), std::slice::from_ref(&docker_layer), std::slice::from_ref(&docker_layer));
        let manifest = outer.image(&config(), &[(PLAIN, layer.clone())]);
        if index_valid {
            outer.index(&[manifest]);
        } else {
            outer.add("index.json", b"{ this is not json");
        }
        outer.bytes()
    };
    let s = Scratch::new("prefer-oci");
    assert_eq!(s.image(&both(true)).expect("unpack").kind, ArchiveKind::Oci);
    assert_eq!(fs::read(s.path("from")).expect("from"), b"oci");
    let s = Scratch::new("prefer-docker");
    assert_eq!(s.image(&both(false)).expect("unpack").kind, ArchiveKind::Docker);
    assert_eq!(fs::read(s.path("from")).expect("from"), b"docker");
}

#[test]
fn a_layer_that_does_not_match_its_digest_is_refused() {
    let s = Scratch::new("mismatch");
    let good = Tar::new().file("f", b"good").bytes();
    let bad = Tar::new().file("f", b"evil").bytes();
    assert_eq!(good.len(), bad.len());
    let mut outer = Outer::default();
    let manifest = outer.image(&config(), &[(PLAIN, good.clone())]);
    outer.index(&[manifest]);
    let blob = format!("blobs/sha256/{}", common::sha256_hex(&good));
    for (path, data) in &mut outer.members {
        if *path == blob {
            data.clone_from(&bad);
        }
    }
    let m = assert_invalid(s.image(&outer.bytes()), "does not match its digest");
    assert_eq!(m, format!("layer 1 (sha256:{}) does not match its digest", common::sha256_hex(&good)));
    s.assert_contained();

    // A tampered manifest or config is refused before any layer is written.
    let s = Scratch::new("mismatch-config");
    let mut outer = Outer::default();
    let manifest = outer.image(&run_config(), &[(PLAIN, good.clone())]);
    outer.index(&[manifest]);
    let config_bytes = serde_json::to_vec(&run_config()).expect("json");
    let config_blob = format!("blobs/sha256/{}", common::sha256_hex(&config_bytes));
    for (path, data) in &mut outer.members {
        if *path == config_blob {
            *data = data.iter().map(|b| if *b == b'1' { b'0' } else { *b }).collect();
        }
    }
    assert_invalid(s.image(&outer.bytes()), "the image config (sha256:");
    assert!(!s.path("f").exists());
    s.assert_contained();
}

#[test]
fn missing_blobs_malformed_documents_and_unknown_formats_are_refused() {
    let layer = Tar::new().file("f", b"x").bytes();
    // A layer the manifest names but the archive lacks.
    let s = Scratch::new("missing");
    let mut outer = Outer::default();
    let manifest = outer.image(&config(), &[(PLAIN, layer.clone())]);
    outer.index(&[manifest]);
    let blob = format!("blobs/sha256/{}", common::sha256_hex(&layer));
    outer.members.retain(|(p, _)| *p != blob);
    let m = assert_invalid(s.image(&outer.bytes()), "is not in the archive");
    assert!(m.starts_with("layer 1 (sha256:"), "{m}");
    s.assert_contained();

    let s = Scratch::new("unknown-type");
    let archive = oci_with(&config(), &[("application/vnd.example.layer.v1.tar+lz4", layer.clone())]);
    assert_invalid(s.image(&archive), "is not a tar layer this appliance unpacks");

    let s = Scratch::new("bad-json");
    let mut outer = Outer::default();
    outer.add("oci-layout", b"{}");
    outer.add("index.json", br#"{"manifests": [{"digest": 5}]}"#);
    assert_invalid(s.image(&outer.bytes()), "index.json is not valid JSON of its kind");

    let s = Scratch::new("neither");
    let archive = Tar::new().file("etc/passwd", b"root:x:0:0").bytes();
    assert_invalid(s.image(&archive), "neither an OCI image layout (no index.json) nor a docker save archive");

    let s = Scratch::new("not-tar");
    assert_invalid(s.image(&[7u8; 4096]), "not a readable tar file");

    let s = Scratch::new("outer-gz");
    assert_invalid(s.image(&gzip(&oci(std::slice::from_ref(&layer)))), "the image archive is compressed");

    let s = Scratch::new("huge-json");
    let mut outer = Outer::default();
    outer.add("index.json", &vec![b' '; (4 << 20) + 1]);
    assert_invalid(s.image(&outer.bytes()), "index.json is 4194305 bytes, more than the 4194304 allowed");
}

#[test]
fn truncated_archives_are_refused() {
    let big: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let tar = Tar::new().file("a", b"first").file("big", &big).file("z", b"last").bytes();
    let end_marker = 1024;
    // Cut in the middle of a file's data, and exactly at a header boundary (no end marker).
    let cuts =
        [("mid-data", tar.len() / 2, "truncated"), ("boundary", tar.len() - end_marker, "end-of-archive marker")];
    for (tag, cut, why) in cuts {
        let s = Scratch::new(&format!("trunc-{tag}"));
        assert_invalid(s.rootfs(&tar[..cut]), why);
        s.assert_contained();
    }
    for (tag, compressed) in [("gz", gzip(&tar)), ("zst", zstd(&tar))] {
        let s = Scratch::new(&format!("trunc-{tag}"));
        assert!(matches!(s.rootfs(&compressed[..compressed.len() - 20]), Err(image_archive::Refusal::Invalid(_))));
        s.assert_contained();
    }
    // An outer archive cut short: its members run past the end of the file.
    let s = Scratch::new("trunc-outer");
    let archive = oci(std::slice::from_ref(&tar));
    let m = assert_invalid(s.image(&archive[..archive.len() - 1536]), "truncated");
    assert!(m.starts_with("the archive is truncated"), "{m}");
    s.assert_contained();
}

//! Archives for `POST /api/templates`, made on the host by the test's own code: no registry, no
//! docker. A Debian root filesystem (mmdebstrap `--variant=minbase` of the templates' suite plus
//! one package, `jq`, whose program the tests run) is wrapped as
//!
//! - an OCI image layout tar: layer 1 that root filesystem gzipped, layer 2 a small zstd layer
//!   of our own (`LAYER2`: a marker file, an empty `/dev`, a file, a directory and an opaque
//!   directory whited out, an absolute symlink, a hard link), and a config with `Env`,
//!   `WorkingDir`, `Entrypoint` and `Cmd`;
//! - a `docker save` archive of the same two layers, uncompressed, as docker writes them, whose
//!   config also names a `User` (`nobody`);
//! - small hostile archives the appliance must refuse (`HOSTILE`).
//!
//! The root filesystem is a cache entry keyed by the suite, the package and the recipe (like the
//! templates of image/src/template.rs); the archives are a cache entry keyed by the root
//! filesystem and this file's own text, so a change here rebuilds them. Everything is written to
//! files and streamed; nothing large is held in memory.

use flate2::write::GzEncoder;
use flate2::Compression;
use image::cache::{self, Entry};
use image::err;
use image::error::{Context, Result};
use image::progress::{fmt_duration, fmt_size};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tar::{EntryType, Header};

/// The package installed beyond minbase; its program is what the tests run in the sandboxes.
pub const EXTRA_PACKAGE: &str = "jq";
/// The image config's `WorkingDir` (made by layer 2).
pub const WORKING_DIR: &str = "/opt/oc-e2e";
/// A file layer 2 adds, and what it holds.
pub const MARKER: &str = "/opt/oc-e2e/marker";
pub const MARKER_TEXT: &str = "added by the second layer of qemu-test's template fixture";
/// `PATH` in the image config's `Env` (docker's default for Linux images).
pub const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The environment variable both configs set: `oci` in the OCI archive, `docker` in the other.
pub const IMAGE_ENV: &str = "OC_E2E_IMAGE";
/// The docker-save config's `User` (minbase's `nobody`); the OCI config's is empty (root).
pub const DOCKER_USER: &str = "nobody";
/// Entrypoint and Cmd of both configs: recorded by the appliance, never run.
pub const ENTRYPOINT: &[&str] = &["/bin/sh", "-c"];
pub const CMD: &[&str] = &["jq --version"];
/// A file of layer 1 (base-files' motd) that layer 2 whites out (`etc/.wh.motd`).
pub const WHITED_OUT_FILE: &str = "/etc/motd";
/// A directory of layer 1 (jq's documentation) that layer 2 whites out (`usr/share/doc/.wh.jq`).
pub const WHITED_OUT_DIR: &str = "/usr/share/doc/jq";
/// A directory of layer 1 that layer 2 makes opaque (`.wh..wh..opq`): afterwards it holds only
/// `OPAQUE_DIR_KEEPS` (from layer 2), not base-files' `10-uname`.
pub const OPAQUE_DIR: &str = "/etc/update-motd.d";
pub const OPAQUE_DIR_KEEPS: &str = "50-oc-e2e";
/// An absolute symlink layer 2 adds (kept as it is: it resolves inside the sandbox's root).
pub const JQ_LINK: &str = "/opt/oc-e2e/jq";
/// A hard link layer 2 adds to `MARKER`.
pub const MARKER_LINK: &str = "/opt/oc-e2e/marker.link";

/// Content types of the two kinds of upload.
pub const IMAGE_ARCHIVE_TYPE: &str = "application/x-tar";
pub const ROOTFS_TYPE: &str = "application/vnd.opencomputer.rootfs+tar";

/// Every time in the archives (tar entries, the config's `created`): image/src/lib.rs's.
const MTIME: u64 = image::SOURCE_DATE_EPOCH as u64;
const ROOTFS_RECIPE: &str = "minbase, --skip=output/dev, SOURCE_DATE_EPOCH, v1";
const INDEX_FILE: &str = "archives.json";

/// One archive file and what the appliance should report as its `sourceDigest`.
#[derive(Clone, Debug)]
pub struct Archive {
    pub path: PathBuf,
    pub bytes: u64,
    /// Hex SHA-256 of the whole file.
    pub sha256: String,
}

impl Archive {
    pub fn mib(&self) -> f64 {
        self.bytes as f64 / f64::from(1 << 20)
    }
}

/// An archive the appliance must refuse with 400.
#[derive(Clone, Debug)]
pub struct Hostile {
    /// What is wrong with it.
    pub what: &'static str,
    pub content_type: &'static str,
    pub archive: Archive,
}

pub struct Fixture {
    /// The mmdebstrap root filesystem (plain tar) both image archives are made of.
    pub rootfs_tar: PathBuf,
    pub oci: Archive,
    pub docker: Archive,
    pub hostile: Vec<Hostile>,
}

/// The hostile archives: (file, what, content type). Built by `write_hostile`.
const HOSTILE: &[(&str, &str, &str)] = &[
    ("hostile-traversal.tar", "an OCI layer entry named ../../oc-e2e-escape", IMAGE_ARCHIVE_TYPE),
    ("hostile-symlink.tar", "a root filesystem tarball writing through a symlink to /tmp", ROOTFS_TYPE),
    ("hostile-digest.tar", "an OCI layer whose bytes do not match its digest", IMAGE_ARCHIVE_TYPE),
    ("hostile-garbage.tar", "bytes that are no archive at all", IMAGE_ARCHIVE_TYPE),
];

/// Builds (or takes from the cache) the root filesystem and every archive; prints what it did
/// and how long it took.
pub fn build() -> Result<Fixture> {
    let started = Instant::now();
    let rootfs_tar = rootfs()?;
    let rootfs_key = rootfs_key();
    let code: &[u8] = include_bytes!("template_fixture.rs");
    let key = cache::key(&[("rootfs", rootfs_key.as_bytes()), ("fixture code", code)]);
    let entry = Entry::new("template-fixture", &key);
    if entry.is_complete() {
        eprintln!("[qemu-test] template fixture: archives cached in {}", entry.dir.display());
    } else {
        eprintln!("[qemu-test] template fixture: writing the OCI, docker-save and hostile archives");
        let archives_started = Instant::now();
        entry.fill(|dir| write_archives(&rootfs_tar, dir))?;
        eprintln!("[qemu-test] template fixture: archives written in {}", fmt_duration(archives_started.elapsed()));
    }
    let fixture = load(&entry.dir, rootfs_tar)?;
    eprintln!(
        "[qemu-test] template fixture ready in {}: rootfs {}, OCI archive {}, docker-save archive {}",
        fmt_duration(started.elapsed()),
        fmt_size(std::fs::metadata(&fixture.rootfs_tar).map_or(0, |m| m.len())),
        fmt_size(fixture.oci.bytes),
        fmt_size(fixture.docker.bytes)
    );
    Ok(fixture)
}

fn rootfs_key() -> String {
    cache::key(&[
        ("suite", image::template::SUITE.as_bytes()),
        ("packages", EXTRA_PACKAGE.as_bytes()),
        ("recipe", ROOTFS_RECIPE.as_bytes()),
    ])
}

/// The root filesystem tar: mmdebstrap minbase with `EXTRA_PACKAGE`, without the device nodes
/// mmdebstrap adds under ./dev (image layers carry none; the appliance refuses them).
fn rootfs() -> Result<PathBuf> {
    let entry = Entry::new("rootfs-e2e-image", &rootfs_key());
    if !entry.is_complete() {
        image::host::ensure(&[image::host::tool("mmdebstrap", "mmdebstrap")])?;
        let suite = image::template::SUITE;
        eprintln!(
            "[qemu-test] template fixture: mmdebstrap {suite} minbase with {EXTRA_PACKAGE} (root and the network)"
        );
        let started = Instant::now();
        entry.fill(|dir| {
            image::host::run_quiet(
                Command::new("mmdebstrap")
                    .args([
                        "--variant=minbase",
                        "--quiet",
                        "--mode=root",
                        "--skip=output/dev",
                        &format!("--include={EXTRA_PACKAGE}"),
                        suite,
                    ])
                    .arg(dir.join("rootfs.tar"))
                    .env("SOURCE_DATE_EPOCH", image::SOURCE_DATE_EPOCH.to_string()),
            )
            .map(|_| ())
        })?;
        eprintln!("[qemu-test] template fixture: mmdebstrap took {}", fmt_duration(started.elapsed()));
    }
    Ok(entry.path("rootfs.tar"))
}

/// The archives of a complete cache entry, as `write_archives` listed them.
fn load(dir: &Path, rootfs_tar: PathBuf) -> Result<Fixture> {
    let index_path = dir.join(INDEX_FILE);
    let text = std::fs::read_to_string(&index_path).ctx(|| format!("read {}", index_path.display()))?;
    let index: Value = serde_json::from_str(&text).map_err(|e| err!("{}: {e}", index_path.display()))?;
    let archive = |file: &str| -> Result<Archive> {
        let e = &index[file];
        Ok(Archive {
            path: dir.join(file),
            bytes: e["bytes"].as_u64().ok_or_else(|| err!("{INDEX_FILE} lacks {file}"))?,
            sha256: e["sha256"].as_str().ok_or_else(|| err!("{INDEX_FILE} lacks {file}"))?.to_string(),
        })
    };
    let hostile = HOSTILE
        .iter()
        .map(|&(file, what, content_type)| Ok(Hostile { what, content_type, archive: archive(file)? }))
        .collect::<Result<Vec<_>>>()?;
    Ok(Fixture { rootfs_tar, oci: archive("oci.tar")?, docker: archive("docker.tar")?, hostile })
}

/// Writes `oci.tar`, `docker.tar`, the hostile archives and `INDEX_FILE` (each archive's size
/// and SHA-256) into `dir`.
pub fn write_archives(rootfs_tar: &Path, dir: &Path) -> Result<()> {
    let mut index = serde_json::Map::new();
    let mut record = |file: &str, (bytes, sha256): (u64, String)| {
        index.insert(file.to_string(), json!({"bytes": bytes, "sha256": sha256}));
    };
    let started = Instant::now();
    let layer1_gz = dir.join("layer1.tar.gz.tmp");
    let layer1 = gzip_layer(rootfs_tar, &layer1_gz)?;
    eprintln!(
        "[qemu-test] template fixture: rootfs layer gzipped in {} ({} -> {})",
        fmt_duration(started.elapsed()),
        fmt_size(layer1.diff_size),
        fmt_size(layer1.size)
    );
    let layer2_tar = layer2()?;
    let layer2_diff = sha256_hex(&layer2_tar);
    record("oci.tar", write_oci(dir, &layer1, &layer1_gz, &layer2_tar, &layer2_diff)?);
    std::fs::remove_file(&layer1_gz).ctx(|| format!("remove {}", layer1_gz.display()))?;
    let layers = [
        DockerLayer {
            diff_id: layer1.diff_id.clone(),
            size: layer1.diff_size,
            content: LayerContent::File(rootfs_tar),
        },
        DockerLayer {
            diff_id: layer2_diff.clone(),
            size: layer2_tar.len() as u64,
            content: LayerContent::Bytes(&layer2_tar),
        },
    ];
    record("docker.tar", write_docker(&dir.join("docker.tar"), &layers)?);
    for &(file, _, _) in HOSTILE {
        record(file, write_hostile(file, &dir.join(file))?);
    }
    let index_path = dir.join(INDEX_FILE);
    std::fs::write(&index_path, Value::Object(index).to_string()).ctx(|| format!("write {}", index_path.display()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    cache::hex(&Sha256::digest(bytes))
}

/// A writer that hashes and counts what goes through it.
struct Hashing<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Hashing<W> {
        Hashing { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// Flushes and answers (bytes, hex SHA-256).
    fn finish(mut self) -> io::Result<(u64, String)> {
        self.inner.flush()?;
        Ok((self.bytes, cache::hex(&self.hasher.finalize())))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn create(path: &Path) -> Result<Hashing<BufWriter<File>>> {
    let file = File::create(path).ctx(|| format!("create {}", path.display()))?;
    Ok(Hashing::new(BufWriter::with_capacity(1 << 20, file)))
}

/// A compressed layer: its blob's digest and size, and the uncompressed tar's (the config's
/// `diff_ids`).
struct Layer {
    digest: String,
    size: u64,
    diff_id: String,
    diff_size: u64,
}

/// Gzips `tar` into `out` in one pass, hashing both sides.
fn gzip_layer(tar: &Path, out: &Path) -> Result<Layer> {
    let mut input = File::open(tar).ctx(|| format!("open {}", tar.display()))?;
    let mut diff = Hashing::new(io::sink());
    // Level 6, as docker and skopeo write; the gzip header's time is 0.
    let mut gz = GzEncoder::new(create(out)?, Compression::default());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buf).ctx(|| format!("read {}", tar.display()))?;
        if n == 0 {
            break;
        }
        diff.write_all(&buf[..n]).ctx(|| "hash the layer".into())?;
        gz.write_all(&buf[..n]).ctx(|| format!("write {}", out.display()))?;
    }
    let (size, digest) = gz.finish().and_then(Hashing::finish).ctx(|| format!("write {}", out.display()))?;
    let (diff_size, diff_id) = diff.finish().ctx(|| "hash the layer".into())?;
    Ok(Layer { digest, size, diff_id, diff_size })
}

/// A tar header owned by root, with the fixture's time.
fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h
}

fn dir_entry<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> io::Result<()> {
    tar.append_data(&mut header(EntryType::Directory, 0o755, 0), path, io::empty())
}

fn file_entry<W: Write>(tar: &mut tar::Builder<W>, path: &str, mode: u32, content: &[u8]) -> io::Result<()> {
    tar.append_data(&mut header(EntryType::Regular, mode, content.len() as u64), path, content)
}

fn link_entry<W: Write>(tar: &mut tar::Builder<W>, kind: EntryType, path: &str, target: &str) -> io::Result<()> {
    tar.append_link(&mut header(kind, 0o777, 0), path, target)
}

/// Layer 2, as a plain tar: what an image's own Dockerfile lines would add on top of Debian.
/// Paths without `./` (as docker writes them; layer 1's have it, as GNU tar writes them).
fn layer2() -> Result<Vec<u8>> {
    let rel = |p: &str| p.trim_start_matches('/').to_string();
    let (dir, name) = WHITED_OUT_DIR.rsplit_once('/').unwrap_or_default();
    let (file_dir, file_name) = WHITED_OUT_FILE.rsplit_once('/').unwrap_or_default();
    let build = || -> io::Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        // mmdebstrap's ./dev (device nodes only) was left out: the mount point comes back here.
        dir_entry(&mut tar, "dev/")?;
        dir_entry(&mut tar, &format!("{}/", rel(file_dir)))?;
        file_entry(&mut tar, &format!("{}/.wh.{file_name}", rel(file_dir)), 0o644, b"")?;
        dir_entry(&mut tar, &format!("{}/", rel(OPAQUE_DIR)))?;
        file_entry(&mut tar, &format!("{}/.wh..wh..opq", rel(OPAQUE_DIR)), 0o644, b"")?;
        file_entry(&mut tar, &format!("{}/{OPAQUE_DIR_KEEPS}", rel(OPAQUE_DIR)), 0o755, b"#!/bin/sh\necho oc-e2e\n")?;
        dir_entry(&mut tar, "opt/")?;
        dir_entry(&mut tar, &format!("{}/", rel(WORKING_DIR)))?;
        file_entry(&mut tar, &rel(MARKER), 0o644, format!("{MARKER_TEXT}\n").as_bytes())?;
        link_entry(&mut tar, EntryType::Link, &rel(MARKER_LINK), &rel(MARKER))?;
        link_entry(&mut tar, EntryType::Symlink, &rel(JQ_LINK), "/usr/bin/jq")?;
        for d in ["usr/", "usr/share/", &format!("{}/", rel(dir))] {
            dir_entry(&mut tar, d)?;
        }
        file_entry(&mut tar, &format!("{}/.wh.{name}", rel(dir)), 0o644, b"")?;
        tar.into_inner()
    };
    build().ctx(|| "build the second layer".into())
}

/// The image config (OCI and docker share the format); `image` is `IMAGE_ENV`'s value.
fn config(image: &str, user: &str, diff_ids: &[&str]) -> Vec<u8> {
    let created = "2000-01-01T00:00:00Z";
    let debian = format!("mmdebstrap --variant=minbase --include={EXTRA_PACKAGE} {}", image::template::SUITE);
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "Env": [format!("PATH={IMAGE_PATH}"), format!("{IMAGE_ENV}={image}")],
            "WorkingDir": WORKING_DIR,
            "User": user,
            "Entrypoint": ENTRYPOINT,
            "Cmd": CMD,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|d| format!("sha256:{d}")).collect::<Vec<_>>()},
        "history": [
            {"created": created, "created_by": debian},
            {"created": created, "created_by": "qemu-test template fixture: marker, whiteouts, links"},
        ],
    });
    config.to_string().into_bytes()
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> Value {
    json!({"mediaType": media_type, "digest": format!("sha256:{digest}"), "size": size})
}

/// The OCI image layout tar, blobs first and `index.json` last (as skopeo writes it).
fn write_oci(
    dir: &Path,
    layer1: &Layer,
    layer1_gz: &Path,
    layer2_tar: &[u8],
    layer2_diff: &str,
) -> Result<(u64, String)> {
    let layer2_zst = zstd::encode_all(layer2_tar, 3).ctx(|| "zstd the second layer".into())?;
    let layer2_descriptor =
        descriptor("application/vnd.oci.image.layer.v1.tar+zstd", &sha256_hex(&layer2_zst), layer2_zst.len() as u64);
    let config = config("oci", "", &[&layer1.diff_id, layer2_diff]);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &sha256_hex(&config), config.len() as u64),
        "layers": [
            descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer1.digest, layer1.size),
            layer2_descriptor,
        ],
    })
    .to_string()
    .into_bytes();
    let mut manifest_descriptor =
        descriptor("application/vnd.oci.image.manifest.v1+json", &sha256_hex(&manifest), manifest.len() as u64);
    manifest_descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": "oc-e2e"});
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    })
    .to_string()
    .into_bytes();

    let path = dir.join("oci.tar");
    let mut tar = tar::Builder::new(create(&path)?);
    let write = |tar: &mut tar::Builder<Hashing<BufWriter<File>>>| -> io::Result<()> {
        dir_entry(tar, "blobs/")?;
        dir_entry(tar, "blobs/sha256/")?;
        let mut gz = File::open(layer1_gz)?;
        let mut h = header(EntryType::Regular, 0o644, layer1.size);
        tar.append_data(&mut h, format!("blobs/sha256/{}", layer1.digest), &mut gz)?;
        for blob in [&layer2_zst, &config, &manifest] {
            file_entry(tar, &format!("blobs/sha256/{}", sha256_hex(blob)), 0o644, blob)?;
        }
        file_entry(tar, "oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        file_entry(tar, "index.json", 0o644, &index)
    };
    write(&mut tar).ctx(|| format!("write {}", path.display()))?;
    tar.into_inner().and_then(Hashing::finish).ctx(|| format!("write {}", path.display()))
}

enum LayerContent<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

/// A `docker save` layer: uncompressed, as docker writes them.
struct DockerLayer<'a> {
    diff_id: String,
    size: u64,
    content: LayerContent<'a>,
}

/// A `docker save` archive as docker before 25.0 wrote it: one directory per layer (`VERSION`,
/// `json`, `layer.tar`), the config as `<hex>.json`, then `manifest.json` and `repositories`.
fn write_docker(path: &Path, layers: &[DockerLayer]) -> Result<(u64, String)> {
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let config = config("docker", DOCKER_USER, &diff_ids);
    let config_name = format!("{}.json", sha256_hex(&config));
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": ["oc-e2e/jq:docker"],
        "Layers": layers.iter().map(|l| format!("{}/layer.tar", l.diff_id)).collect::<Vec<_>>(),
    }])
    .to_string()
    .into_bytes();
    let top = layers.last().map_or("", |l| l.diff_id.as_str());
    let repositories = json!({"oc-e2e/jq": {"docker": top}}).to_string().into_bytes();

    let mut tar = tar::Builder::new(create(path)?);
    let write = |tar: &mut tar::Builder<Hashing<BufWriter<File>>>| -> io::Result<()> {
        let mut parent: Option<&str> = None;
        for layer in layers {
            let id = layer.diff_id.as_str();
            dir_entry(tar, &format!("{id}/"))?;
            file_entry(tar, &format!("{id}/VERSION"), 0o644, b"1.0")?;
            let mut json = json!({"id": id, "created": "2000-01-01T00:00:00Z"});
            if let Some(parent) = parent {
                json["parent"] = json!(parent);
            }
            file_entry(tar, &format!("{id}/json"), 0o644, json.to_string().as_bytes())?;
            let mut h = header(EntryType::Regular, 0o644, layer.size);
            match layer.content {
                LayerContent::File(file) => tar.append_data(&mut h, format!("{id}/layer.tar"), File::open(file)?)?,
                LayerContent::Bytes(bytes) => tar.append_data(&mut h, format!("{id}/layer.tar"), bytes)?,
            }
            parent = Some(id);
        }
        file_entry(tar, &config_name, 0o644, &config)?;
        file_entry(tar, "manifest.json", 0o644, &manifest)?;
        file_entry(tar, "repositories", 0o644, &repositories)
    };
    write(&mut tar).ctx(|| format!("write {}", path.display()))?;
    tar.into_inner().and_then(Hashing::finish).ctx(|| format!("write {}", path.display()))
}

/// A one-layer OCI archive of the plain tar `layer`; with `stored` the blob file holds those
/// bytes instead (under `layer`'s digest).
fn small_oci(path: &Path, layer: &[u8], stored: Option<&[u8]>) -> io::Result<(u64, String)> {
    let config = config("hostile", "", &[&sha256_hex(layer)]);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &sha256_hex(&config), config.len() as u64),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", &sha256_hex(layer), layer.len() as u64)],
    })
    .to_string()
    .into_bytes();
    let manifest_descriptor =
        descriptor("application/vnd.oci.image.manifest.v1+json", &sha256_hex(&manifest), manifest.len() as u64);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [manifest_descriptor],
    })
    .to_string()
    .into_bytes();
    let file = File::create(path)?;
    let mut tar = tar::Builder::new(Hashing::new(BufWriter::new(file)));
    file_entry(&mut tar, "oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    file_entry(&mut tar, "index.json", 0o644, &index)?;
    file_entry(&mut tar, &format!("blobs/sha256/{}", sha256_hex(layer)), 0o644, stored.unwrap_or(layer))?;
    for blob in [&config, &manifest] {
        file_entry(&mut tar, &format!("blobs/sha256/{}", sha256_hex(blob)), 0o644, blob)?;
    }
    tar.into_inner()?.finish()
}

/// The hostile archive `file` of `HOSTILE`.
fn write_hostile(file: &str, path: &Path) -> Result<(u64, String)> {
    let build = || -> io::Result<(u64, String)> {
        match file {
            "hostile-traversal.tar" => {
                let mut layer = tar::Builder::new(Vec::new());
                dir_entry(&mut layer, "etc/")?;
                // The tar crate refuses to write `..` through set_path: the name goes in raw.
                let name = b"../../oc-e2e-escape";
                let mut h = header(EntryType::Regular, 0o644, 6);
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                h.set_cksum();
                layer.append(&h, &b"owned\n"[..])?;
                small_oci(path, &layer.into_inner()?, None)
            }
            "hostile-symlink.tar" => {
                let file = File::create(path)?;
                let mut tar = tar::Builder::new(Hashing::new(BufWriter::new(file)));
                dir_entry(&mut tar, "etc/")?;
                // An absolute target is kept (it resolves inside the sandbox); followed on the host
                // while unpacking, the next entry would land in the host's /tmp.
                link_entry(&mut tar, EntryType::Symlink, "etc/out", "/tmp")?;
                file_entry(&mut tar, "etc/out/oc-e2e-escape", 0o644, b"owned\n")?;
                link_entry(&mut tar, EntryType::Symlink, "etc/up", "../../../../../../../../tmp")?;
                tar.into_inner()?.finish()
            }
            "hostile-digest.tar" => {
                let mut layer = tar::Builder::new(Vec::new());
                file_entry(&mut layer, "hello.txt", 0o644, b"hello\n")?;
                let layer = layer.into_inner()?;
                let mut tampered = layer.clone();
                let at = tampered.windows(6).position(|w| w == b"hello\n").unwrap_or(0);
                tampered[at] = b'j';
                small_oci(path, &layer, Some(&tampered))
            }
            _ => {
                let mut out = Hashing::new(BufWriter::new(File::create(path)?));
                out.write_all(&b"this is not a tar archive, nor gzip, nor zstd\n".repeat(64))?;
                out.finish()
            }
        }
    };
    build().ctx(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Every entry of a tar file: path -> bytes (directories and links with empty bodies).
    fn entries(path: &Path) -> BTreeMap<String, (EntryType, Vec<u8>)> {
        let mut archive = tar::Archive::new(File::open(path).expect("open"));
        let mut all = BTreeMap::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let name = entry.path().expect("path").to_string_lossy().into_owned();
            let kind = entry.header().entry_type();
            let mut body = Vec::new();
            entry.read_to_end(&mut body).expect("body");
            all.insert(name, (kind, body));
        }
        all
    }

    fn blob<'a>(all: &'a BTreeMap<String, (EntryType, Vec<u8>)>, descriptor: &Value) -> &'a [u8] {
        let digest = descriptor["digest"].as_str().expect("digest").strip_prefix("sha256:").expect("sha256");
        let body = &all[&format!("blobs/sha256/{digest}")].1;
        assert_eq!(sha256_hex(body), digest);
        assert_eq!(body.len() as u64, descriptor["size"].as_u64().expect("size"));
        body
    }

    fn names_in(layer_tar: &[u8]) -> Vec<String> {
        let mut archive = tar::Archive::new(layer_tar);
        archive
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry").path().expect("path").to_string_lossy().into_owned())
            .collect()
    }

    /// A few entries standing in for mmdebstrap's output (`./` paths, as GNU tar writes them).
    fn tiny_rootfs(path: &Path) {
        let mut tar = tar::Builder::new(File::create(path).expect("create"));
        for d in ["./", "./etc/", "./etc/update-motd.d/", "./opt/", "./usr/", "./usr/share/", "./usr/share/doc/jq/"] {
            dir_entry(&mut tar, d).expect("dir");
        }
        file_entry(&mut tar, "./etc/motd", 0o644, b"motd\n").expect("file");
        file_entry(&mut tar, "./etc/update-motd.d/10-uname", 0o755, b"uname\n").expect("file");
        file_entry(&mut tar, "./usr/share/doc/jq/README", 0o644, b"jq\n").expect("file");
        tar.finish().expect("finish");
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qemu-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn archives_are_consistent_layouts_with_correct_digests() {
        let dir = scratch("fixture");
        let rootfs = dir.join("rootfs.tar");
        tiny_rootfs(&rootfs);
        let out = dir.join("out");
        std::fs::create_dir(&out).expect("out");
        write_archives(&rootfs, &out).expect("archives");
        let fixture = load(&out, rootfs.clone()).expect("load");
        assert_eq!(fixture.oci.sha256, image::disk_image::sha256_file(&fixture.oci.path).expect("sha"));
        assert_eq!(fixture.oci.bytes, std::fs::metadata(&fixture.oci.path).expect("meta").len());
        assert!(!out.join("layer1.tar.gz.tmp").exists(), "the staging file is removed");

        // OCI: index -> manifest -> config and layers, every digest and size right.
        let oci = entries(&fixture.oci.path);
        assert_eq!(oci["oci-layout"].1, br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index: Value = serde_json::from_slice(&oci["index.json"].1).expect("index");
        let manifest: Value = serde_json::from_slice(blob(&oci, &index["manifests"][0])).expect("manifest");
        let config: Value = serde_json::from_slice(blob(&oci, &manifest["config"])).expect("config");
        assert_eq!(config["config"]["WorkingDir"], WORKING_DIR);
        assert_eq!(config["config"]["Env"][1], format!("{IMAGE_ENV}=oci"));
        let mut layer1 = Vec::new();
        flate2::read::GzDecoder::new(blob(&oci, &manifest["layers"][0])).read_to_end(&mut layer1).expect("gunzip");
        assert_eq!(layer1, std::fs::read(&rootfs).expect("rootfs"));
        let layer2 = zstd::decode_all(blob(&oci, &manifest["layers"][1])).expect("unzstd");
        for (layer, diff_id) in
            [(&layer1, &config["rootfs"]["diff_ids"][0]), (&layer2, &config["rootfs"]["diff_ids"][1])]
        {
            assert_eq!(diff_id.as_str(), Some(format!("sha256:{}", sha256_hex(layer)).as_str()));
        }
        let names = names_in(&layer2);
        for want in [
            "etc/.wh.motd",
            "etc/update-motd.d/.wh..wh..opq",
            "etc/update-motd.d/50-oc-e2e",
            "opt/oc-e2e/marker",
            "opt/oc-e2e/marker.link",
            "opt/oc-e2e/jq",
            "usr/share/doc/.wh.jq",
            "dev",
        ] {
            assert!(names.iter().any(|n| n.trim_end_matches('/') == want), "{want} not in {names:?}");
        }

        // docker save: manifest.json names the config and layer tars it holds.
        let docker = entries(&fixture.docker.path);
        let manifest: Value = serde_json::from_slice(&docker["manifest.json"].1).expect("manifest.json");
        let config_name = manifest[0]["Config"].as_str().expect("Config");
        let config: Value = serde_json::from_slice(&docker[config_name].1).expect("config");
        assert_eq!(config["config"]["Env"][1], format!("{IMAGE_ENV}=docker"));
        assert_eq!(config["config"]["User"], DOCKER_USER);
        let layers = manifest[0]["Layers"].as_array().expect("Layers");
        assert_eq!(docker[layers[0].as_str().expect("layer")].1, layer1);
        assert_eq!(docker[layers[1].as_str().expect("layer")].1, layer2);
        for (i, layer) in layers.iter().enumerate() {
            let body = &docker[layer.as_str().expect("layer")].1;
            assert_eq!(config["rootfs"]["diff_ids"][i].as_str(), Some(format!("sha256:{}", sha256_hex(body)).as_str()));
        }

        // The hostile ones are what they claim to be.
        assert_eq!(fixture.hostile.len(), HOSTILE.len());
        let traversal = entries(&fixture.hostile[0].archive.path);
        let index: Value = serde_json::from_slice(&traversal["index.json"].1).expect("index");
        let manifest: Value = serde_json::from_slice(blob(&traversal, &index["manifests"][0])).expect("manifest");
        let layer = blob(&traversal, &manifest["layers"][0]);
        let mut raw = tar::Archive::new(layer);
        let names: Vec<Vec<u8>> =
            raw.entries().expect("entries").map(|e| e.expect("entry").path_bytes().into_owned()).collect();
        assert!(names.iter().any(|n| n == b"../../oc-e2e-escape"), "{names:?}");
        let tampered = entries(&fixture.hostile[2].archive.path);
        let index: Value = serde_json::from_slice(&tampered["index.json"].1).expect("index");
        let manifest: Value = serde_json::from_slice(blob(&tampered, &index["manifests"][0])).expect("manifest");
        let digest = manifest["layers"][0]["digest"].as_str().expect("digest").strip_prefix("sha256:").expect("hex");
        assert_ne!(sha256_hex(&tampered[&format!("blobs/sha256/{digest}")].1), digest, "the layer is tampered with");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

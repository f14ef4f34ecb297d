//! Archives built in the test (tar layers, OCI layouts, docker save archives) and a scratch
//! directory holding the root, a sentinel next to it that must stay untouched, and the archive.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use image_archive::{unpack_image, unpack_rootfs, Limits, Progress, Refusal, Unpacked};
use serde_json::{json, Value};
use tar::{EntryType, Header};

pub const LIMITS: Limits = Limits { max_unpacked_bytes: 64 << 20, max_entries: 10_000 };
pub const MTIME: u64 = 1_600_000_000;
pub const PLAIN: &str = "application/vnd.oci.image.layer.v1.tar";
pub const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

pub struct Scratch {
    pub dir: PathBuf,
    pub root: PathBuf,
    pub sentinel: PathBuf,
    pub archive: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("image-archive-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (root, sentinel, archive) = (dir.join("root"), dir.join("sentinel"), dir.join("archive.tar"));
        fs::create_dir_all(&root).expect("root");
        fs::create_dir_all(&sentinel).expect("sentinel");
        fs::write(sentinel.join("keep"), b"untouched").expect("keep");
        Scratch { dir, root, sentinel, archive }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn rootfs(&self, archive: &[u8]) -> Result<Unpacked, Refusal> {
        self.rootfs_limited(archive, LIMITS)
    }

    pub fn rootfs_limited(&self, archive: &[u8], limits: Limits) -> Result<Unpacked, Refusal> {
        fs::write(&self.archive, archive).expect("archive");
        unpack_rootfs(&self.archive, &self.root, &limits, &mut |_| {})
    }

    pub fn image(&self, archive: &[u8]) -> Result<Unpacked, Refusal> {
        self.image_with(archive, LIMITS, &mut |_| {})
    }

    pub fn image_with(
        &self,
        archive: &[u8],
        limits: Limits,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Unpacked, Refusal> {
        fs::write(&self.archive, archive).expect("archive");
        unpack_image(&self.archive, &self.root, &limits, progress)
    }

    /// Nothing was written next to the root: the scratch directory holds only what the test
    /// made, and the sentinel only its one file.
    #[track_caller]
    pub fn assert_contained(&self) {
        let names = |dir: &Path| -> BTreeSet<String> {
            fs::read_dir(dir).expect("list").map(|e| e.expect("entry").file_name().to_string_lossy().into()).collect()
        };
        let allowed: BTreeSet<String> = ["archive.tar", "root", "sentinel"].map(String::from).into();
        let found = names(&self.dir);
        assert!(found.is_subset(&allowed) && found.contains("sentinel"), "written next to the root: {found:?}");
        assert_eq!(names(&self.sentinel), BTreeSet::from(["keep".to_string()]), "the sentinel directory changed");
        assert_eq!(fs::read(self.sentinel.join("keep")).expect("keep"), b"untouched");
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[track_caller]
pub fn assert_invalid(result: Result<Unpacked, Refusal>, needle: &str) -> String {
    match result {
        Err(Refusal::Invalid(m)) => {
            assert!(m.contains(needle), "expected {needle:?} in: {m}");
            m
        }
        other => panic!("expected Invalid containing {needle:?}, got {other:?}"),
    }
}

#[track_caller]
pub fn assert_too_large(result: Result<Unpacked, Refusal>, needle: &str) -> String {
    match result {
        Err(Refusal::TooLarge(m)) => {
            assert!(m.contains(needle), "expected {needle:?} in: {m}");
            m
        }
        other => panic!("expected TooLarge containing {needle:?}, got {other:?}"),
    }
}

/// A tar stream built entry by entry (GNU headers, mtime `MTIME`, owned by 0:0 unless said).
pub struct Tar {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for Tar {
    fn default() -> Self {
        Tar::new()
    }
}

impl Tar {
    pub fn new() -> Tar {
        let mut builder = tar::Builder::new(Vec::new());
        builder.preserve_absolute(true);
        Tar { builder }
    }

    fn header(kind: EntryType, mode: u32, size: u64) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header
    }

    pub fn file(self, path: &str, data: &[u8]) -> Tar {
        self.file_with(path, data, 0o644, (0, 0), MTIME)
    }

    pub fn file_with(mut self, path: &str, data: &[u8], mode: u32, (uid, gid): (u64, u64), mtime: u64) -> Tar {
        let mut header = Tar::header(EntryType::Regular, mode, data.len() as u64);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_mtime(mtime);
        self.builder.append_data(&mut header, path, data).expect("file");
        self
    }

    pub fn dir(self, path: &str, mode: u32) -> Tar {
        self.dir_with(path, mode, (0, 0), MTIME)
    }

    pub fn dir_with(mut self, path: &str, mode: u32, (uid, gid): (u64, u64), mtime: u64) -> Tar {
        let mut header = Tar::header(EntryType::Directory, mode, 0);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_mtime(mtime);
        self.builder.append_data(&mut header, path, std::io::empty()).expect("dir");
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Tar {
        let mut header = Tar::header(EntryType::Symlink, 0o777, 0);
        self.builder.append_link(&mut header, path, target).expect("symlink");
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Tar {
        let mut header = Tar::header(EntryType::Link, 0o644, 0);
        self.builder.append_link(&mut header, path, target).expect("hard link");
        self
    }

    pub fn fifo(mut self, path: &str, mode: u32) -> Tar {
        let mut header = Tar::header(EntryType::Fifo, mode, 0);
        self.builder.append_data(&mut header, path, std::io::empty()).expect("fifo");
        self
    }

    /// PAX records for the next entry.
    pub fn pax(mut self, records: &[(&str, &[u8])]) -> Tar {
        self.builder.append_pax_extensions(records.iter().copied()).expect("pax");
        self
    }

    /// An entry written byte for byte: name and link name as given (no checks), any type.
    pub fn raw(mut self, name: &[u8], kind: EntryType, link: &[u8], data: &[u8]) -> Tar {
        let mut header = Tar::header(kind, 0o644, data.len() as u64);
        let gnu = header.as_gnu_mut().expect("gnu");
        gnu.name[..name.len()].copy_from_slice(name);
        gnu.linkname[..link.len()].copy_from_slice(link);
        header.set_cksum();
        self.builder.append(&header, data).expect("raw");
        self
    }

    /// The stream with its end-of-archive marker.
    pub fn bytes(self) -> Vec<u8> {
        self.builder.into_inner().expect("finish")
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).expect("zstd")
}

pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The members of an outer archive, in order.
#[derive(Default)]
pub struct Outer {
    pub members: Vec<(String, Vec<u8>)>,
}

impl Outer {
    pub fn add(&mut self, path: &str, data: &[u8]) {
        self.members.push((path.to_string(), data.to_vec()));
    }

    /// Adds a blob under blobs/sha256/ and returns its descriptor.
    pub fn blob(&mut self, media_type: &str, data: &[u8]) -> Value {
        let hex = sha256_hex(data);
        self.add(&format!("blobs/sha256/{hex}"), data);
        json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()})
    }

    /// Adds the config, layers and manifest blobs of one image; returns the manifest's descriptor.
    pub fn image(&mut self, config: &Value, layers: &[(&str, Vec<u8>)]) -> Value {
        let config = self.blob("application/vnd.oci.image.config.v1+json", &serde_json::to_vec(config).expect("json"));
        let layers: Vec<Value> = layers.iter().map(|(media_type, data)| self.blob(media_type, data)).collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": layers,
        });
        self.blob("application/vnd.oci.image.manifest.v1+json", &serde_json::to_vec(&manifest).expect("json"))
    }

    /// Adds oci-layout and index.json listing `manifests`.
    pub fn index(&mut self, manifests: &[Value]) {
        self.add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index =
            json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
        self.add("index.json", &serde_json::to_vec(&index).expect("json"));
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut tar = Tar::new();
        for (path, data) in &self.members {
            tar = tar.file(path, data);
        }
        tar.bytes()
    }
}

pub fn config() -> Value {
    json!({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": []}})
}

/// An OCI layout of one image made of these uncompressed layers.
pub fn oci(layers: &[Vec<u8>]) -> Vec<u8> {
    let layers: Vec<(&str, Vec<u8>)> = layers.iter().map(|l| (PLAIN, l.clone())).collect();
    oci_with(&config(), &layers)
}

pub fn oci_with(config: &Value, layers: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut outer = Outer::default();
    let manifest = outer.image(config, layers);
    outer.index(&[manifest]);
    outer.bytes()
}

/// A docker save archive as docker before 25 wrote it: `<hex>.json`, `<n>/layer.tar` (as given,
/// uncompressed or not), manifest.json; the config lists the diff_ids of the given tar streams.
pub fn docker_save(config: &Value, layers: &[Vec<u8>], diff_ids_of: &[Vec<u8>]) -> Outer {
    let mut config = config.clone();
    config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids_of.iter().map(|l| format!("sha256:{}", sha256_hex(l))).collect::<Vec<_>>()});
    let config_bytes = serde_json::to_vec(&config).expect("json");
    let config_name = format!("{}.json", sha256_hex(&config_bytes));
    let mut outer = Outer::default();
    outer.add(&config_name, &config_bytes);
    let mut names = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        outer.add(&name, layer);
        names.push(name);
    }
    let manifest = json!([{"Config": config_name, "RepoTags": ["test:latest"], "Layers": names}]);
    outer.add("manifest.json", &serde_json::to_vec(&manifest).expect("json"));
    outer
}

pub fn lgetxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    let name = std::ffi::CString::new(name).expect("name");
    let mut buf = vec![0u8; 65536];
    // SAFETY: both strings are NUL-terminated and `buf` is writable for its length.
    let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

//! Uploaded archives (already on disk) turned into a root filesystem directory, from which the
//! appliance makes an ext4 template disk with `mke2fs -d <root>`. The tree is exact: numeric
//! owners, modes with setuid/setgid/sticky, mtimes, symlinks, hard links, FIFOs and extended
//! attributes, as the archive's headers give them. Everything hostile is refused, before it is
//! written where possible, and nothing is ever written outside `root`.
//!
//! Two inputs:
//! - [`unpack_image`]: an OCI image layout tar (`oci-layout`, `index.json`, `blobs/sha256/...`)
//!   or a `docker save` tar (`manifest.json`, the config, the layer tars). Newer docker writes
//!   both; `index.json` is used when it is present and valid. Blobs are read in place from the
//!   outer tar (it is indexed once, never extracted), and every blob used (index, manifest,
//!   config, layers) is checked against its SHA-256 digest while it is read.
//! - [`unpack_rootfs`]: one root filesystem tarball, plain, gzip or zstd.
//!
//! Decisions a caller relies on:
//! - On any [`Refusal`] the tree is half-written: the caller deletes `root`. Nothing outside
//!   `root` is touched either way.
//! - Symlinks are never followed while writing. An entry whose parent, or a hard link whose
//!   target, goes through a symlink already in the tree is refused rather than resolved.
//!   Absolute symlink targets are kept as they are: inside the sandbox they resolve against its
//!   own root, and nothing on the host follows them (`mke2fs -d` copies links as links). A
//!   relative target that climbs above the root, resolved lexically from the link's directory
//!   (`a/b -> ../../etc`), is refused.
//! - A hard link must name a regular file already in the tree, by a relative path without
//!   `..`. The link shares the file's inode, so the link header's own metadata is not applied.
//! - Owners are the numeric uid/gid of the headers (user and group names are ignored). When
//!   not running as root, a chown refused with EPERM is ignored.
//! - Directory metadata (owner, mode, xattrs, mtime) is applied after the last layer, deepest
//!   first: creating entries would change a directory's mtime, and a read-only directory must
//!   still take its children. Parent directories an archive does not list are made 0755 and
//!   owned by the caller (root in production).
//! - Extended attributes come from PAX `SCHILY.xattr.*` records. One the filesystem refuses
//!   with EPERM or EOPNOTSUPP (a `security.*`/`trusted.*` attribute it does not take; `user.*`
//!   on a symlink or FIFO, which Linux never allows) is skipped and counted in
//!   [`Unpacked::skipped_xattrs`].
//! - Compression is detected from magic bytes (gzip, zstd, else plain tar; xz and bzip2 are
//!   named and refused). An OCI layer's media type must be a known tar layer type, but its
//!   bytes decide how it is decompressed, as containerd does.
//! - Limits: file sizes are counted as declared, before anything is written, and every file
//!   written counts even if a later layer replaces it; hard links count no bytes. Entries count
//!   every archive entry and every parent directory made for one.
//! - A tar stream must end with its end-of-archive marker (a stream cut at a header boundary is
//!   refused as truncated), and at most 1 MiB may follow it. Entries other than regular files
//!   that declare data are refused: tar readers disagree on whether that data exists, so such
//!   an archive could show one tree to a scanner and another to us.
//! - Whiteouts follow the OCI layer rules: `.wh.<name>` deletes `<name>` from lower layers,
//!   `.wh..wh..opq` in a directory deletes everything lower layers put there; neither touches
//!   what the same layer adds, wherever the marker is in the layer. Other `.wh..wh.*` names
//!   (aufs metadata) are ignored.

mod config;
mod digest;
mod docker;
mod layer;
mod limits;
mod oci;
mod outer;
mod paths;
mod stream;
mod tree;

use std::fs::File;
use std::io::{Read, Take};
use std::path::Path;

use crate::digest::Digest;
use crate::limits::Budget;
use crate::stream::{LayerStream, Meters};
use crate::tree::Tree;

/// Bounds on what an archive may unpack to; exceeding one is [`Refusal::TooLarge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of regular file content written, summed over all layers.
    pub max_unpacked_bytes: u64,
    /// Entries applied (whiteouts included) plus parent directories made for them.
    pub max_entries: u64,
}

/// What the archive was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// An OCI image layout.
    Oci,
    /// A `docker save` archive without a valid `index.json`.
    Docker,
    /// A root filesystem tarball.
    Rootfs,
}

/// The run configuration an image carries (its config's `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Env`, each `NAME=value` split at the first `=` (an entry without one has an empty value).
    pub env: Vec<(String, String)>,
    /// `WorkingDir` (None when absent or empty).
    pub working_dir: Option<String>,
    /// `User` (None when absent or empty).
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// What was unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    pub kind: ArchiveKind,
    /// Empty for a rootfs tarball.
    pub config: ImageConfig,
    pub layers: usize,
    /// Bytes of regular file content written.
    pub unpacked_bytes: u64,
    /// Entries applied and parent directories made (as counted against [`Limits::max_entries`]).
    pub entries: u64,
    /// Extended attributes the filesystem refused (see the crate documentation).
    pub skipped_xattrs: u64,
}

/// Why an archive was not unpacked. Each message is a sentence naming the layer, the entry and
/// the problem where there is one, e.g. `layer 2 (sha256:ab..): entry "etc/x": the path has a
/// ".." component`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The archive is malformed or hostile (HTTP 400).
    Invalid(String),
    /// The archive unpacks to more than the limits allow (HTTP 413).
    TooLarge(String),
    /// Our own disk failed (HTTP 500).
    Io(String),
}

impl Refusal {
    pub fn message(&self) -> &str {
        match self {
            Refusal::Invalid(m) | Refusal::TooLarge(m) | Refusal::Io(m) => m,
        }
    }

    /// The same refusal, its message prefixed with where it happened.
    pub(crate) fn within(self, place: &str) -> Refusal {
        match self {
            Refusal::Invalid(m) => Refusal::Invalid(format!("{place}: {m}")),
            Refusal::TooLarge(m) => Refusal::TooLarge(format!("{place}: {m}")),
            Refusal::Io(m) => Refusal::Io(format!("{place}: {m}")),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Refusal {}

/// Reported at the start of each layer and after every ~64 MiB of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// 1-based.
    pub layer: usize,
    pub layers: usize,
    /// Bytes of this layer's (compressed) input read so far.
    pub bytes_in: u64,
    /// Bytes of file content unpacked so far, all layers.
    pub unpacked_bytes: u64,
}

/// Unpacks an OCI image layout tar or a `docker save` tar (told apart by content) into `root`,
/// an existing empty directory, applying the layers in order with their whiteouts. On a
/// refusal `root` is left half-written for the caller to delete.
pub fn unpack_image(
    archive: &Path,
    root: &Path,
    limits: &Limits,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Unpacked, Refusal> {
    let outer = outer::Outer::scan(archive)?;
    let (kind, plan) = plan_image(&outer)?;
    let mut tree = Tree::open(root)?;
    let mut budget = Budget::new(*limits);
    let layers = plan.layers.len();
    for (i, layer) in plan.layers.iter().enumerate() {
        let place = format!("layer {} ({})", i + 1, layer.label);
        let Some((input, size)) = outer.open(&layer.member)? else {
            return Err(Refusal::Invalid(format!("{place} is not in the archive")));
        };
        if let Some(want) = layer.size.filter(|&want| want != size) {
            return Err(Refusal::Invalid(format!("{place} is {size} bytes; its descriptor says {want}")));
        }
        let (want_raw, want_tar) = match &layer.verify {
            Verify::Blob(d) => (Some(d), None),
            Verify::Tar(d) => (None, Some(d)),
            Verify::Nothing => (None, None),
        };
        let at = Position { layer: i + 1, layers };
        let got = apply_layer(input, want_raw.is_some(), want_tar.is_some(), at, &mut tree, &mut budget, progress)
            .map_err(|r| r.within(&place))?;
        let raw_ok = want_raw.is_none_or(|d| got.raw.as_ref().is_some_and(|g| d.matches(g)));
        let tar_ok = want_tar.is_none_or(|d| got.tar.as_ref().is_some_and(|g| d.matches(g)));
        if !raw_ok || !tar_ok {
            return Err(Refusal::Invalid(format!("{place} does not match its digest")));
        }
    }
    let skipped_xattrs = tree.finish()?;
    Ok(Unpacked {
        kind,
        config: plan.config,
        layers,
        unpacked_bytes: budget.bytes(),
        entries: budget.entries(),
        skipped_xattrs,
    })
}

/// Unpacks a root filesystem tarball (plain tar, gzip or zstd, told apart by magic bytes) into
/// `root`, an existing empty directory. Whiteout names are applied as in an image layer (there
/// is nothing below them, so they only ever remove what the tarball itself does not add). On a
/// refusal `root` is left half-written for the caller to delete.
pub fn unpack_rootfs(
    archive: &Path,
    root: &Path,
    limits: &Limits,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Unpacked, Refusal> {
    let file = File::open(archive).map_err(|e| Refusal::Io(format!("cannot open the archive: {e}")))?;
    let len = file.metadata().map_err(|e| Refusal::Io(format!("cannot read the archive: {e}")))?.len();
    let mut tree = Tree::open(root)?;
    let mut budget = Budget::new(*limits);
    let at = Position { layer: 1, layers: 1 };
    apply_layer(file.take(len), false, false, at, &mut tree, &mut budget, progress)?;
    let skipped_xattrs = tree.finish()?;
    Ok(Unpacked {
        kind: ArchiveKind::Rootfs,
        config: ImageConfig::default(),
        layers: 1,
        unpacked_bytes: budget.bytes(),
        entries: budget.entries(),
        skipped_xattrs,
    })
}

/// The layers of an image and its run configuration, as its manifest names them.
pub(crate) struct Plan {
    pub config: ImageConfig,
    pub layers: Vec<LayerRef>,
}

pub(crate) struct LayerRef {
    /// The layer's path in the outer tar.
    pub member: String,
    /// How messages name it: its digest, or its path when it has none.
    pub label: String,
    /// The size its descriptor declares (OCI).
    pub size: Option<u64>,
    pub verify: Verify,
}

/// What a layer's content is checked against.
pub(crate) enum Verify {
    /// The digest of its bytes as stored (an OCI descriptor, a content-addressed blob name).
    Blob(Digest),
    /// The digest of its uncompressed tar stream (a docker config's `rootfs.diff_ids`).
    Tar(Digest),
    /// Nothing to check against (a legacy docker layer whose config lists no diff_ids).
    Nothing,
}

/// OCI when `index.json` is present and valid, else docker when `manifest.json` is present; an
/// archive with both whose `index.json` fails falls back to docker, and when that fails too the
/// OCI refusal is the one reported.
fn plan_image(outer: &outer::Outer) -> Result<(ArchiveKind, Plan), Refusal> {
    let has_docker = outer.contains("manifest.json");
    if outer.contains("index.json") {
        match oci::plan(outer) {
            Ok(plan) => return Ok((ArchiveKind::Oci, plan)),
            Err(refusal) if !has_docker => return Err(refusal),
            Err(refusal) => return docker::plan(outer).map(|plan| (ArchiveKind::Docker, plan)).map_err(|_| refusal),
        }
    }
    if has_docker {
        return docker::plan(outer).map(|plan| (ArchiveKind::Docker, plan));
    }
    Err(Refusal::Invalid(
        "the archive is neither an OCI image layout (no index.json) nor a docker save archive (no manifest.json)"
            .to_string(),
    ))
}

#[derive(Clone, Copy)]
struct Position {
    layer: usize,
    layers: usize,
}

/// Calls the caller's progress callback at a layer's start and every `PROGRESS_STEP` of input.
pub(crate) struct Reporter<'a> {
    progress: &'a mut dyn FnMut(&Progress),
    at: Position,
    meters: &'a Meters,
    next: u64,
}

const PROGRESS_STEP: u64 = 64 << 20;

impl Reporter<'_> {
    /// Reports if another `PROGRESS_STEP` of input has been read since the last report.
    pub(crate) fn tick(&mut self, unpacked_bytes: u64) {
        let bytes_in = self.meters.raw_bytes.get();
        if bytes_in >= self.next {
            self.report(bytes_in, unpacked_bytes);
        }
    }

    fn report(&mut self, bytes_in: u64, unpacked_bytes: u64) {
        self.next = bytes_in + PROGRESS_STEP;
        (self.progress)(&Progress { layer: self.at.layer, layers: self.at.layers, bytes_in, unpacked_bytes });
    }
}

/// Applies one layer's tar stream (compression detected) to the tree; returns the digests of
/// its bytes as stored and of its tar stream, as asked for.
fn apply_layer(
    input: Take<File>,
    hash_raw: bool,
    hash_tar: bool,
    at: Position,
    tree: &mut Tree,
    budget: &mut Budget,
    progress: &mut dyn FnMut(&Progress),
) -> Result<stream::Digests, Refusal> {
    let meters = Meters::default();
    let mut reporter = Reporter { progress, at, meters: &meters, next: 0 };
    reporter.report(0, budget.bytes());
    let mut stream = LayerStream::open(input, &meters, hash_raw, hash_tar)?;
    layer::apply(&mut stream, &meters, tree, budget, &mut reporter)?;
    if stream.ended_early() {
        return Err(Refusal::Invalid(
            "the tar stream ends without its end-of-archive marker (the archive is truncated)".to_string(),
        ));
    }
    stream.finish()
}

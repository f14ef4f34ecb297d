//! `POST /api/templates`: an uploaded image archive or root filesystem tarball becomes a
//! template. The upload is streamed to the data disk (hashed on the way), unpacked into a
//! directory by `image_archive` (which refuses hostile archives), given the files every sandbox
//! needs, packed into an ext4 disk, and handed to the runtime. Every step works in one work
//! directory that goes when the request ends, whatever happened.

use std::io::Read;
use std::time::Instant;

use image_archive::{ArchiveKind, Limits, Progress, Refusal, Unpacked};

use super::{ensure_free, ext4, install, TemplateView};
use crate::app::App;
use crate::capacity::free_disk_mb;
use crate::clock::now_unix;
use crate::error::AppError;
use crate::store::records::{TemplateDefaults, TemplateRecord, TemplateSource};
use crate::upgrade::receive::{receive, ReceiveError};

const MIB: u64 = 1 << 20;
/// The largest archive received, whatever the free space: the longest body the API's front takes.
pub const MAX_ARCHIVE_BYTES: u64 = crate::http::front::MAX_REQUEST_BODY;
/// The most file content a template may have, whatever the free space.
const MAX_CONTENT_BYTES: u64 = 32 << 30;
/// The most entries (files, directories, links) a template may have.
const MAX_ENTRIES: u64 = 4_000_000;

/// What the upload is: an image archive (its format found from its content) or a root
/// filesystem tarball (plain, gzip or zstd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadKind {
    ImageArchive,
    RootfsTarball,
}

pub struct Upload<'a> {
    pub name: &'a str,
    pub tag: &'a str,
    pub kind: UploadKind,
    /// The body's Content-Length (a chunked body is refused before this): too large is refused
    /// before anything is read.
    pub declared_bytes: u64,
    pub body: &'a mut dyn Read,
}

/// Imports `upload` as a new template; answers it as listed.
pub fn import(app: &App, upload: Upload) -> Result<TemplateView, AppError> {
    app.lifecycle.backend()?;
    let _busy = app.templates.lock();
    ensure_free(app, upload.name)?;
    let name = upload.name;
    let work = app.templates.work_dir()?;
    let reserve_mb = app.capacity.limits().disk_reserve_mb;
    let free = |what: &str| {
        free_disk_mb(&work.0)
            .map(|mb| mb.saturating_sub(reserve_mb) * MIB)
            .map_err(|e| AppError::internal(format!("cannot measure free space on the data disk for {what}: {e}")))
    };
    let archive_limit = free("the upload")?.min(MAX_ARCHIVE_BYTES);
    if upload.declared_bytes > archive_limit {
        return Err(too_large_upload(upload.declared_bytes, archive_limit));
    }

    let started = Instant::now();
    let archive = work.0.join("archive");
    println!("appliance: template {name}: receiving a {}", what(upload.kind));
    let (bytes, sha256) = receive(upload.body, &archive, archive_limit).map_err(|e| match e {
        ReceiveError::TooLarge(limit) => too_large_upload(limit + 1, limit),
        ReceiveError::Read(e) => AppError::bad_request(format!("cannot read the uploaded archive: {e}")),
        ReceiveError::Write(e) => AppError::internal(format!("cannot store the uploaded archive: {e}")),
    })?;
    let received = started.elapsed();
    println!(
        "appliance: template {name}: received {} MiB (sha256 {sha256}) in {:.1}s; unpacking",
        bytes >> 20,
        received.as_secs_f64()
    );

    // The unpacked tree and the disk made of it are both on the data disk until the tree goes.
    let limits =
        Limits { max_unpacked_bytes: (free("unpacking")? / 2).min(MAX_CONTENT_BYTES), max_entries: MAX_ENTRIES };
    let root = work.0.join("root");
    std::fs::create_dir(&root).map_err(|e| AppError::internal(format!("cannot create {}: {e}", root.display())))?;
    let mut report = |p: &Progress| {
        println!(
            "appliance: template {name}: layer {}/{}: {} MiB read, {} MiB unpacked so far",
            p.layer,
            p.layers,
            p.bytes_in >> 20,
            p.unpacked_bytes >> 20
        );
    };
    let unpacked = match upload.kind {
        UploadKind::ImageArchive => image_archive::unpack_image(&archive, &root, &limits, &mut report),
        UploadKind::RootfsTarball => image_archive::unpack_rootfs(&archive, &root, &limits, &mut report),
    }
    .map_err(|refusal| refused(name, refusal))?;
    // Its space is needed for the disk.
    let _ = std::fs::remove_file(&archive);
    let unpacked_at = started.elapsed();
    println!(
        "appliance: template {name}: {} layer(s), {} entries, {} MiB of files unpacked in {:.1}s{}; making its disk",
        unpacked.layers,
        unpacked.entries,
        unpacked.unpacked_bytes >> 20,
        unpacked_at.saturating_sub(received).as_secs_f64(),
        if unpacked.skipped_xattrs > 0 {
            format!(" ({} extended attribute(s) this file system refuses were left out)", unpacked.skipped_xattrs)
        } else {
            String::new()
        }
    );

    ext4::add_sandbox_files(&root)
        .map_err(|e| AppError::internal(format!("cannot prepare the root filesystem: {e}")))?;
    let disk = work.0.join("disk.ext4");
    let size = ext4::make_disk(&root, &disk, name, unpacked.unpacked_bytes, unpacked.entries)
        .map_err(|e| AppError::internal(format!("cannot make the template's disk: {e}")))?;
    let _ = std::fs::remove_dir_all(&root);
    let made_at = started.elapsed();

    let record = TemplateRecord {
        name: name.to_string(),
        tag: upload.tag.to_string(),
        source: source_of(&unpacked),
        source_digest: format!("sha256:{sha256}"),
        created_at: now_unix(),
        defaults: defaults_of(unpacked),
    };
    let view = install(app, &disk, &format!("sha256:{sha256}"), record)?;
    println!(
        "appliance: template {name} imported: {} MiB archive, {} MiB disk; received {:.1}s, unpacked {:.1}s, disk {:.1}s, ready in {:.1}s ({:.1} MiB/s of archive)",
        bytes >> 20,
        size >> 20,
        received.as_secs_f64(),
        unpacked_at.saturating_sub(received).as_secs_f64(),
        made_at.saturating_sub(unpacked_at).as_secs_f64(),
        started.elapsed().as_secs_f64(),
        bytes as f64 / MIB as f64 / started.elapsed().as_secs_f64().max(0.001)
    );
    Ok(view)
}

fn what(kind: UploadKind) -> &'static str {
    match kind {
        UploadKind::ImageArchive => "image archive",
        UploadKind::RootfsTarball => "root filesystem tarball",
    }
}

fn too_large_upload(bytes: u64, limit: u64) -> AppError {
    AppError::too_large(format!(
        "the archive ({bytes} bytes) is larger than this appliance takes now: at most {limit} bytes (free space on the data disk beyond its reserve)"
    ))
}

fn refused(name: &str, refusal: Refusal) -> AppError {
    match refusal {
        Refusal::Invalid(m) => {
            println!("appliance: template {name}: archive refused: {m}");
            AppError::bad_request(format!("the archive is refused: {m}"))
        }
        Refusal::TooLarge(m) => {
            println!("appliance: template {name}: archive refused: {m}");
            AppError::too_large(format!("the archive is refused: {m}"))
        }
        Refusal::Io(m) => AppError::internal(format!("cannot unpack the archive on the data disk: {m}")),
    }
}

fn source_of(unpacked: &Unpacked) -> TemplateSource {
    match unpacked.kind {
        ArchiveKind::Oci => TemplateSource::OciArchive,
        ArchiveKind::Docker => TemplateSource::DockerArchive,
        ArchiveKind::Rootfs => TemplateSource::RootfsTarball,
    }
}

fn defaults_of(unpacked: Unpacked) -> TemplateDefaults {
    let config = unpacked.config;
    TemplateDefaults {
        env: config.env,
        working_dir: config.working_dir.filter(|d| !d.is_empty()),
        user: config.user.filter(|u| !u.is_empty()),
        entrypoint: config.entrypoint,
        cmd: config.cmd,
    }
}

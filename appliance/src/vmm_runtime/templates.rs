//! Sandbox root disks: templates are imported once from the read-only system disk onto the
//! data filesystem, and each sandbox gets a reflink clone of one (XFS shares the blocks; the
//! template's bytes are never copied per sandbox).
//!
//! On the system disk a template is `<name>.ext4.zst` (what images build: zstd, its frame
//! header declaring the disk's length) or `<name>.ext4` (older system disks, host tests), with
//! `<name>.id` naming its content. Either way the imported `<name>.ext4` is sparse: holes where
//! the template has none of its data, so it stays cheap to store and to clone.
//!
//! Templates made on the appliance (imported archives, saved sandboxes: `crate::templates`) are
//! kept apart in `made/`, the same two files each, so an import from the system disk never
//! touches them; a name the image ships wins over a made template of the same name.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::runtime::{RuntimeError, TemplateDisk};

/// `default` is the documented alias of `base`.
const ALIASES: &[(&str, &str)] = &[("default", "base")];
/// FICLONE = _IOW(0x94, 9, int): share all of one file's extents with another.
const FICLONE: libc::c_ulong = 0x4004_9409;
const COPY_CHUNK: usize = 1 << 20;
/// A template's disk on the system disk, compressed (preferred when both exist) or raw.
const COMPRESSED_SUFFIX: &str = ".ext4.zst";
const RAW_SUFFIX: &str = ".ext4";
/// The longest template disk an import writes (holes included). Template disks are 2 GiB
/// (image/src/template.rs `DISK_SIZE`); a stream declaring or decompressing to more is refused
/// before the excess is written, so a corrupt or hostile system disk cannot fill the data disk.
const MAX_TEMPLATE_BYTES: u64 = 16 << 30;
/// A decompressed block that is all zeros becomes a hole (ext4's block size).
const SPARSE_BLOCK: usize = 4096;
/// The largest zstd window a template stream may ask for (2^24 = 16 MiB of decoder memory); the
/// image compresses at level 9, whose window is 4 MiB.
const WINDOW_LOG_MAX: u32 = 24;

/// Where made templates are kept, under the store's directory.
const MADE_DIR: &str = "made";

pub struct TemplateStore {
    /// Imported templates on the data disk: `<name>.ext4` and `<name>.id`.
    dir: PathBuf,
    /// Templates made on the appliance, laid out the same way.
    made: PathBuf,
}

impl TemplateStore {
    /// Imports every template from `source` (`<name>.ext4.zst` or `<name>.ext4`, and `<name>.id`)
    /// whose id differs from the imported copy's; returns the store and the names of the
    /// templates available.
    pub fn import(source: Option<&Path>, dir: &Path) -> Result<(TemplateStore, Vec<String>), String> {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        if let Some(source) = source {
            let entries =
                fs::read_dir(source).map_err(|e| format!("cannot read templates in {}: {e}", source.display()))?;
            let names: BTreeSet<String> = entries
                .flatten()
                .filter_map(|entry| {
                    let file_name = entry.file_name();
                    let file_name = file_name.to_str()?;
                    let name =
                        file_name.strip_suffix(COMPRESSED_SUFFIX).or_else(|| file_name.strip_suffix(RAW_SUFFIX))?;
                    Some(name.to_string())
                })
                .collect();
            for name in &names {
                import_one(source, dir, name)?;
            }
        }
        let made = dir.join(MADE_DIR);
        fs::create_dir_all(&made).map_err(|e| format!("cannot create {}: {e}", made.display()))?;
        let store = TemplateStore { dir: dir.to_path_buf(), made };
        for name in disk_names(&store.made) {
            if disk_names(&store.dir).contains(&name) {
                println!("appliance: template {name}: the image ships a template of this name, which creates get; the one made here is hidden until deleted");
            }
        }
        let names = store.names();
        Ok((store, names))
    }

    /// Every template's name, shipped or made, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names = disk_names(&self.dir);
        names.extend(disk_names(&self.made));
        names.sort();
        names.dedup();
        names
    }

    /// The disk of template `name` (or its alias): a shipped one, else a made one.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, RuntimeError> {
        let name = ALIASES.iter().find(|(alias, _)| *alias == name).map_or(name, |(_, real)| *real);
        let valid = !name.is_empty() && !name.contains('/') && !name.starts_with('.');
        for dir in [&self.dir, &self.made] {
            let path = dir.join(format!("{name}{RAW_SUFFIX}"));
            if valid && path.is_file() {
                return Ok(path);
            }
        }
        Err(RuntimeError::Invalid(format!("unknown template {name:?}; available: {}", self.names().join(", "))))
    }

    /// Every template with its disk's size.
    pub fn list(&self) -> Vec<TemplateDisk> {
        use std::os::unix::fs::MetadataExt;
        let shipped = disk_names(&self.dir);
        self.names()
            .into_iter()
            .filter_map(|name| {
                let built_in = shipped.contains(&name);
                let dir = if built_in { &self.dir } else { &self.made };
                let meta = fs::metadata(dir.join(format!("{name}{RAW_SUFFIX}"))).ok()?;
                Some(TemplateDisk { name, built_in, length: meta.len(), allocated: meta.blocks() * 512 })
            })
            .collect()
    }

    /// Makes `disk` (moved, on the same file system) made template `name`, with `content_id`.
    /// A name already taken is a conflict; on an error nothing of the template is left.
    pub fn install(&self, name: &str, disk: &Path, content_id: &str) -> Result<(), RuntimeError> {
        if self.resolve(name).is_ok() {
            return Err(RuntimeError::Conflict(format!("a template named {name:?} exists already")));
        }
        let (target, id_path) = (self.made.join(format!("{name}{RAW_SUFFIX}")), self.made.join(format!("{name}.id")));
        let installed = write_synced(&id_path, content_id.as_bytes())
            .and_then(|()| fs::rename(disk, &target))
            .and_then(|()| super::snapshot_dir::sync_dir(&self.made));
        installed.map_err(|e| {
            let _ = fs::remove_file(&target);
            let _ = fs::remove_file(&id_path);
            RuntimeError::Failed(format!("cannot install template {name}: {e}"))
        })
    }

    /// Removes made template `name` (a shipped one is refused).
    pub fn remove(&self, name: &str) -> Result<(), RuntimeError> {
        if disk_names(&self.dir).iter().any(|n| n == name) {
            return Err(RuntimeError::Invalid(format!(
                "template {name} is shipped with the image and cannot be deleted"
            )));
        }
        let disk = self.made.join(format!("{name}{RAW_SUFFIX}"));
        if !disk.is_file() {
            return Err(RuntimeError::NotFound(format!("template {name:?} not found")));
        }
        // The disk first: without it the template is gone, whatever happens to its id file.
        fs::remove_file(&disk)
            .and_then(|()| fs::remove_file(self.made.join(format!("{name}.id"))))
            .map_err(|e| RuntimeError::Failed(format!("cannot remove template {name}: {e}")))
    }
}

/// The names of the template disks (`<name>.ext4`) in `dir`.
fn disk_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(RAW_SUFFIX)).map(str::to_string))
        .collect();
    names.sort();
    names
}

fn import_one(source: &Path, dir: &Path, name: &str) -> Result<(), String> {
    let wanted_id = fs::read_to_string(source.join(format!("{name}.id")))
        .map_err(|e| format!("template {name} has no readable id file: {e}"))?;
    let id_path = dir.join(format!("{name}.id"));
    let disk = dir.join(format!("{name}{RAW_SUFFIX}"));
    if disk.is_file() && fs::read_to_string(&id_path).is_ok_and(|have| have == wanted_id) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let partial = dir.join(format!("{name}{RAW_SUFFIX}.partial"));
    let compressed = source.join(format!("{name}{COMPRESSED_SUFFIX}"));
    let (from, copied) = if compressed.is_file() {
        let copied = decompress_sparse(&compressed, &partial, MAX_TEMPLATE_BYTES);
        (compressed, copied)
    } else {
        let raw = source.join(format!("{name}{RAW_SUFFIX}"));
        let copied = sparse_copy(&raw, &partial);
        (raw, copied)
    };
    let copied = match copied {
        Ok(copied) => copied,
        Err(e) => {
            // Nothing half-written stays behind; the next start tries again.
            let _ = fs::remove_file(&partial);
            return Err(format!("cannot import template {name} from {}: {e}", from.display()));
        }
    };
    fs::rename(&partial, &disk).map_err(|e| format!("cannot install template {name}: {e}"))?;
    // The id is written last: a crash before this point re-imports next time.
    write_synced(&id_path, wanted_id.as_bytes()).map_err(|e| format!("cannot record template {name}: {e}"))?;
    println!(
        "appliance: imported template {name} ({} MiB of data) from {} in {:.1}s",
        copied >> 20,
        from.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(data)?;
    file.sync_all()
}

/// Copies only the data regions of `from` (SEEK_DATA/SEEK_HOLE), leaving holes as holes;
/// returns the bytes copied.
pub fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<u64> {
    let mut src = File::open(from)?;
    let len = src.metadata()?.len();
    let mut dst = OpenOptions::new().write(true).create(true).truncate(true).open(to)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut copied = 0u64;
    let mut offset = 0u64;
    while offset < len {
        let Some(data) = seek(&src, offset, libc::SEEK_DATA)? else { break };
        let hole = seek(&src, data, libc::SEEK_HOLE)?.unwrap_or(len);
        src.seek(SeekFrom::Start(data))?;
        dst.seek(SeekFrom::Start(data))?;
        let mut left = hole - data;
        while left > 0 {
            let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
            let got = src.read(&mut buf[..want])?;
            if got == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "source shrank while copying"));
            }
            dst.write_all(&buf[..got])?;
            left -= got as u64;
            copied += got as u64;
        }
        offset = hole;
    }
    dst.sync_all()?;
    Ok(copied)
}

/// Decompresses the zstd stream `from` into `to`, leaving a hole wherever a whole
/// `SPARSE_BLOCK` is zero, and sets `to`'s length to the decompressed length; returns the bytes
/// written. The length is bounded: by the size the stream's frame header declares (it must
/// match exactly), which itself may not exceed `cap`, or by `cap` when none is declared. A
/// stream that is not zstd, is corrupt, or breaks the bound fails with an `InvalidData` error
/// saying which; `to` is then left part-written for the caller to remove.
pub fn decompress_sparse(from: &Path, to: &Path, cap: u64) -> std::io::Result<u64> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut src = File::open(from)?;
    let declared = declared_size(&mut src)?;
    if let Some(declared) = declared.filter(|&d| d > cap) {
        return Err(invalid(format!(
            "the stream declares {declared} bytes, more than the {cap} bytes a template may have"
        )));
    }
    let limit = declared.unwrap_or(cap);
    let mut decoder = zstd::stream::read::Decoder::new(src)?;
    decoder.window_log_max(WINDOW_LOG_MAX)?;
    let dst = OpenOptions::new().write(true).create(true).truncate(true).open(to)?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let (mut len, mut written) = (0u64, 0u64);
    loop {
        let n = read_full(&mut decoder, &mut buf).map_err(|e| invalid(format!("corrupt zstd stream: {e}")))?;
        if n == 0 {
            break;
        }
        if len + n as u64 > limit {
            let why = if declared.is_some() { "it declares" } else { "a template may have" };
            return Err(invalid(format!("the stream decompresses to more than the {limit} bytes {why}")));
        }
        written += write_nonzero(&dst, &buf[..n], len)?;
        len += n as u64;
    }
    if let Some(declared) = declared.filter(|&d| d != len) {
        return Err(invalid(format!("the stream ends after {len} of the {declared} bytes it declares")));
    }
    dst.set_len(len)?;
    dst.sync_all()?;
    Ok(written)
}

/// The content size in the zstd frame header at the start of `src` (None: not declared);
/// `src` is left at its start.
fn declared_size(src: &mut File) -> std::io::Result<Option<u64>> {
    // ZSTD_FRAMEHEADERSIZE_MAX: magic, descriptor, window, dictionary id and content size.
    let mut header = [0u8; 18];
    let n = read_full(src, &mut header)?;
    src.seek(SeekFrom::Start(0))?;
    zstd::zstd_safe::get_frame_content_size(&header[..n]).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "not a zstd stream (no frame header at its start)")
    })
}

/// Writes the blocks of `data` that are not all zeros at `offset` onward (adjacent ones in one
/// write); returns the bytes written.
fn write_nonzero(dst: &File, data: &[u8], offset: u64) -> std::io::Result<u64> {
    let mut written = 0u64;
    let mut run: Option<usize> = None;
    for (i, block) in data.chunks(SPARSE_BLOCK).enumerate() {
        let start = i * SPARSE_BLOCK;
        // OR-folding the whole block compiles to wide loads; an early exit would not.
        let zero = block.iter().fold(0u8, |acc, &b| acc | b) == 0;
        match (zero, run) {
            (false, None) => run = Some(start),
            (true, Some(from)) => {
                dst.write_all_at(&data[from..start], offset + from as u64)?;
                written += (start - from) as u64;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(from) = run {
        dst.write_all_at(&data[from..], offset + from as u64)?;
        written += (data.len() - from) as u64;
    }
    Ok(written)
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// lseek(2) with SEEK_DATA/SEEK_HOLE; None when there is no more data (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| std::io::Error::other("offset out of range"))?;
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if pos < 0 {
        let err = std::io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(err) };
    }
    Ok(Some(pos as u64))
}

/// Makes `to` a copy-on-write clone of the template `from`, `disk_mb` MiB long (the guest grows
/// its filesystem to fill it), and returns its size in MiB. A size below the template's is
/// refused before anything is written.
pub fn clone_sized(from: &Path, to: &Path, disk_mb: Option<u32>) -> Result<u32, RuntimeError> {
    let template_len =
        fs::metadata(from).map_err(|e| RuntimeError::Failed(format!("cannot read {}: {e}", from.display())))?.len();
    let template_mb = u32::try_from(template_len.div_ceil(MIB)).unwrap_or(u32::MAX);
    let want_mb = disk_mb.unwrap_or(template_mb);
    if want_mb < template_mb {
        return Err(RuntimeError::Invalid(format!(
            "diskMB {want_mb} is smaller than the template's disk ({template_mb} MiB); give at least {template_mb}"
        )));
    }
    reflink(from, to)?;
    if want_mb > template_mb {
        let grown = OpenOptions::new().write(true).open(to).and_then(|f| f.set_len(u64::from(want_mb) * MIB));
        if let Err(e) = grown {
            let _ = fs::remove_file(to);
            return Err(RuntimeError::Failed(format!("cannot size {} to {want_mb} MiB: {e}", to.display())));
        }
    }
    Ok(want_mb)
}

const MIB: u64 = 1 << 20;

/// Makes `to` a copy-on-write clone of `from`. Refuses (rather than copying gigabytes) when the
/// filesystem cannot share extents.
pub fn reflink(from: &Path, to: &Path) -> Result<(), RuntimeError> {
    let src = File::open(from).map_err(|e| RuntimeError::Failed(format!("cannot open {}: {e}", from.display())))?;
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| RuntimeError::Failed(format!("cannot create {}: {e}", to.display())))?;
    // SAFETY: FICLONE takes the source descriptor as its integer argument; both descriptors are
    // open for the duration of the call and no memory is shared with the kernel.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        drop(dst);
        let _ = fs::remove_file(to);
        return Err(RuntimeError::Failed(format!(
            "cannot clone {} (the data filesystem must support reflinks, e.g. XFS with reflink=1): {err}",
            from.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("appliance-templates-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    fn sparse_file(path: &Path) {
        let mut f = File::create(path).expect("create");
        f.set_len(64 << 20).expect("len");
        f.seek(SeekFrom::Start(1 << 20)).expect("seek");
        f.write_all(b"first block of data").expect("write");
        f.seek(SeekFrom::Start(40 << 20)).expect("seek");
        f.write_all(&[7u8; 5000]).expect("write");
    }

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = temp_dir("sparse");
        let (from, to) = (dir.join("a"), dir.join("b"));
        sparse_file(&from);
        let copied = sparse_copy(&from, &to).expect("copy");
        assert!(copied < 1 << 20, "only data regions are copied, got {copied}");
        assert_eq!(fs::read(&from).expect("a"), fs::read(&to).expect("b"));
        use std::os::unix::fs::MetadataExt;
        assert!(fs::metadata(&to).expect("meta").blocks() * 512 < 4 << 20, "the copy stays sparse");
        let _ = fs::remove_dir_all(&dir);
    }

    /// `data` as a zstd stream with a checksum, declaring its length as the image's `zstd`
    /// CLI does (or not, as a stream piped through it would).
    fn zstd_stream(data: &[u8], declare: bool) -> Vec<u8> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
        encoder.include_checksum(true).expect("checksum");
        if declare {
            encoder.set_pledged_src_size(Some(data.len() as u64)).expect("pledge");
        }
        encoder.write_all(data).expect("compress");
        encoder.finish().expect("finish")
    }

    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).expect("meta").blocks() * 512
    }

    #[test]
    fn a_compressed_template_is_imported_with_the_same_bytes_and_its_holes() {
        let dir = temp_dir("zst");
        let (source, store_dir) = (dir.join("system"), dir.join("data"));
        fs::create_dir_all(&source).expect("mkdir");
        let raw = dir.join("raw.ext4");
        sparse_file(&raw);
        let data = fs::read(&raw).expect("read");
        let stream = zstd_stream(&data, true);
        assert!(stream.len() < 1 << 20, "zeros compress away: {}", stream.len());
        fs::write(source.join("base.ext4.zst"), &stream).expect("zst");
        fs::write(source.join("base.id"), "v1\n").expect("id");
        let (store, names) = TemplateStore::import(Some(&source), &store_dir).expect("import");
        assert_eq!(names, ["base"]);
        let disk = store.resolve("base").expect("base");
        assert_eq!(fs::metadata(&disk).expect("meta").len(), 64 << 20, "the declared length, trailing hole included");
        assert!(fs::read(&disk).expect("read") == data, "the same bytes");
        // Three 4 KiB blocks hold data (one at 1 MiB, two for the 5000 bytes at 40 MiB).
        assert!(allocated(&disk) < 1 << 20, "the import stays sparse: {} bytes allocated", allocated(&disk));
        assert!(!store_dir.join("base.ext4.partial").exists());
        // Without a declared length the cap bounds it, and the result is the same.
        let undeclared = dir.join("undeclared.ext4");
        fs::write(dir.join("undeclared.zst"), zstd_stream(&data, false)).expect("zst");
        let written = decompress_sparse(&dir.join("undeclared.zst"), &undeclared, MAX_TEMPLATE_BYTES).expect("import");
        assert_eq!(written, 3 * 4096, "only the blocks with data are written");
        assert!(fs::read(&undeclared).expect("read") == data);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_compressed_template_wins_over_a_raw_one_of_the_same_name() {
        let dir = temp_dir("both");
        let (source, store_dir) = (dir.join("system"), dir.join("data"));
        fs::create_dir_all(&source).expect("mkdir");
        fs::write(source.join("base.ext4"), b"raw").expect("raw");
        fs::write(source.join("base.ext4.zst"), zstd_stream(b"compressed", true)).expect("zst");
        fs::write(source.join("base.id"), "v1\n").expect("id");
        fs::write(source.join("node.ext4"), b"node").expect("raw");
        fs::write(source.join("node.id"), "n1\n").expect("id");
        let (store, names) = TemplateStore::import(Some(&source), &store_dir).expect("import");
        assert_eq!(names, ["base", "node"]);
        assert_eq!(fs::read(store.resolve("base").expect("base")).expect("read"), b"compressed");
        assert_eq!(fs::read(store.resolve("node").expect("node")).expect("read"), b"node");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_cap_refuses_a_stream_that_is_or_declares_too_long() {
        let dir = temp_dir("cap");
        let data = vec![1u8; 3 << 20];
        let (declared, undeclared, out) = (dir.join("declared.zst"), dir.join("undeclared.zst"), dir.join("out"));
        fs::write(&declared, zstd_stream(&data, true)).expect("zst");
        fs::write(&undeclared, zstd_stream(&data, false)).expect("zst");
        let err = decompress_sparse(&declared, &out, 2 << 20).expect_err("declares more than the cap");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("declares 3145728 bytes, more than the 2097152 bytes"), "{err}");
        assert!(!out.exists(), "refused before anything is written");
        let err = decompress_sparse(&undeclared, &out, 2 << 20).expect_err("decompresses to more than the cap");
        assert!(err.to_string().contains("decompresses to more than the 2097152 bytes a template may have"), "{err}");
        assert!(fs::metadata(&out).expect("meta").len() <= 2 << 20, "nothing past the cap is written");
        // Exactly the cap is fine.
        assert_eq!(decompress_sparse(&undeclared, &out, 3 << 20).expect("fits"), 3 << 20);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_or_foreign_stream_fails_the_import_and_leaves_no_disk() {
        let dir = temp_dir("corrupt");
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let good = zstd_stream(&data, true);
        let mut flipped = good.clone();
        let middle = flipped.len() / 2;
        flipped[middle..middle + 64].iter_mut().for_each(|b| *b ^= 0x5a);
        let truncated = good[..good.len() / 2].to_vec();
        let cases: [(&str, Vec<u8>, &str); 3] = [
            ("flipped", flipped, "corrupt zstd stream"),
            ("truncated", truncated, "corrupt zstd stream"),
            ("foreign", b"this is not zstd at all".to_vec(), "not a zstd stream"),
        ];
        for (tag, stream, want) in cases {
            let (source, store_dir) = (dir.join(tag).join("system"), dir.join(tag).join("data"));
            fs::create_dir_all(&source).expect("mkdir");
            fs::write(source.join("base.ext4.zst"), &stream).expect("zst");
            fs::write(source.join("base.id"), "v1\n").expect("id");
            let err = TemplateStore::import(Some(&source), &store_dir).err().expect(tag);
            assert!(err.contains("cannot import template base from") && err.contains(want), "{tag}: {err}");
            for left in ["base.ext4", "base.ext4.partial", "base.id"] {
                assert!(!store_dir.join(left).exists(), "{tag}: {left} left behind");
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn import_is_skipped_when_the_id_matches_and_redone_when_it_changes() {
        let dir = temp_dir("import");
        let (source, store_dir) = (dir.join("system"), dir.join("data"));
        fs::create_dir_all(&source).expect("mkdir");
        sparse_file(&source.join("base.ext4"));
        fs::write(source.join("base.id"), "v1\n").expect("id");
        let (store, names) = TemplateStore::import(Some(&source), &store_dir).expect("import");
        assert_eq!(names, vec!["base".to_string()]);
        assert_eq!(store.resolve("default").expect("alias"), store_dir.join("base.ext4"));
        // Same id: the imported copy is kept even if the source changed underneath.
        fs::write(store_dir.join("base.ext4"), b"kept").expect("mark");
        TemplateStore::import(Some(&source), &store_dir).expect("again");
        assert_eq!(fs::read(store_dir.join("base.ext4")).expect("read"), b"kept");
        // New id: imported again.
        fs::write(source.join("base.id"), "v2\n").expect("id");
        TemplateStore::import(Some(&source), &store_dir).expect("upgrade");
        assert_eq!(fs::metadata(store_dir.join("base.ext4")).expect("meta").len(), 64 << 20);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_template_on_the_system_disk_is_imported_and_default_stays_base() {
        let dir = temp_dir("all");
        let (source, store_dir) = (dir.join("system"), dir.join("data"));
        fs::create_dir_all(&source).expect("mkdir");
        // As the image lays them out: <name>.ext4 and <name>.id for base, python and node.
        for name in ["node", "base", "python"] {
            fs::write(source.join(format!("{name}.ext4")), name).expect("disk");
            fs::write(source.join(format!("{name}.id")), format!("{name}-id\n")).expect("id");
        }
        let (store, names) = TemplateStore::import(Some(&source), &store_dir).expect("import");
        assert_eq!(names, ["base", "node", "python"]);
        for name in ["base", "python", "node"] {
            let disk = store.resolve(name).expect(name);
            assert_eq!(fs::read(&disk).expect("read"), name.as_bytes());
            assert_eq!(fs::read_to_string(store_dir.join(format!("{name}.id"))).expect("id"), format!("{name}-id\n"));
        }
        assert_eq!(store.resolve("default").expect("alias"), store_dir.join("base.ext4"));
        match store.resolve("ruby") {
            Err(RuntimeError::Invalid(m)) => assert!(m.contains("available: base, node, python"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_templates_are_refused_with_the_available_names() {
        let dir = temp_dir("unknown");
        let (store, _) = TemplateStore::import(None, &dir).expect("empty");
        fs::write(dir.join("base.ext4"), b"x").expect("write");
        match store.resolve("ubuntu") {
            Err(RuntimeError::Invalid(m)) => assert!(m.contains("ubuntu") && m.contains("base"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(store.resolve("../base").is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn reflink_refuses_instead_of_copying_where_unsupported_or_clones() {
        let dir = temp_dir("reflink");
        let (from, to) = (dir.join("a"), dir.join("b"));
        fs::write(&from, b"template bytes").expect("write");
        match reflink(&from, &to) {
            // tmpfs/ext4 hosts: refused, and nothing is left behind.
            Err(RuntimeError::Failed(m)) => {
                assert!(m.contains("reflink"), "{m}");
                assert!(!to.exists());
            }
            // XFS/btrfs hosts: a real clone.
            Ok(()) => assert_eq!(fs::read(&to).expect("read"), b"template bytes"),
            Err(other) => panic!("unexpected {other:?}"),
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn clone_sized_refuses_a_smaller_disk_untouched_and_grows_a_larger_one() {
        let dir = temp_dir("sized");
        let (from, to) = (dir.join("t.ext4"), dir.join("root.ext4"));
        sparse_file(&from);
        match clone_sized(&from, &to, Some(32)) {
            Err(RuntimeError::Invalid(m)) => assert!(m.contains("smaller than the template's disk (64 MiB)"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!to.exists(), "nothing is written for a refused size");
        // Growth needs a reflink-capable filesystem; elsewhere the clone itself is refused.
        if let Ok(mb) = clone_sized(&from, &to, Some(96)) {
            assert_eq!((mb, fs::metadata(&to).expect("meta").len()), (96, 96 << 20));
            fs::remove_file(&to).expect("rm");
            assert_eq!(clone_sized(&from, &to, None).expect("default"), 64);
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

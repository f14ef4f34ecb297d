//! Sandbox root disks: templates are imported once from the read-only system disk onto the
//! data filesystem, and each sandbox gets a reflink clone of one (XFS shares the blocks; the
//! template's bytes are never copied per sandbox).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::runtime::RuntimeError;

/// `default` is the documented alias of `base`.
const ALIASES: &[(&str, &str)] = &[("default", "base")];
/// FICLONE = _IOW(0x94, 9, int): share all of one file's extents with another.
const FICLONE: libc::c_ulong = 0x4004_9409;
const COPY_CHUNK: usize = 1 << 20;

pub struct TemplateStore {
    /// Imported templates on the data disk: `<name>.ext4` and `<name>.id`.
    dir: PathBuf,
}

impl TemplateStore {
    /// Imports every template from `source` (`<name>.ext4` + `<name>.id`) whose id differs from
    /// the imported copy's; returns the store and the names of the templates available.
    pub fn import(source: Option<&Path>, dir: &Path) -> Result<(TemplateStore, Vec<String>), String> {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        if let Some(source) = source {
            let entries =
                fs::read_dir(source).map_err(|e| format!("cannot read templates in {}: {e}", source.display()))?;
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ext4")) else {
                    continue;
                };
                import_one(source, dir, name)?;
            }
        }
        let store = TemplateStore { dir: dir.to_path_buf() };
        let names = store.names();
        Ok((store, names))
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".ext4")).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The imported disk of template `name` (or its alias).
    pub fn resolve(&self, name: &str) -> Result<PathBuf, RuntimeError> {
        let name = ALIASES.iter().find(|(alias, _)| *alias == name).map_or(name, |(_, real)| *real);
        let path = self.dir.join(format!("{name}.ext4"));
        let valid = !name.is_empty() && !name.contains('/') && !name.starts_with('.');
        if valid && path.is_file() {
            return Ok(path);
        }
        Err(RuntimeError::Invalid(format!("unknown template {name:?}; available: {}", self.names().join(", "))))
    }
}

fn import_one(source: &Path, dir: &Path, name: &str) -> Result<(), String> {
    let wanted_id = fs::read_to_string(source.join(format!("{name}.id")))
        .map_err(|e| format!("template {name} has no readable id file: {e}"))?;
    let id_path = dir.join(format!("{name}.id"));
    let disk = dir.join(format!("{name}.ext4"));
    if disk.is_file() && fs::read_to_string(&id_path).is_ok_and(|have| have == wanted_id) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let partial = dir.join(format!("{name}.ext4.partial"));
    let copied = sparse_copy(&source.join(format!("{name}.ext4")), &partial)
        .map_err(|e| format!("cannot import template {name}: {e}"))?;
    fs::rename(&partial, &disk).map_err(|e| format!("cannot install template {name}: {e}"))?;
    // The id is written last: a crash before this point re-imports next time.
    write_synced(&id_path, wanted_id.as_bytes()).map_err(|e| format!("cannot record template {name}: {e}"))?;
    println!(
        "appliance: imported template {name} ({} MiB of data) in {:.1}s",
        copied >> 20,
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

//! File operations inside the sandbox: streamed reads, atomic replacement (temporary file,
//! fsync, rename, fsync of the directory), listing, stat, mkdir -p and removal.

use super::error::{Failure, OpError};
use super::paths;
use agent_protocol::{DirEntry, ErrorCode, FileStat};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

/// Size of the chunks a read is streamed in.
pub const CHUNK: usize = 256 * 1024;

/// Streams the file at `path` to `chunk`; returns its size. `limit` (0: none) bounds the size.
pub fn read(path: &Path, limit: u64, chunk: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> Result<u64, Failure> {
    let mut file = File::open(path).map_err(|e| OpError::io(path.display(), &e))?;
    let meta = file.metadata().map_err(|e| OpError::io(path.display(), &e))?;
    if meta.is_dir() {
        return Err(OpError::new(ErrorCode::IsADirectory, format!("{} is a directory", path.display())).into());
    }
    let too_large = || -> Failure {
        OpError::new(ErrorCode::TooLarge, format!("{} is larger than the limit of {limit} bytes", path.display()))
            .into()
    };
    if limit > 0 && meta.len() > limit {
        return Err(too_large());
    }
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(OpError::io(path.display(), &e).into()),
        };
        total += n as u64;
        // Files in /proc and /sys report size 0 but can be long.
        if limit > 0 && total > limit {
            return Err(too_large());
        }
        chunk(&buf[..n]).map_err(Failure::Transport)?;
    }
}

/// A file replacement in progress: data goes to a temporary file next to the target, which
/// replaces the target only on `commit`. Dropped uncommitted, it leaves the target untouched.
pub struct PendingWrite {
    target: PathBuf,
    tmp: PathBuf,
    file: File,
    mode: u32,
    owner: Option<(u32, u32)>,
    written: u64,
    committed: bool,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Prepares to replace `target` (already resolved).
pub fn begin_write(target: &Path, mode: Option<u32>, create_parents: bool) -> Result<PendingWrite, OpError> {
    // Writing through a symlink replaces the file it points to, as `echo > link` would.
    let target = match fs::symlink_metadata(target) {
        Ok(meta) if meta.file_type().is_symlink() => fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf()),
        _ => target.to_path_buf(),
    };
    let existing = match fs::metadata(&target) {
        Ok(meta) if meta.is_dir() => {
            return Err(OpError::new(ErrorCode::IsADirectory, format!("{} is a directory", target.display())))
        }
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(OpError::io(target.display(), &e)),
    };
    let Some(parent) = target.parent() else {
        return Err(OpError::new(ErrorCode::IsADirectory, "/ is a directory"));
    };
    if create_parents {
        fs::create_dir_all(parent).map_err(|e| OpError::io(format!("creating {}", parent.display()), &e))?;
    } else if !parent.is_dir() {
        return Err(OpError::new(ErrorCode::NotFound, format!("directory {} does not exist", parent.display())));
    }
    let tmp = parent.join(format!(".oc-tmp-{}-{}", std::process::id(), TMP_COUNTER.fetch_add(1, Ordering::Relaxed)));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| OpError::io(format!("creating a temporary file in {}", parent.display()), &e))?;
    Ok(PendingWrite {
        mode: existing.as_ref().map(|m| m.permissions().mode()).or(mode).unwrap_or(0o644) & 0o7777,
        owner: existing.as_ref().map(|m| (m.uid(), m.gid())),
        target,
        tmp,
        file,
        written: 0,
        committed: false,
    })
}

impl PendingWrite {
    pub fn append(&mut self, data: &[u8]) -> Result<(), OpError> {
        self.file.write_all(data).map_err(|e| OpError::io(self.target.display(), &e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Makes the new content durable and puts it in place; returns its size.
    pub fn commit(mut self) -> Result<u64, OpError> {
        let target = self.target.display().to_string();
        if let Some((uid, gid)) = self.owner {
            // Only root may give a file away; elsewhere the new file keeps the caller as owner.
            match std::os::unix::fs::fchown(&self.file, Some(uid), Some(gid)) {
                Err(e) if e.kind() != io::ErrorKind::PermissionDenied => return Err(OpError::io(&target, &e)),
                _ => {}
            }
        }
        self.file.set_permissions(fs::Permissions::from_mode(self.mode)).map_err(|e| OpError::io(&target, &e))?;
        self.file.sync_all().map_err(|e| OpError::io(&target, &e))?;
        fs::rename(&self.tmp, &self.target).map_err(|e| OpError::io(&target, &e))?;
        self.committed = true;
        if let Some(parent) = self.target.parent() {
            File::open(parent).and_then(|dir| dir.sync_all()).map_err(|e| OpError::io(parent.display(), &e))?;
        }
        Ok(self.written)
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Replaces `target` with `data` in one step.
pub fn write_all_atomic(target: &Path, data: &[u8], mode: u32) -> Result<(), OpError> {
    let mut pending = begin_write(target, Some(mode), true)?;
    pending.append(data)?;
    pending.commit().map(|_| ())
}

/// The entries of a directory, sorted by name.
pub fn list(dir: &Path) -> Result<Vec<DirEntry>, OpError> {
    let entries = fs::read_dir(dir).map_err(|e| OpError::io(dir.display(), &e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| OpError::io(dir.display(), &e))?;
        let path = entry.path();
        // Follow symlinks so a link to a directory lists as one; a dangling link lists as itself.
        let meta = match fs::metadata(&path).or_else(|_| entry.metadata()) {
            Ok(meta) => meta,
            // Removed between readdir and stat: no longer an entry.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(OpError::io(path.display(), &e)),
        };
        out.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            is_dir: meta.is_dir(),
            path: paths::display(&path),
            size: if meta.is_dir() { 0 } else { meta.len() },
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub fn stat(path: &Path) -> Result<FileStat, OpError> {
    let link = fs::symlink_metadata(path).map_err(|e| OpError::io(path.display(), &e))?;
    let meta = if link.file_type().is_symlink() { fs::metadata(path).unwrap_or(link.clone()) } else { link.clone() };
    let modified_ms = meta
        .modified()
        .ok()
        .and_then(|t| match t.duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_millis()).ok(),
            Err(before) => i64::try_from(before.duration().as_millis()).ok().map(|ms| -ms),
        })
        .unwrap_or(0);
    Ok(FileStat {
        path: paths::display(path),
        name: path.file_name().map_or_else(|| "/".into(), |n| n.to_string_lossy().into_owned()),
        is_dir: meta.is_dir(),
        is_symlink: link.file_type().is_symlink(),
        size: meta.len(),
        mode: meta.permissions().mode() & 0o7777,
        modified_ms,
    })
}

/// `mkdir -p`.
pub fn mkdir(path: &Path) -> Result<(), OpError> {
    if let Ok(meta) = fs::metadata(path) {
        return if meta.is_dir() {
            Ok(())
        } else {
            Err(OpError::new(ErrorCode::AlreadyExists, format!("{} exists and is not a directory", path.display())))
        };
    }
    fs::create_dir_all(path).map_err(|e| OpError::io(path.display(), &e))
}

/// Removes a file, a symlink (not its target), or a directory (with `recursive`, its contents).
pub fn remove(path: &Path, recursive: bool) -> Result<(), OpError> {
    if path == Path::new("/") {
        return Err(OpError::bad_request("refusing to remove /"));
    }
    let meta = fs::symlink_metadata(path).map_err(|e| OpError::io(path.display(), &e))?;
    let result = if meta.is_dir() {
        if recursive {
            fs::remove_dir_all(path)
        } else {
            fs::remove_dir(path)
        }
    } else {
        fs::remove_file(path)
    };
    result.map_err(|e| OpError::io(path.display(), &e))
}

/// Moves `from` to `to` in one step (rename(2)): a file at `to` is replaced, a directory at `to`
/// only when empty; neither end may be `/`. Missing parents of `to` are not created.
pub fn rename(from: &Path, to: &Path) -> Result<(), OpError> {
    if from == Path::new("/") || to == Path::new("/") {
        return Err(OpError::bad_request("refusing to move / or onto /"));
    }
    // Checked first so a missing source is reported as such, not as a problem with `to`.
    fs::symlink_metadata(from).map_err(|e| OpError::io(from.display(), &e))?;
    fs::rename(from, to).map_err(|e| OpError::io(to.display(), &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("oc-files-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_abandoned_write_leaves_the_old_content_and_no_temporary_file() {
        let dir = scratch("abandon");
        let target = dir.join("f");
        fs::write(&target, b"old").unwrap();
        let mut pending = begin_write(&target, None, false).unwrap();
        pending.append(b"new content").unwrap();
        drop(pending);
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replacing_keeps_the_existing_mode() {
        let dir = scratch("mode");
        let target = dir.join("script");
        fs::write(&target, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o750)).unwrap();
        write_all_atomic(&target, b"#!/bin/sh\necho\n", 0o600).unwrap();
        assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o7777, 0o750);
        write_all_atomic(&dir.join("new"), b"x", 0o640).unwrap();
        assert_eq!(fs::metadata(dir.join("new")).unwrap().permissions().mode() & 0o7777, 0o640);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writing_through_a_symlink_replaces_its_target() {
        let dir = scratch("link");
        fs::write(dir.join("real"), b"a").unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
        write_all_atomic(&dir.join("link"), b"b", 0o644).unwrap();
        assert!(fs::symlink_metadata(dir.join("link")).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(dir.join("real")).unwrap(), b"b");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_enforces_the_limit_even_when_the_size_lies() {
        // /proc files report size 0.
        let mut got = Vec::new();
        let r = read(Path::new("/proc/self/status"), 16, &mut |d| {
            got.extend_from_slice(d);
            Ok(())
        });
        assert!(matches!(r, Err(Failure::Op(OpError { code: ErrorCode::TooLarge, .. }))));
    }
}

//! The root filesystem tree being written: every operation takes a path relative to the root
//! made of plain components (see paths.rs), looks with symlink_metadata and never follows a
//! symlink, and replaces whatever is in the way by removing it first (a file is only ever
//! created new, never opened where something already is).

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::limits::Budget;
use crate::Refusal;

/// Linux PATH_MAX, including the terminating NUL.
const PATH_MAX: usize = 4096;
/// Parent directories an archive does not list are made with this mode (as docker does).
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// What is at a path, without following a symlink there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    Missing,
    Dir,
    File,
    Symlink,
    /// A FIFO (nothing else is ever created).
    Other,
}

/// Metadata from an entry's header.
pub(crate) struct Meta {
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    pub xattrs: Vec<(CString, Vec<u8>)>,
}

pub(crate) struct Tree {
    root: PathBuf,
    /// Metadata of the directories the archive lists, applied by `finish` (directories made
    /// only as parents are not here). The ordering keeps a directory's descendants right after it.
    dirs: BTreeMap<PathBuf, Meta>,
    /// Running as root: a chown refused with EPERM is then an error, not expected.
    privileged: bool,
    skipped_xattrs: u64,
}

impl Tree {
    /// The tree at `root`, which must be an existing empty directory.
    pub(crate) fn open(root: &Path) -> Result<Tree, Refusal> {
        let is_dir = fs::symlink_metadata(root).is_ok_and(|m| m.is_dir());
        let empty = is_dir && fs::read_dir(root).is_ok_and(|mut entries| entries.next().is_none());
        if !empty {
            return Err(Refusal::Io(format!("{} is not an empty directory", root.display())));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let privileged = unsafe { libc::geteuid() } == 0;
        Ok(Tree { root: root.to_path_buf(), dirs: BTreeMap::new(), privileged, skipped_xattrs: 0 })
    }

    /// The longest relative path whose absolute form still fits in PATH_MAX.
    pub(crate) fn max_rel_len(&self) -> usize {
        PATH_MAX.saturating_sub(self.root.as_os_str().len() + 2)
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    pub(crate) fn lookup(&self, rel: &Path) -> Result<Found, Refusal> {
        match fs::symlink_metadata(self.abs(rel)) {
            Ok(meta) => {
                let kind = meta.file_type();
                Ok(if kind.is_symlink() {
                    Found::Symlink
                } else if kind.is_dir() {
                    Found::Dir
                } else if kind.is_file() {
                    Found::File
                } else {
                    Found::Other
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Found::Missing),
            Err(e) => Err(failed("look at", rel, &e)),
        }
    }

    /// Checks that every parent of `rel` is a real directory, never a symlink (`what` names
    /// the path in the refusal). With a budget, missing parents are made (each counted as an
    /// entry) and a parent that is not a directory is refused; without one, Ok(false) says a
    /// parent is missing or not a directory, so nothing can be at `rel`.
    pub(crate) fn parents(&mut self, rel: &Path, what: &str, mut make: Option<&mut Budget>) -> Result<bool, Refusal> {
        let Some(parent) = rel.parent() else { return Ok(true) };
        let mut at = PathBuf::new();
        for part in parent.components() {
            at.push(part);
            match self.lookup(&at)? {
                Found::Dir => {}
                Found::Symlink => {
                    return Err(Refusal::Invalid(format!(
                        "{what} goes through {}, which is a symlink (symlinks are not followed)",
                        shown(&at)
                    )))
                }
                Found::Missing => match make.as_deref_mut() {
                    Some(budget) => {
                        budget.take_entry()?;
                        self.mkdir(&at)?;
                        fs::set_permissions(self.abs(&at), Permissions::from_mode(IMPLICIT_DIR_MODE))
                            .map_err(|e| failed("set the mode of", &at, &e))?;
                    }
                    None => return Ok(false),
                },
                Found::File | Found::Other if make.is_some() => {
                    return Err(Refusal::Invalid(format!(
                        "{what} goes through {}, which is not a directory",
                        shown(&at)
                    )))
                }
                Found::File | Found::Other => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The names in directory `rel` (which the caller has seen is a directory).
    pub(crate) fn children(&self, rel: &Path) -> Result<Vec<OsString>, Refusal> {
        let entries = fs::read_dir(self.abs(rel)).map_err(|e| failed("list", rel, &e))?;
        entries.map(|entry| entry.map(|e| e.file_name()).map_err(|e| failed("list", rel, &e))).collect()
    }

    /// Removes whatever is at `rel`, a whole directory tree included (std's remove_dir_all
    /// does not follow symlinks), and forgets the directory metadata recorded under it.
    pub(crate) fn remove(&mut self, rel: &Path) -> Result<(), Refusal> {
        let abs = self.abs(rel);
        let removed = match self.lookup(rel)? {
            Found::Missing => return Ok(()),
            Found::Dir => fs::remove_dir_all(&abs),
            Found::File | Found::Symlink | Found::Other => fs::remove_file(&abs),
        };
        removed.map_err(|e| failed("remove", rel, &e))?;
        let under: Vec<PathBuf> =
            self.dirs.range(rel.to_path_buf()..).map(|(k, _)| k).take_while(|k| k.starts_with(rel)).cloned().collect();
        for dir in under {
            self.dirs.remove(&dir);
        }
        Ok(())
    }

    /// Makes `rel` a directory (keeping one that is there, with its content) and records its
    /// metadata for `finish`.
    pub(crate) fn dir(&mut self, rel: &Path, meta: Meta) -> Result<(), Refusal> {
        if self.lookup(rel)? != Found::Dir {
            self.remove(rel)?;
            self.mkdir(rel)?;
        }
        self.dirs.insert(rel.to_path_buf(), meta);
        Ok(())
    }

    fn mkdir(&self, rel: &Path) -> Result<(), Refusal> {
        DirBuilder::new().mode(IMPLICIT_DIR_MODE).create(self.abs(rel)).map_err(|e| failed("create", rel, &e))
    }

    /// A new, empty regular file at `rel` (readable and writable by us only until `set_meta`).
    pub(crate) fn create_file(&mut self, rel: &Path) -> Result<File, Refusal> {
        self.remove(rel)?;
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.abs(rel))
            .map_err(|e| failed("create", rel, &e))
    }

    pub(crate) fn symlink(&mut self, rel: &Path, target: &[u8]) -> Result<(), Refusal> {
        self.remove(rel)?;
        std::os::unix::fs::symlink(OsStr::from_bytes(target), self.abs(rel)).map_err(|e| failed("create", rel, &e))
    }

    /// A hard link at `rel` to the regular file at `target` (which the caller has checked).
    pub(crate) fn hard_link(&mut self, rel: &Path, target: &Path) -> Result<(), Refusal> {
        self.remove(rel)?;
        // link(2) without AT_SYMLINK_FOLLOW: a symlink at `target` would be linked, not followed.
        fs::hard_link(self.abs(target), self.abs(rel)).map_err(|e| {
            if e.raw_os_error() == Some(libc::EMLINK) {
                Refusal::Invalid(format!("{} has more hard links than the filesystem allows", shown(target)))
            } else {
                failed("create", rel, &e)
            }
        })
    }

    pub(crate) fn fifo(&mut self, rel: &Path) -> Result<(), Refusal> {
        self.remove(rel)?;
        let path = c_path(&self.abs(rel))?;
        // SAFETY: `path` is a NUL-terminated string that outlives the call; mknod creates a
        // new node (failing if anything is there) and keeps no pointer.
        let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFIFO | 0o600, 0) };
        if rc != 0 {
            return Err(failed("create", rel, &io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Applies owner, mode (not to a symlink, which has none), xattrs and mtime, in that order:
    /// chown clears setuid/setgid bits and file capabilities, and the times go last.
    pub(crate) fn set_meta(&mut self, rel: &Path, meta: &Meta, symlink: bool) -> Result<(), Refusal> {
        let abs = self.abs(rel);
        let path = c_path(&abs)?;
        // SAFETY: `path` is a NUL-terminated string that outlives the call; lchown acts on a
        // symlink itself rather than its target and keeps no pointer.
        if unsafe { libc::lchown(path.as_ptr(), meta.uid, meta.gid) } != 0 {
            let e = io::Error::last_os_error();
            if self.privileged || e.raw_os_error() != Some(libc::EPERM) {
                return Err(failed("set the owner of", rel, &e));
            }
        }
        if !symlink {
            fs::set_permissions(&abs, Permissions::from_mode(meta.mode))
                .map_err(|e| failed("set the mode of", rel, &e))?;
        }
        for (name, value) in &meta.xattrs {
            self.set_xattr(rel, &path, name, value)?;
        }
        let time = |(sec, nsec): (i64, u32)| libc::timespec { tv_sec: sec as libc::time_t, tv_nsec: nsec.into() };
        let times = [time(meta.mtime), time(meta.mtime)];
        // SAFETY: `path` is NUL-terminated and `times` is the two-element array utimensat
        // reads; both outlive the call. AT_SYMLINK_NOFOLLOW sets a symlink's own times.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
        if rc != 0 {
            return Err(failed("set the times of", rel, &io::Error::last_os_error()));
        }
        Ok(())
    }

    fn set_xattr(&mut self, rel: &Path, path: &CStr, name: &CStr, value: &[u8]) -> Result<(), Refusal> {
        // SAFETY: `path` and `name` are NUL-terminated and `value` is valid for `value.len()`
        // bytes; all outlive the call, which keeps no pointer. lsetxattr does not follow a
        // symlink.
        let rc = unsafe {
            libc::lsetxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast::<libc::c_void>(), value.len(), 0)
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        let name = name.to_string_lossy();
        match e.raw_os_error() {
            // Not taken here (a namespace the filesystem or LSM does not store, or user.* on a
            // symlink or FIFO); ENOTSUP is the same number as EOPNOTSUPP on Linux.
            Some(libc::EPERM | libc::EOPNOTSUPP) => {
                self.skipped_xattrs += 1;
                Ok(())
            }
            // The value itself is refused (malformed ACL, too large for the filesystem).
            Some(libc::EINVAL | libc::E2BIG | libc::ERANGE) => Err(Refusal::Invalid(format!(
                "the filesystem refuses extended attribute {name} of {}: {e}",
                shown(rel)
            ))),
            _ => Err(failed(&format!("set extended attribute {name} of"), rel, &e)),
        }
    }

    /// Applies the recorded directory metadata, deepest first (so a directory made read-only
    /// or inaccessible still takes its children's); returns the xattrs skipped overall.
    pub(crate) fn finish(mut self) -> Result<u64, Refusal> {
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, meta) in dirs.iter().rev() {
            if self.lookup(rel)? == Found::Dir {
                self.set_meta(rel, meta, false)?;
            }
        }
        Ok(self.skipped_xattrs)
    }
}

/// How messages show a relative path (`.` for the root).
pub(crate) fn shown(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.display().to_string()
    }
}

fn failed(action: &str, rel: &Path, e: &io::Error) -> Refusal {
    Refusal::Io(format!("cannot {action} {}: {e}", shown(rel)))
}

fn c_path(path: &Path) -> Result<CString, Refusal> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Refusal::Invalid(format!("{} contains a NUL byte", path.display())))
}

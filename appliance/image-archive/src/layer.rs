//! Applying one layer's tar stream to the tree: each entry checked and written, whiteouts and
//! opaque directories applied to what lower layers left.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tar::EntryType;

use crate::limits::Budget;
use crate::paths;
use crate::stream::{LayerStream, Meters, HEADER_ALLOWANCE};
use crate::tree::{shown, Found, Meta, Tree};
use crate::{Refusal, Reporter};

const COPY_CHUNK: usize = 1 << 20;
const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Linux limits: an xattr's name (XATTR_NAME_MAX) and value (XATTR_SIZE_MAX).
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 << 10;
const PAX_XATTR: &[u8] = b"SCHILY.xattr.";

/// What the current layer has written, so its whiteouts only remove what lower layers left.
#[derive(Default)]
struct Written {
    paths: HashSet<PathBuf>,
    /// Every ancestor of a written path: directories to look into rather than remove.
    ancestors: HashSet<PathBuf>,
}

impl Written {
    fn mark(&mut self, rel: &Path) {
        for ancestor in rel.ancestors().skip(1) {
            if !self.ancestors.insert(ancestor.to_path_buf()) {
                break;
            }
        }
        self.paths.insert(rel.to_path_buf());
    }
}

/// Applies every entry of `stream` (a tar stream) to `tree`.
pub(crate) fn apply(
    stream: &mut LayerStream<'_>,
    meters: &Meters,
    tree: &mut Tree,
    budget: &mut Budget,
    reporter: &mut Reporter<'_>,
) -> Result<(), Refusal> {
    let corrupt = |e: std::io::Error| Refusal::Invalid(format!("the tar stream is corrupt: {e}"));
    let mut archive = tar::Archive::new(stream);
    let mut entries = archive.entries().map_err(corrupt)?;
    let mut written = Written::default();
    let mut buf = vec![0u8; COPY_CHUNK];
    loop {
        // Between two entries the tar reader reads only headers (every entry's data has been
        // read by then, or it has none), so what it may read is bounded.
        meters.header_allowance.set(Some(HEADER_ALLOWANCE));
        let next = entries.next();
        meters.header_allowance.set(None);
        let Some(entry) = next else { break };
        let mut entry = entry.map_err(corrupt)?;
        let raw_path = entry.path_bytes().into_owned();
        let mut step = Step { tree: &mut *tree, budget: &mut *budget, written: &mut written };
        step.entry(&mut entry, &raw_path, &mut buf, reporter)
            .map_err(|r| r.within(&format!("entry {:?}", String::from_utf8_lossy(&raw_path))))?;
        reporter.tick(budget.bytes());
    }
    Ok(())
}

struct Step<'a> {
    tree: &'a mut Tree,
    budget: &'a mut Budget,
    written: &'a mut Written,
}

impl Step<'_> {
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw_path: &[u8],
        buf: &mut [u8],
        reporter: &mut Reporter<'_>,
    ) -> Result<(), Refusal> {
        let mut kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            // Global PAX records carry nothing we apply; the tar reader skips their data within
            // the header allowance.
            return Ok(());
        }
        self.budget.take_entry()?;
        let rel = paths::relative(raw_path, self.tree.max_rel_len()).map_err(Refusal::Invalid)?;
        // Old tar writers marked directories with a regular type and a trailing slash.
        if kind.is_file() && raw_path.ends_with(b"/") {
            kind = EntryType::Directory;
        }
        let regular = kind.is_file() || kind == EntryType::Continuous;
        let size = entry.size();
        if !regular && size > 0 {
            return Err(Refusal::Invalid(format!("a {} entry declares {size} bytes of data", describe(kind))));
        }
        let name = rel.file_name().map(OsStrExt::as_bytes).unwrap_or_default();
        if let Some(whiteout) = name.strip_prefix(WHITEOUT) {
            if size > 0 {
                return Err(Refusal::Invalid(format!("a whiteout declares {size} bytes of data")));
            }
            let parent = rel.parent().unwrap_or(Path::new(""));
            return self.whiteout(parent, name, whiteout);
        }
        if rel.as_os_str().is_empty() && kind != EntryType::Directory {
            return Err(Refusal::Invalid(format!("a {} entry cannot replace the root directory", describe(kind))));
        }
        match kind {
            EntryType::Directory => {
                let meta = meta(entry)?;
                self.tree.parents(&rel, "the path", Some(self.budget))?;
                self.tree.dir(&rel, meta)?;
            }
            _ if regular => {
                let meta = meta(entry)?;
                self.budget.take_bytes(size)?;
                self.tree.parents(&rel, "the path", Some(self.budget))?;
                let mut file = self.tree.create_file(&rel)?;
                copy(entry, &mut file, size, &rel, buf, || reporter.tick(self.budget.bytes()))?;
                drop(file);
                self.tree.set_meta(&rel, &meta, false)?;
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().map(std::borrow::Cow::into_owned).unwrap_or_default();
                paths::check_symlink_target(&rel, &target).map_err(Refusal::Invalid)?;
                let meta = meta(entry)?;
                self.tree.parents(&rel, "the path", Some(self.budget))?;
                self.tree.symlink(&rel, &target)?;
                self.tree.set_meta(&rel, &meta, true)?;
            }
            EntryType::Link => self.hard_link(entry, &rel)?,
            EntryType::Fifo => {
                let meta = meta(entry)?;
                self.tree.parents(&rel, "the path", Some(self.budget))?;
                self.tree.fifo(&rel)?;
                self.tree.set_meta(&rel, &meta, false)?;
            }
            EntryType::Char | EntryType::Block => {
                return Err(Refusal::Invalid(format!("{}s are not allowed in a root filesystem", describe(kind))))
            }
            _ => return Err(Refusal::Invalid(format!("entries of type {} are not supported", describe(kind)))),
        }
        self.written.mark(&rel);
        Ok(())
    }

    fn hard_link<R: Read>(&mut self, entry: &tar::Entry<'_, R>, rel: &Path) -> Result<(), Refusal> {
        let raw = entry.link_name_bytes().map(std::borrow::Cow::into_owned).unwrap_or_default();
        let target = paths::relative(&raw, self.tree.max_rel_len())
            .map_err(|why| Refusal::Invalid(format!("its link target {:?}: {why}", String::from_utf8_lossy(&raw))))?;
        let exists = self.tree.parents(&target, "the link target", None)?;
        let found = if exists { self.tree.lookup(&target)? } else { Found::Missing };
        match found {
            Found::File => {}
            Found::Missing => {
                return Err(Refusal::Invalid(format!("its link target {} is not in the tree", shown(&target))))
            }
            _ => return Err(Refusal::Invalid(format!("its link target {} is not a regular file", shown(&target)))),
        }
        if target.as_path() != rel {
            if target.starts_with(rel) {
                // Replacing `rel` would remove the directory holding the target.
                return Err(Refusal::Invalid(format!("its link target {} is inside it", shown(&target))));
            }
            self.tree.parents(rel, "the path", Some(self.budget))?;
            self.tree.hard_link(rel, &target)?;
        }
        Ok(())
    }

    /// `.wh.<name>` in `parent` removes `<name>` as lower layers left it; `.wh..wh..opq` makes
    /// `parent` opaque: everything lower layers left in it goes.
    fn whiteout(&mut self, parent: &Path, name: &[u8], target: &[u8]) -> Result<(), Refusal> {
        if name == OPAQUE {
            // The directory itself is part of this layer: made (with its parents) if missing.
            self.tree.parents(&parent.join("x"), "the opaque directory", Some(self.budget))?;
            for child in self.tree.children(parent)? {
                self.prune(&parent.join(child))?;
            }
            return Ok(());
        }
        if target.starts_with(WHITEOUT) {
            // Other aufs metadata (.wh..wh.plnk, .wh..wh.aufs): nothing to apply.
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(Refusal::Invalid("the whiteout names no file".to_string()));
        }
        let doomed = parent.join(std::ffi::OsStr::from_bytes(target));
        if self.tree.parents(&doomed, "the whiteout", None)? {
            self.prune(&doomed)?;
        }
        Ok(())
    }

    /// Removes `rel` and everything under it except what this layer wrote (and the directories
    /// leading to that).
    fn prune(&mut self, rel: &Path) -> Result<(), Refusal> {
        if !self.written.paths.contains(rel) && !self.written.ancestors.contains(rel) {
            return self.tree.remove(rel);
        }
        if self.tree.lookup(rel)? == Found::Dir {
            for child in self.tree.children(rel)? {
                self.prune(&rel.join(child))?;
            }
        }
        Ok(())
    }
}

/// Copies exactly `size` bytes of the entry's data into `file`.
fn copy(
    entry: &mut impl Read,
    file: &mut std::fs::File,
    size: u64,
    rel: &Path,
    buf: &mut [u8],
    mut tick: impl FnMut(),
) -> Result<(), Refusal> {
    use std::io::Write;
    let mut left = size;
    while left > 0 {
        let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        let n = match entry.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(Refusal::Invalid(format!(
                    "the archive ends inside the file's data ({} of {size} bytes; it is truncated)",
                    size - left
                )))
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Refusal::Invalid(format!("the file's data cannot be read: {e}"))),
        };
        file.write_all(&buf[..n]).map_err(|e| Refusal::Io(format!("cannot write {}: {e}", shown(rel))))?;
        left -= n as u64;
        tick();
    }
    Ok(())
}

/// The metadata an entry's header and PAX records give.
fn meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, Refusal> {
    let bad = |what: &str, e: &dyn std::fmt::Display| Refusal::Invalid(format!("its header has a bad {what}: {e}"));
    let header = entry.header();
    let mode = header.mode().map_err(|e| bad("mode", &e))? & 0o7777;
    let id = |value: std::io::Result<u64>, what: &str| {
        let value = value.map_err(|e| bad(what, &e))?;
        // (uid_t)-1 means "leave unchanged" to chown, so it is no id either.
        u32::try_from(value)
            .ok()
            .filter(|&v| v != u32::MAX)
            .ok_or_else(|| bad(what, &format!("{value} is out of range")))
    };
    let uid = id(header.uid(), "uid")?;
    let gid = id(header.gid(), "gid")?;
    let seconds = header.mtime().map_err(|e| bad("mtime", &e))?;
    let mut mtime = (i64::try_from(seconds).map_err(|_| bad("mtime", &format!("{seconds} is out of range")))?, 0);
    let mut xattrs = Vec::new();
    if let Some(records) = entry.pax_extensions().map_err(|e| bad("PAX header", &e))? {
        for record in records {
            let record = record.map_err(|e| bad("PAX record", &e))?;
            let key = record.key_bytes();
            if let Some(name) = key.strip_prefix(PAX_XATTR) {
                xattrs.push(xattr(name, record.value_bytes())?);
            } else if key == b"mtime" {
                // Sub-second precision, when the writer recorded it.
                if let Some(precise) = pax_time(record.value_bytes()) {
                    mtime = precise;
                }
            }
        }
    }
    Ok(Meta { mode, uid, gid, mtime, xattrs })
}

fn xattr(name: &[u8], value: &[u8]) -> Result<(CString, Vec<u8>), Refusal> {
    let shown = String::from_utf8_lossy(name);
    if name.is_empty() || name.len() > XATTR_NAME_MAX {
        return Err(Refusal::Invalid(format!("extended attribute name {shown:?} is empty or too long")));
    }
    if value.len() > XATTR_SIZE_MAX {
        return Err(Refusal::Invalid(format!("extended attribute {shown} is longer than {XATTR_SIZE_MAX} bytes")));
    }
    let name = CString::new(name)
        .map_err(|_| Refusal::Invalid(format!("extended attribute name {shown:?} contains a NUL byte")))?;
    Ok((name, value.to_vec()))
}

/// A PAX time, `seconds[.fraction]` (non-negative); None when malformed.
fn pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let text = std::str::from_utf8(value).ok()?;
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds = whole.parse::<i64>().ok()?;
    let digits: String = fraction.chars().chain(std::iter::repeat('0')).take(9).collect();
    Some((seconds, digits.parse().ok()?))
}

fn describe(kind: EntryType) -> String {
    match kind {
        EntryType::Regular | EntryType::Continuous => "regular file".to_string(),
        EntryType::Link => "hard link".to_string(),
        EntryType::Symlink => "symlink".to_string(),
        EntryType::Char => "character device".to_string(),
        EntryType::Block => "block device".to_string(),
        EntryType::Directory => "directory".to_string(),
        EntryType::Fifo => "FIFO".to_string(),
        EntryType::GNUSparse => "GNU sparse file".to_string(),
        other => format!("{:?}", char::from(other.as_byte())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_keep_nanoseconds() {
        assert_eq!(pax_time(b"1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(pax_time(b"12"), Some((12, 0)));
        assert_eq!(pax_time(b"1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(pax_time(b"-1.5"), None);
        assert_eq!(pax_time(b"x"), None);
    }
}

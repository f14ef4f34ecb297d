//! The outer tar of an image archive, indexed once (path -> where its data is) so that each
//! blob can be read in place, never extracted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Take};
use std::path::{Path, PathBuf};

use crate::stream::Compression;
use crate::Refusal;

/// A JSON document (index, manifest, config) larger than this is refused, not read.
pub(crate) const MAX_JSON: u64 = 4 << 20;
/// More members than any image archive has; beyond it the archive is refused, not indexed.
const MAX_MEMBERS: usize = 200_000;
/// Symlinks and hard links between members followed per lookup (docker save links layers
/// shared by several images).
const MAX_LINK_HOPS: usize = 16;
const BLOCK: u64 = 512;

pub(crate) struct Outer {
    path: PathBuf,
    members: HashMap<String, Member>,
}

enum Member {
    Data {
        offset: u64,
        size: u64,
    },
    /// A symlink or hard link to another member (its normalized path).
    Link(String),
}

impl Outer {
    /// Reads every header of the archive (seeking over the data) and records its regular files
    /// and links.
    pub(crate) fn scan(path: &Path) -> Result<Outer, Refusal> {
        let mut file = File::open(path).map_err(|e| Refusal::Io(format!("cannot open the archive: {e}")))?;
        let len = file.metadata().map_err(|e| Refusal::Io(format!("cannot read the archive: {e}")))?.len();
        if len == 0 {
            return Err(Refusal::Invalid("the archive is empty".to_string()));
        }
        let mut magic = [0u8; 6];
        let n = file.read(&mut magic).map_err(|e| Refusal::Io(format!("cannot read the archive: {e}")))?;
        if Compression::detect(&magic[..n]).map_or(true, |c| !matches!(c, Compression::Plain)) {
            return Err(Refusal::Invalid(
                "the image archive is compressed; upload the uncompressed tar that docker save or an OCI layout \
                 export writes (its layers may be compressed)"
                    .to_string(),
            ));
        }
        file.seek(SeekFrom::Start(0)).map_err(|e| Refusal::Io(format!("cannot read the archive: {e}")))?;
        let not_tar = |e: std::io::Error| Refusal::Invalid(format!("the archive is not a readable tar file: {e}"));
        let mut archive = tar::Archive::new(&file);
        let mut members = HashMap::new();
        // Where the last entry's data (padded to a block) ends: the end-of-archive marker must follow.
        let mut end = 0u64;
        for entry in archive.entries_with_seek().map_err(not_tar)? {
            let entry = entry.map_err(not_tar)?;
            if members.len() >= MAX_MEMBERS {
                return Err(Refusal::Invalid(format!("the archive has more than {MAX_MEMBERS} members")));
            }
            let size = entry.size();
            let offset = entry.raw_file_position();
            end = offset.saturating_add(size.div_ceil(BLOCK).saturating_mul(BLOCK));
            let Ok(name) = std::str::from_utf8(&entry.path_bytes()).map(normalize) else { continue };
            let kind = entry.header().entry_type();
            if kind.is_file() || kind == tar::EntryType::Continuous {
                if offset.saturating_add(size) > len {
                    return Err(Refusal::Invalid(format!(
                        "the archive is truncated: {name} ends at byte {} but the file has {len}",
                        offset.saturating_add(size)
                    )));
                }
                members.insert(name, Member::Data { offset, size });
            } else if kind.is_symlink() || kind.is_hard_link() {
                let Some(target) = entry.link_name_bytes() else { continue };
                let Ok(target) = std::str::from_utf8(&target) else { continue };
                // A symlink's target is relative to its directory; a hard link's to the archive.
                let resolved = if kind.is_symlink() { resolve(&name, target) } else { Some(normalize(target)) };
                if let Some(resolved) = resolved {
                    members.insert(name, Member::Link(resolved));
                }
            }
        }
        if len < end.saturating_add(BLOCK) {
            return Err(Refusal::Invalid(
                "the archive is truncated (it ends without the tar end-of-archive marker)".to_string(),
            ));
        }
        Ok(Outer { path: path.to_path_buf(), members })
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// The member's data as a reader of exactly its size, and the size; None when the archive
    /// has no such member.
    pub(crate) fn open(&self, name: &str) -> Result<Option<(Take<File>, u64)>, Refusal> {
        let Some((offset, size)) = self.find(name) else { return Ok(None) };
        let io = |e: std::io::Error| Refusal::Io(format!("cannot read the archive: {e}"));
        let mut file = File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        Ok(Some((file.take(size), size)))
    }

    /// A JSON document's bytes (at most `MAX_JSON`); `what` names it in a refusal.
    pub(crate) fn read_json(&self, name: &str, what: &str) -> Result<Option<Vec<u8>>, Refusal> {
        let Some((mut reader, size)) = self.open(name)? else { return Ok(None) };
        if size > MAX_JSON {
            return Err(Refusal::Invalid(format!("{what} is {size} bytes, more than the {MAX_JSON} allowed")));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        reader.read_to_end(&mut bytes).map_err(|e| Refusal::Io(format!("cannot read the archive: {e}")))?;
        if bytes.len() as u64 != size {
            return Err(Refusal::Invalid(format!("{what} is cut short (the archive is truncated)")));
        }
        Ok(Some(bytes))
    }

    fn find(&self, name: &str) -> Option<(u64, u64)> {
        let mut name = normalize(name);
        for _ in 0..=MAX_LINK_HOPS {
            match self.members.get(&name)? {
                Member::Data { offset, size } => return Some((*offset, *size)),
                Member::Link(target) => name.clone_from(target),
            }
        }
        None
    }
}

/// A member path as the index keys it: no leading `./`, no trailing `/`.
pub(crate) fn normalize(name: &str) -> String {
    let mut name = name;
    while let Some(rest) = name.strip_prefix("./") {
        name = rest.trim_start_matches('/');
    }
    name.trim_end_matches('/').to_string()
}

/// A symlink member's target as a member path, resolved lexically from the link's directory;
/// None when it leaves the archive.
fn resolve(link: &str, target: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    if !target.starts_with('/') {
        parts = link.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
        parts.pop();
    }
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            _ => parts.push(part),
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_paths_are_normalized_and_links_resolved_within_the_archive() {
        assert_eq!(normalize("./blobs/sha256/ab"), "blobs/sha256/ab");
        assert_eq!(normalize("././index.json"), "index.json");
        assert_eq!(normalize("dir/"), "dir");
        assert_eq!(resolve("b/layer.tar", "../a/layer.tar").as_deref(), Some("a/layer.tar"));
        assert_eq!(resolve("b/layer.tar", "/a/layer.tar").as_deref(), Some("a/layer.tar"));
        assert_eq!(resolve("layer.tar", "../x"), None);
    }
}

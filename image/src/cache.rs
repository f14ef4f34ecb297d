//! The artifact cache outside the git tree: `$OC_CACHE_DIR`, else `$XDG_CACHE_HOME/opencomputer`,
//! else `~/.cache/opencomputer`. An entry is a directory named after what it holds and a hash of
//! every input that decides its content; it is built in a temporary directory and renamed into
//! place, so an interrupted build never leaves a half entry that looks complete.

use crate::error::{Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    if let Some(dir) = std::env::var_os("OC_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("opencomputer");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/opencomputer")
}

/// Hash of a list of named inputs; names are part of the hash so inputs cannot alias.
pub fn key(inputs: &[(&str, &[u8])]) -> String {
    let mut hasher = Sha256::new();
    for (name, value) in inputs {
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((value.len() as u64).to_le_bytes());
        hasher.update(value);
    }
    hex(&hasher.finalize()[..8])
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Entry {
    pub dir: PathBuf,
}

impl Entry {
    pub fn new(kind: &str, key: &str) -> Entry {
        Entry { dir: root().join(format!("{kind}-{key}")) }
    }

    pub fn is_complete(&self) -> bool {
        self.dir.join(".complete").exists()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs `fill` on a fresh temporary directory and moves it into place when it succeeds.
    /// Builds of the same entry on one machine take turns (a lock file beside it): the second
    /// finds the first one's result and keeps it.
    pub fn fill(&self, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let parent = self.dir.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).ctx(|| format!("create cache dir {}", parent.display()))?;
        let _lock = lock(&self.dir.with_extension("lock"))?;
        if self.is_complete() {
            return Ok(());
        }
        let tmp = self.dir.with_extension(format!("tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).ctx(|| format!("remove {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        fill(&tmp)?;
        std::fs::write(tmp.join(".complete"), b"").ctx(|| "mark cache entry complete".to_string())?;
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).ctx(|| format!("remove stale {}", self.dir.display()))?;
        }
        std::fs::rename(&tmp, &self.dir).ctx(|| format!("move {} into place", self.dir.display()))
    }
}

/// An exclusive advisory lock on `path`, held until the returned file is dropped.
fn lock(path: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ctx(|| format!("open lock file {}", path.display()))?;
    // SAFETY: flock on a descriptor we own for the duration of the call; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(crate::err!("lock {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_every_input_and_its_boundaries() {
        let a = key(&[("x", b"ab"), ("y", b"c")]);
        assert_eq!(a, key(&[("x", b"ab"), ("y", b"c")]));
        assert_ne!(a, key(&[("x", b"a"), ("y", b"bc")]));
        assert_ne!(a, key(&[("x", b"ab"), ("z", b"c")]));
        assert_eq!(a.len(), 16);
    }
}

//! The initramfs: a file tree assembled in memory from host files and generated text, written
//! as a sorted newc cpio archive and compressed with zstd. Sorted paths, fixed owners and
//! timestamps make it reproducible.

use crate::cpio::{CpioWriter, Kind};
use crate::err;
use crate::error::{Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

enum Node {
    Dir,
    HostFile { source: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDevice { major: u32, minor: u32, mode: u32 },
}

#[derive(Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    pub fn dir(&mut self, path: &str) -> Result<()> {
        let rel = relative(path)?;
        self.parents(&rel);
        self.nodes.insert(rel, Node::Dir);
        Ok(())
    }

    pub fn host_file(&mut self, path: &str, source: &Path, mode: u32) -> Result<()> {
        if !source.is_file() {
            return Err(err!("{} (for {path} in the initramfs) does not exist", source.display()));
        }
        self.insert(path, Node::HostFile { source: source.to_path_buf(), mode })
    }

    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Result<()> {
        self.insert(path, Node::Bytes { data: data.into(), mode })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(path, Node::Symlink(target.to_string()))
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32, mode: u32) -> Result<()> {
        self.insert(path, Node::CharDevice { major, minor, mode })
    }

    /// Adds every file under `host_dir` at `image_dir`.
    pub fn host_tree(&mut self, image_dir: &str, host_dir: &Path) -> Result<()> {
        for entry in std::fs::read_dir(host_dir).ctx(|| format!("list {}", host_dir.display()))? {
            let entry = entry.ctx(|| format!("list {}", host_dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let image_path = format!("{}/{name}", image_dir.trim_end_matches('/'));
            let kind = entry.file_type().ctx(|| format!("stat {}", entry.path().display()))?;
            if kind.is_dir() {
                self.dir(&image_path)?;
                self.host_tree(&image_path, &entry.path())?;
            } else if kind.is_file() {
                self.host_file(&image_path, &entry.path(), 0o644)?;
            }
        }
        Ok(())
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        let rel = relative(path)?;
        self.parents(&rel);
        if let Some(Node::Dir) = self.nodes.get(&rel) {
            return Err(err!("{path} is already a directory in the initramfs"));
        }
        self.nodes.insert(rel, node);
        Ok(())
    }

    fn parents(&mut self, rel: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.nodes.entry(prefix.clone()).or_insert(Node::Dir);
        }
    }

    /// Writes the compressed archive to `out`; returns (uncompressed, compressed) sizes.
    pub fn write_compressed(&self, out: &Path) -> Result<(u64, u64)> {
        let file = std::fs::File::create(out).ctx(|| format!("create {}", out.display()))?;
        // Single-threaded zstd: the same input always gives the same bytes.
        let mut zstd = Command::new("zstd")
            .args(["-q", "-9", "-T1", "-c"])
            .stdin(Stdio::piped())
            .stdout(file)
            .spawn()
            .ctx(|| "start zstd".into())?;
        let stdin = zstd.stdin.take().ok_or_else(|| err!("zstd has no stdin"))?;
        let size = self.write_cpio(std::io::BufWriter::new(stdin))?;
        let status = zstd.wait().ctx(|| "wait for zstd".into())?;
        if !status.success() {
            return Err(err!("zstd failed ({status})"));
        }
        let compressed = std::fs::metadata(out).ctx(|| format!("stat {}", out.display()))?.len();
        Ok((size, compressed))
    }

    /// Writes the archive to `out` as it is (no compression); returns its size.
    pub fn write_uncompressed(&self, out: &Path) -> Result<u64> {
        let file = std::fs::File::create(out).ctx(|| format!("create {}", out.display()))?;
        self.write_cpio(std::io::BufWriter::new(file))
    }

    /// The newc archive of the tree, in path order, into `sink` (flushed and dropped at the end);
    /// returns its size.
    fn write_cpio<W: Write>(&self, sink: W) -> Result<u64> {
        let mut writer = CpioWriter::new(sink);
        for (path, node) in &self.nodes {
            match node {
                Node::Dir => writer.add(path, 0o755, Kind::Directory),
                Node::HostFile { source, mode } => {
                    let data = std::fs::read(source).ctx(|| format!("read {}", source.display()))?;
                    writer.add(path, *mode, Kind::File(&data))
                }
                Node::Bytes { data, mode } => writer.add(path, *mode, Kind::File(data)),
                Node::Symlink(target) => writer.add(path, 0o777, Kind::Symlink(target)),
                Node::CharDevice { major, minor, mode } => {
                    writer.add(path, *mode, Kind::CharDevice { major: *major, minor: *minor })
                }
            }
            .ctx(|| format!("write {path} to the initramfs"))?;
        }
        let (mut sink, size) = writer.finish().ctx(|| "finish cpio archive".into())?;
        sink.flush().ctx(|| "write the cpio archive".into())?;
        Ok(size)
    }
}

fn relative(path: &str) -> Result<String> {
    let rel = path.trim_start_matches('/').trim_end_matches('/');
    if rel.is_empty() || rel.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
        return Err(err!("bad initramfs path {path:?}"));
    }
    Ok(rel.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_created_and_paths_validated() {
        let mut tree = Tree::new();
        tree.bytes("/etc/opencomputer/services", "x", 0o644).expect("add");
        assert!(matches!(tree.nodes.get("etc"), Some(Node::Dir)));
        assert!(matches!(tree.nodes.get("etc/opencomputer"), Some(Node::Dir)));
        assert!(tree.bytes("/a/../b", "x", 0o644).is_err());
        assert!(tree.bytes("/", "x", 0o644).is_err());
        assert!(tree.bytes("/etc", "x", 0o644).is_err(), "a directory cannot become a file");
    }
}

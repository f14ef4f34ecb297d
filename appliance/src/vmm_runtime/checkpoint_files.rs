//! Checkpoints on the data disk, one directory each under `checkpoints/`:
//!
//! - `<id>.partial/`: being written; a start after a crash removes it;
//! - `<id>/{disk, state, memory}`: complete and durable (a disk-only checkpoint has only `disk`),
//!   renamed into place only then, so its presence alone says it is usable. Its files never
//!   change: a restored VMM maps `memory` copy-on-write and sandboxes get reflink clones of `disk`.
//!
//! The VMM writes a checkpoint where it writes every snapshot (`snapshot_dir::NEXT`, files it holds
//! open and overwrites with the next one), so a checkpoint is kept as reflink clones of those
//! files, which then are emptied: the clones share the blocks, and nothing is left behind when the
//! checkpoint is deleted.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::snapshot_dir::{sync_dir, DISK, MEMORY, STATE};
use super::templates::reflink;
use crate::runtime::{CheckpointKind, RuntimeError};

const PARTIAL: &str = ".partial";

pub struct CheckpointFiles {
    root: PathBuf,
}

impl CheckpointFiles {
    /// Opens `root` (creating it) and removes checkpoints a crash left half-written.
    pub fn open(root: PathBuf) -> Result<CheckpointFiles, String> {
        fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let files = CheckpointFiles { root };
        for entry in fs::read_dir(&files.root).map_err(|e| format!("cannot read {}: {e}", files.root.display()))? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(PARTIAL) {
                println!("appliance: removing checkpoint {name}: a crash interrupted writing it");
                if let Err(e) = fs::remove_dir_all(entry.path()) {
                    println!("appliance: cannot remove {}: {e}", entry.path().display());
                }
            }
        }
        Ok(files)
    }

    /// Keeps what the VMM wrote to `snapshot` as checkpoint `id` (for `disk_only`, the disk copy
    /// alone); returns the bytes it takes. On an error nothing is kept.
    pub fn keep(&self, id: &str, snapshot: &Path, kind: CheckpointKind) -> Result<u64, RuntimeError> {
        let failed = |e: io::Error| RuntimeError::Failed(format!("checkpoint {id}: {e}"));
        let partial = self.root.join(format!("{id}{PARTIAL}"));
        fs::create_dir(&partial).map_err(failed)?;
        let kept = self.fill(&partial, snapshot, kind).and_then(|bytes| {
            sync_dir(&partial).map_err(failed)?;
            fs::rename(&partial, self.root.join(id)).map_err(failed)?;
            sync_dir(&self.root).map_err(failed)?;
            Ok(bytes)
        });
        if kept.is_err() {
            let _ = fs::remove_dir_all(&partial);
        }
        // The checkpoint shares their blocks, or there is none: either way they are of no more use.
        for name in [STATE, MEMORY, DISK] {
            if let Ok(f) = OpenOptions::new().write(true).open(snapshot.join(name)) {
                let _ = f.set_len(0);
            }
        }
        kept
    }

    fn fill(&self, partial: &Path, snapshot: &Path, kind: CheckpointKind) -> Result<u64, RuntimeError> {
        let names: &[&str] = match kind {
            CheckpointKind::Full => &[DISK, STATE, MEMORY],
            CheckpointKind::DiskOnly => &[DISK],
        };
        let mut bytes = 0;
        for name in names {
            let to = partial.join(name);
            reflink(&snapshot.join(name), &to)?;
            let file = File::open(&to).and_then(|f| f.sync_all().map(|()| f));
            let meta = file
                .and_then(|f| f.metadata())
                .map_err(|e| RuntimeError::Failed(format!("cannot flush {}: {e}", to.display())))?;
            // Allocated bytes: the memory file is sparse and the disk mostly shared.
            bytes += meta.blocks() * 512;
        }
        Ok(bytes)
    }

    /// Keeps only the disk of what the VMM wrote to `snapshot`, as the new file `to` (a reflink,
    /// flushed), and empties the snapshot's files as `keep` does.
    pub fn take_disk(snapshot: &Path, to: &Path) -> Result<(), RuntimeError> {
        let taken = reflink(&snapshot.join(DISK), to).and_then(|()| {
            File::open(to)
                .and_then(|f| f.sync_all())
                .map_err(|e| RuntimeError::Failed(format!("cannot flush {}: {e}", to.display())))
        });
        for name in [STATE, MEMORY, DISK] {
            if let Ok(f) = OpenOptions::new().write(true).open(snapshot.join(name)) {
                let _ = f.set_len(0);
            }
        }
        if taken.is_err() {
            let _ = fs::remove_file(to);
        }
        taken
    }

    /// The directory of complete checkpoint `id`.
    pub fn path(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        let dir = self.root.join(id);
        if dir.join(DISK).is_file() {
            Ok(dir)
        } else {
            Err(RuntimeError::NotFound(format!("checkpoint {id} has no files on the data disk")))
        }
    }

    pub fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        match fs::remove_dir_all(self.root.join(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(RuntimeError::Failed(format!("cannot remove checkpoint {id}: {e}")))
            }
            _ => Ok(()),
        }
    }

    /// Every complete checkpoint.
    pub fn ids(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.root) else { return Vec::new() };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| !name.ends_with(PARTIAL) && self.path(name).is_ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("appliance-checkpoints-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    /// What a VMM leaves in its snapshot directory after a checkpoint.
    fn written_snapshot(dir: &Path) -> PathBuf {
        let next = dir.join("snapshot.next");
        fs::create_dir_all(&next).expect("mkdir");
        for (name, bytes) in [(DISK, &b"disk"[..]), (STATE, b"state"), (MEMORY, b"memory")] {
            fs::write(next.join(name), bytes).expect("write");
        }
        next
    }

    fn reflinks_here(dir: &Path) -> bool {
        fs::write(dir.join("probe-a"), b"x").expect("probe");
        let ok = reflink(&dir.join("probe-a"), &dir.join("probe-b")).is_ok();
        let _ = fs::remove_file(dir.join("probe-a"));
        let _ = fs::remove_file(dir.join("probe-b"));
        ok
    }

    #[test]
    fn a_kept_checkpoint_is_complete_and_its_source_emptied() {
        let dir = temp_dir("keep");
        let files = CheckpointFiles::open(dir.join("checkpoints")).expect("open");
        let next = written_snapshot(&dir);
        if !reflinks_here(&dir) {
            // This host's filesystem cannot share blocks (the data disk's XFS can): the checkpoint
            // is refused rather than copied, and nothing is left of it.
            let err = files.keep("c1", &next, CheckpointKind::Full).expect_err("no reflinks");
            assert!(err.to_string().contains("reflink"), "{err}");
            assert!(files.ids().is_empty() && !dir.join("checkpoints").join("c1.partial").exists());
            let _ = fs::remove_dir_all(&dir);
            return;
        }
        files.keep("c1", &next, CheckpointKind::Full).expect("kept");
        let kept = files.path("c1").expect("complete");
        assert_eq!(fs::read(kept.join(MEMORY)).expect("memory"), b"memory");
        assert_eq!(fs::metadata(next.join(MEMORY)).expect("source").len(), 0, "emptied");

        let next = written_snapshot(&dir);
        files.keep("c2", &next, CheckpointKind::DiskOnly).expect("kept");
        let kept = files.path("c2").expect("complete");
        assert!(!kept.join(MEMORY).exists(), "a disk-only checkpoint has no memory");
        assert_eq!(files.ids().len(), 2);
        files.remove("c1").expect("removed");
        files.remove("c1").expect("removing a missing one is fine");
        assert_eq!(files.ids(), vec!["c2".to_string()]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_half_written_checkpoint_is_never_listed_and_is_removed_at_the_next_start() {
        let dir = temp_dir("partial");
        let root = dir.join("checkpoints");
        let files = CheckpointFiles::open(root.clone()).expect("open");
        // A complete one from before, and one a power cut interrupted.
        fs::create_dir_all(root.join("earlier")).expect("mkdir");
        fs::write(root.join("earlier").join(DISK), b"d").expect("disk");
        fs::create_dir_all(root.join("later.partial")).expect("mkdir");
        fs::write(root.join("later.partial").join(DISK), b"half").expect("disk");
        assert_eq!(files.ids(), vec!["earlier".to_string()]);
        assert!(files.path("later").is_err());

        let files = CheckpointFiles::open(root.clone()).expect("reopen");
        assert!(!root.join("later.partial").exists(), "removed at the start");
        assert!(root.join("earlier").join(DISK).exists(), "the earlier one stays");
        // A snapshot whose files are missing is not kept, and leaves nothing behind.
        let err = files.keep("broken", &dir.join("no-snapshot"), CheckpointKind::Full).expect_err("nothing to keep");
        assert!(err.to_string().contains("cannot"), "{err}");
        assert!(!root.join("broken.partial").exists() && !root.join("broken").exists());
        let _ = fs::remove_dir_all(&dir);
    }
}

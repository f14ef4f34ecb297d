//! A sandbox's hibernation snapshot in its directory, and the moves that keep it crash-safe:
//!
//! - `snapshot.next/{state,memory}`: where every VMM writes a snapshot when asked; it may hold
//!   half of one until the VMM reports it written, so a start after a crash removes it;
//! - `hibernated/{state,memory}`: a complete snapshot no VMM runs from, made durable (with the
//!   root disk it goes with) before it is renamed here, so its presence alone says it is usable;
//! - `resumed/{state,memory}`: the snapshot a woken VMM maps copy-on-write (it must stay unchanged
//!   while that VMM runs); stale once the guest ran on, removed at the next hibernation or with
//!   the directory when the VMM ends.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use vmm_contract::{RestoreSource, SnapshotTarget};

pub const NEXT: &str = "snapshot.next";
pub const HIBERNATED: &str = "hibernated";
pub const RESUMED: &str = "resumed";
pub const STATE: &str = "state";
pub const MEMORY: &str = "memory";
/// The root disk's copy a checkpoint writes.
pub const DISK: &str = "disk";

/// Where a VMM started in `dir` writes its snapshots; only a checkpoint writes the disk copy
/// (hibernation leaves the root disk as it is).
pub fn target(dir: &Path) -> SnapshotTarget {
    let next = dir.join(NEXT);
    SnapshotTarget { state: next.join(STATE), memory: next.join(MEMORY), disk: Some(next.join(DISK)) }
}

/// What a VMM resumes from the snapshot directory `snapshot`.
pub fn source(snapshot: &Path) -> RestoreSource {
    RestoreSource { state: snapshot.join(STATE), memory: snapshot.join(MEMORY) }
}

/// An empty `snapshot.next` for a VMM about to start in `dir` (whatever an earlier one left
/// there is no snapshot of the guest to come).
pub fn prepare_next(dir: &Path) -> io::Result<()> {
    remove_if_present(&dir.join(NEXT))?;
    fs::create_dir(dir.join(NEXT))
}

/// After the VMM reported its snapshot written and exited: makes the snapshot and the root disk
/// `disk` durable, then moves the snapshot to `hibernated` and drops the one an earlier wake
/// resumed from. A crash before the rename leaves no `hibernated`, so the half-kept snapshot is
/// never taken for a usable one.
pub fn keep(dir: &Path, disk: &Path) -> io::Result<()> {
    let next = dir.join(NEXT);
    for file in [next.join(STATE), next.join(MEMORY), disk.to_path_buf()] {
        File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot flush {}: {e}", file.display())))?;
    }
    sync_dir(&next)?;
    let kept = dir.join(HIBERNATED);
    // None is expected (a wake moves it away); a rename cannot replace a directory with files.
    remove_if_present(&kept)?;
    fs::rename(&next, &kept)?;
    sync_dir(dir)?;
    remove_if_present(&dir.join(RESUMED))
}

/// Moves the kept snapshot to `resumed` for a VMM about to resume it; returns that directory.
pub fn take_for_resume(dir: &Path) -> io::Result<PathBuf> {
    if !is_complete(dir) {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no complete snapshot in {}", dir.display())));
    }
    let resumed = dir.join(RESUMED);
    remove_if_present(&resumed)?;
    fs::rename(dir.join(HIBERNATED), &resumed)?;
    sync_dir(dir)?;
    Ok(resumed)
}

/// Whether `dir` keeps a complete snapshot (only ever renamed into place once complete).
pub fn is_complete(dir: &Path) -> bool {
    let kept = dir.join(HIBERNATED);
    kept.join(STATE).is_file() && kept.join(MEMORY).is_file()
}

/// In the directory of a sandbox whose VMM is gone: removes what no VMM will write or map any
/// more (a half-written `snapshot.next`, a `resumed` snapshot).
pub fn clean_after_vmm(dir: &Path) -> io::Result<()> {
    remove_if_present(&dir.join(NEXT))?;
    remove_if_present(&dir.join(RESUMED))
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes the entries of `dir` (a rename into it) durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("appliance-snapshot-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("root.ext4"), b"disk").expect("disk");
        dir
    }

    /// What a VMM does with its target: writes both files.
    fn write_snapshot(dir: &Path, tag: &[u8]) {
        let t = target(dir);
        fs::write(t.state, tag).expect("state");
        fs::write(t.memory, tag).expect("memory");
    }

    #[test]
    fn a_snapshot_is_kept_only_once_moved_into_place_and_resumed_from_its_own_name() {
        let dir = sandbox_dir("cycle");
        prepare_next(&dir).expect("prepare");
        write_snapshot(&dir, b"first");
        assert!(!is_complete(&dir), "written but not kept");
        keep(&dir, &dir.join("root.ext4")).expect("keep");
        assert!(is_complete(&dir));
        assert!(!dir.join(NEXT).exists());

        let resumed = take_for_resume(&dir).expect("take");
        assert_eq!(resumed, dir.join(RESUMED));
        assert!(!is_complete(&dir), "a resumed snapshot is not there to resume again");
        assert_eq!(fs::read(source(&resumed).memory).expect("mapped"), b"first");

        // The resumed VMM hibernates again: the new snapshot replaces the one it mapped.
        prepare_next(&dir).expect("prepare");
        write_snapshot(&dir, b"second");
        keep(&dir, &dir.join("root.ext4")).expect("keep");
        assert!(!dir.join(RESUMED).exists());
        assert_eq!(fs::read(dir.join(HIBERNATED).join(MEMORY)).expect("kept"), b"second");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_half_written_snapshot_is_never_taken_and_is_cleaned_away() {
        let dir = sandbox_dir("half");
        prepare_next(&dir).expect("prepare");
        fs::write(target(&dir).state, b"half").expect("state");
        assert!(!is_complete(&dir));
        assert!(take_for_resume(&dir).is_err());
        // A missing snapshot file cannot be made durable, so it is not kept either.
        assert!(keep(&dir, &dir.join("root.ext4")).is_err());
        assert!(!is_complete(&dir));
        clean_after_vmm(&dir).expect("clean");
        assert!(!dir.join(NEXT).exists());
        assert!(dir.join("root.ext4").exists(), "the disk stays");
        let _ = fs::remove_dir_all(&dir);
    }
}

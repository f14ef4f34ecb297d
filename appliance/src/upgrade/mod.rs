//! A/B upgrades from an uploaded disk image (issue 7): its signature is checked (`signature`:
//! a trusted Ed25519 key, before any byte is stored), the image is streamed to a staging file
//! on the data disk (`receive`), checked (`inspect`), and its system partition and unified kernel
//! image installed into the slot that is not running, as a boot entry with a boot counter
//! (`install`). Init commits it after a healthy boot (init/src/appliance/slot.rs); systemd-boot
//! falls back when it never gets there. Nothing on the data disk but the staging file is written.

pub mod inspect;
pub mod install;
pub mod receive;
pub mod signature;
pub mod status;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where the staging file lives, under the data directory.
const STAGING_DIR: &str = "upgrade";
const STAGING_FILE: &str = "upload.img";

pub struct Upgrades {
    dir: PathBuf,
    /// Keys whose signatures make an image installable.
    pub trusted: signature::TrustedKeys,
    /// One upload at a time; a second one gets 409 instead of waiting.
    busy: Mutex<()>,
}

impl Upgrades {
    /// Removes an upload that an interruption (power cut, crash) left behind: it would hold a
    /// disk image's worth of the data disk forever.
    pub fn new(data_dir: &Path, trusted: signature::TrustedKeys) -> Upgrades {
        let upgrades = Upgrades { dir: data_dir.join(STAGING_DIR), trusted, busy: Mutex::new(()) };
        let leftover = upgrades.staging_file();
        if let Ok(meta) = std::fs::metadata(&leftover) {
            match std::fs::remove_file(&leftover) {
                Ok(()) => println!("appliance: removed an interrupted upgrade upload ({} bytes)", meta.len()),
                Err(e) => {
                    println!("appliance: cannot remove the interrupted upgrade upload {}: {e}", leftover.display());
                }
            }
        }
        upgrades
    }

    pub fn staging_file(&self) -> PathBuf {
        self.dir.join(STAGING_FILE)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn try_lock(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        match self.busy.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

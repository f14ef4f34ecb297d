//! The small files a key location keeps (the key, or the key a rotation is moving to): in a
//! directory of the data partition, or on the boot disk's EFI system partition.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use boot_disk::{disk, fat::Fat, layout};
use zeroize::Zeroizing;

use crate::keyfiles::{sync_parent_dir, write_private_file};

/// A key file is tiny; anything bigger is not ours.
const MAX_KEY_FILE: u64 = 4096;
/// The ESP is mounted here only while a key file on it changes.
const ESP_MOUNT: &str = "/run/opencomputer/esp-master-key";
/// The ESP directory holding the key files.
pub const ESP_DIR: &str = "opencomputer";

pub trait KeyFiles: Send + Sync {
    /// The file's bytes; None when it does not exist.
    fn read(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, String>;
    /// Writes the file durably and atomically (temporary file, fsync, rename), mode 0600.
    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), String>;
    /// Renames `from` over `to` durably.
    fn rename(&self, from: &str, to: &str) -> Result<(), String>;
    /// Removes the file if it exists.
    fn remove(&self, name: &str) -> Result<(), String>;
    /// Where the files are, for messages.
    fn describe(&self, name: &str) -> String;
}

/// Files in a directory (the data directory).
pub struct DirFiles(pub PathBuf);

impl KeyFiles for DirFiles {
    fn read(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
        read_local(&self.0.join(name))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        write_private_file(&self.0.join(name), bytes)
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), String> {
        let target = self.0.join(to);
        fs::rename(self.0.join(from), &target).map_err(|e| format!("cannot rename {from} to {to}: {e}"))?;
        sync_parent_dir(&target)
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        remove_local(&self.0.join(name))
    }

    fn describe(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

/// Files in `opencomputer/` on the boot disk's EFI system partition: read without mounting it,
/// changed with it mounted read-write only for the change (FAT has no journal).
pub struct EspFiles;

impl EspFiles {
    /// Whether this machine has the boot disk's ESP (booted from the disk image).
    pub fn available() -> bool {
        disk::find_partition(layout::ESP_NAME).is_some()
    }

    fn change<T>(&self, f: impl FnOnce(&Path) -> Result<T, String>) -> Result<T, String> {
        disk::with_esp_rw(ESP_MOUNT, |root| {
            let dir = Path::new(root).join(ESP_DIR);
            fs::create_dir_all(&dir).map_err(|e| format!("create {ESP_DIR} on the EFI partition: {e}"))?;
            f(&dir)
        })
    }
}

impl KeyFiles for EspFiles {
    fn read(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
        let device = disk::partition_path(layout::ESP_NAME)?;
        let file = File::open(&device).map_err(|e| format!("open {device}: {e}"))?;
        let mut fat = Fat::open(file, 0).map_err(|e| format!("{device}: {e}"))?;
        let path = format!("{ESP_DIR}/{name}");
        if fat.lookup(&path).map_err(|e| format!("{device}: {e}"))?.is_none() {
            return Ok(None);
        }
        let bytes = fat.read_file(&path, MAX_KEY_FILE).map_err(|e| format!("{device}: {e}"))?;
        Ok(Some(Zeroizing::new(bytes)))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        self.change(|dir| write_private_file(&dir.join(name), bytes))
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), String> {
        self.change(|dir| {
            fs::rename(dir.join(from), dir.join(to)).map_err(|e| format!("cannot rename {from} to {to}: {e}"))
        })
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        if self.read(name)?.is_none() {
            return Ok(());
        }
        self.change(|dir| remove_local(&dir.join(name)))
    }

    fn describe(&self, name: &str) -> String {
        format!("{ESP_DIR}/{name} on the EFI system partition")
    }
}

fn read_local(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    match fs::metadata(path) {
        Ok(meta) if meta.len() > MAX_KEY_FILE => {
            return Err(format!("{} is {} bytes: not a key file", path.display(), meta.len()));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    fs::read(path).map(|b| Some(Zeroizing::new(b))).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn remove_local(path: &Path) -> Result<(), String> {
    match fs::remove_file(path) {
        Ok(()) => sync_parent_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn dir_files_write_read_rename_remove() {
        let dir = std::env::temp_dir().join(format!("appliance-keyfiles-dir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        let files = DirFiles(dir.clone());
        assert!(files.read("a").expect("read").is_none());
        files.write("a", b"one").expect("write");
        assert_eq!(fs::metadata(dir.join("a")).expect("stat").permissions().mode() & 0o777, 0o600);
        files.write("a", b"two").expect("overwrite");
        files.rename("a", "b").expect("rename");
        assert!(files.read("a").expect("read").is_none());
        assert_eq!(files.read("b").expect("read").expect("present").as_slice(), b"two");
        files.remove("b").expect("remove");
        files.remove("b").expect("remove twice");
        assert!(files.read("b").expect("read").is_none());
        let _ = fs::remove_dir_all(&dir);
    }
}

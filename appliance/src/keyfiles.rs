//! Master key files (64 hex characters or 32 raw bytes; created mode 0600, written atomically
//! and fsynced) and the lock that gives one process the data directory.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::crypto::{MasterKey, MASTER_KEY_LEN};

pub const MASTER_KEY_FILE: &str = "master.key";
/// A new key written by an unfinished rotation (see `rotate`).
pub const NEXT_MASTER_KEY_FILE: &str = "master.key.next";
const LOCK_FILE: &str = "appliance.lock";
/// How long to wait for a data dir lock held by a process that is going away.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub fn master_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(MASTER_KEY_FILE)
}

pub fn next_master_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(NEXT_MASTER_KEY_FILE)
}

/// Reads a key file: 64 hex characters (surrounding whitespace ignored) or 32 raw bytes.
pub fn read_master_key(path: &Path) -> Result<MasterKey, String> {
    let mut raw = Zeroizing::new(Vec::new());
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut raw))
        .map_err(|e| format!("cannot read master key {}: {e}", path.display()))?;
    let bytes = decode_key(&raw)
        .ok_or_else(|| format!("master key {} must hold 64 hex characters or 32 raw bytes", path.display()))?;
    MasterKey::from_bytes(bytes.as_ref()).map_err(|e| format!("master key {}: {e}", path.display()))
}

pub fn decode_key(raw: &[u8]) -> Option<Zeroizing<[u8; MASTER_KEY_LEN]>> {
    let mut out = Zeroizing::new([0u8; MASTER_KEY_LEN]);
    let text = raw.trim_ascii();
    if text.len() == MASTER_KEY_LEN * 2 && text.iter().all(u8::is_ascii_hexdigit) {
        for (i, pair) in text.chunks(2).enumerate() {
            out[i] = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
        }
        return Some(out);
    }
    if raw.len() == MASTER_KEY_LEN {
        out.copy_from_slice(raw);
        return Some(out);
    }
    None
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A key file's content: 64 lowercase hex characters and a newline.
pub fn encode_key(bytes: &[u8; MASTER_KEY_LEN]) -> Zeroizing<String> {
    let mut text = Zeroizing::new(crate::crypto::hex(bytes));
    text.push('\n');
    text
}

/// Generates a fresh key and writes it to `path` (mode 0600) durably. Refuses to overwrite an
/// existing file.
pub fn create_master_key(path: &Path) -> Result<MasterKey, String> {
    if path.exists() {
        return Err(format!("refusing to overwrite existing key {}", path.display()));
    }
    let bytes = MasterKey::generate_bytes().map_err(|e| e.to_string())?;
    write_private_file(path, encode_key(&bytes).as_bytes())?;
    MasterKey::from_bytes(bytes.as_ref()).map_err(|e| e.to_string())
}

/// Writes `bytes` to `path` (mode 0600) durably and atomically: temporary file, fsync, rename,
/// fsync of the directory.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    if let Err(e) = file.write_all(bytes).and_then(|()| file.sync_all()) {
        let _ = fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", tmp.display()));
    }
    fs::rename(&tmp, path).map_err(|e| format!("cannot move {} into place: {e}", path.display()))?;
    sync_parent_dir(path)
}

pub fn sync_parent_dir(path: &Path) -> Result<(), String> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("cannot fsync directory {}: {e}", dir.display()))
}

/// Exclusive ownership of a data directory for the life of this value.
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> Result<Self, String> {
        fs::create_dir_all(data_dir).map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
        let path = data_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // A lock can outlive its holder briefly: a process that just exited, or a
        // child forked by a holder that has not reached exec yet (the descriptor is
        // close-on-exec). Waiting a moment avoids refusing a legitimate restart.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock on a file descriptor we own and keep open; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(Self { _file: file });
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "data dir {} is in use by another appliance process (lock {} is held)",
                    data_dir.display(),
                    path.display()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("appliance-keyfiles-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn created_key_is_private_and_reloads_identically() {
        let dir = temp_dir("create");
        let key = create_master_key(&master_key_path(&dir)).expect("create");
        let mode = fs::metadata(master_key_path(&dir)).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = read_master_key(&master_key_path(&dir)).expect("load");
        assert_eq!(key.id(), again.id());
        assert!(create_master_key(&master_key_path(&dir)).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn accepts_hex_or_raw_and_rejects_garbage() {
        assert!(decode_key(format!("{}\n", "ab".repeat(32)).as_bytes()).is_some());
        assert!(decode_key(&[9u8; 32]).is_some());
        assert!(decode_key(b"short").is_none());
        assert!(decode_key("zz".repeat(32).as_bytes()).is_none());
    }

    #[test]
    fn second_lock_on_same_dir_fails() {
        let dir = temp_dir("lock");
        let first = DataDirLock::acquire(&dir).expect("first lock");
        assert!(DataDirLock::acquire(&dir).is_err());
        drop(first);
        assert!(DataDirLock::acquire(&dir).is_ok());
        let _ = fs::remove_dir_all(&dir);
    }
}

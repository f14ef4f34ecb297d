//! Where the master key lives, so that a copy of the data partition alone decrypts nothing:
//!
//! - `tpm`: sealed to the machine's TPM 2.0; the sealed blob sits in the data directory, useless
//!   without that TPM;
//! - `esp`: on the boot disk's EFI system partition, when there is no TPM: the secrets are then
//!   protected only as well as the boot disk;
//! - `data-dir`: beside the data (`appliance serve` on a development machine, or an appliance
//!   with neither a TPM nor an ESP), said loudly at every start.
//!
//! A location keeps the key (`Slot::Current`) and, while a rotation runs, the key it moves to
//! (`Slot::Next`, written durably before anything is re-sealed). A key found in another
//! location (an older version kept it in the data directory, or a TPM appeared) is moved by a
//! rotation into the chosen one, so the old copy, wherever its bytes linger, opens nothing.

pub mod files;
pub mod live;
pub mod reseal;
pub mod tpm;

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::crypto::{Keyring, MasterKey, MASTER_KEY_LEN};
use crate::keyfiles::{decode_key, encode_key, MASTER_KEY_FILE, NEXT_MASTER_KEY_FILE};
use crate::store::Store;
use files::{DirFiles, EspFiles, KeyFiles};
use live::LiveKeyring;
use reseal::{reseal_all, sealed_values};

/// The sealed blob's files in the data directory.
const TPM_KEY_FILE: &str = "master.key.tpm";
const NEXT_TPM_KEY_FILE: &str = "master.key.tpm.next";

/// What `--master-key-store` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The TPM if there is one (or a sealed key says there was), else the ESP if booted from
    /// the disk image, else the data directory.
    Auto,
    Tpm(PathBuf),
    Esp,
    DataDir,
}

impl Choice {
    pub fn parse(text: &str) -> Result<Choice, String> {
        match text {
            "auto" => Ok(Choice::Auto),
            "tpm" => Ok(Choice::Tpm(PathBuf::from(tpm::DEFAULT_DEVICE))),
            "esp" => Ok(Choice::Esp),
            "data-dir" => Ok(Choice::DataDir),
            other => match other.strip_prefix("tpm:") {
                Some(device) if !device.is_empty() => Ok(Choice::Tpm(PathBuf::from(device))),
                _ => Err(format!("--master-key-store {other:?}: expected auto, tpm, tpm:DEVICE, esp or data-dir")),
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Tpm(PathBuf),
    Esp,
    DataDir,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Current,
    Next,
}

/// One location's key files and how the key is encoded in them.
pub struct KeyStore {
    location: Location,
    files: Box<dyn KeyFiles>,
}

impl KeyStore {
    pub fn at(location: Location, data_dir: &Path) -> KeyStore {
        let files: Box<dyn KeyFiles> = match &location {
            Location::Esp => Box::new(EspFiles),
            Location::Tpm(_) | Location::DataDir => Box::new(DirFiles(data_dir.to_path_buf())),
        };
        KeyStore { location, files }
    }

    /// Resolves `choice` on this machine.
    pub fn choose(choice: &Choice, data_dir: &Path) -> KeyStore {
        let location = match choice {
            Choice::Tpm(device) => Location::Tpm(device.clone()),
            Choice::Esp => Location::Esp,
            Choice::DataDir => Location::DataDir,
            // A sealed key without its TPM must fail loudly, not be replaced by a new key.
            Choice::Auto if tpm::present() || data_dir.join(TPM_KEY_FILE).exists() => {
                Location::Tpm(PathBuf::from(tpm::DEFAULT_DEVICE))
            }
            Choice::Auto if EspFiles::available() => Location::Esp,
            Choice::Auto => Location::DataDir,
        };
        KeyStore::at(location, data_dir)
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Short name for API answers: `tpm`, `esp` or `data-dir`.
    pub fn name(&self) -> &'static str {
        match self.location {
            Location::Tpm(_) => "tpm",
            Location::Esp => "esp",
            Location::DataDir => "data-dir",
        }
    }

    fn file(&self, slot: Slot) -> &'static str {
        match (&self.location, slot) {
            (Location::Tpm(_), Slot::Current) => TPM_KEY_FILE,
            (Location::Tpm(_), Slot::Next) => NEXT_TPM_KEY_FILE,
            (_, Slot::Current) => MASTER_KEY_FILE,
            (_, Slot::Next) => NEXT_MASTER_KEY_FILE,
        }
    }

    pub fn read(&self, slot: Slot) -> Result<Option<MasterKey>, String> {
        let name = self.file(slot);
        let Some(raw) = self.files.read(name)? else { return Ok(None) };
        let where_ = self.files.describe(name);
        let bytes: Zeroizing<Vec<u8>> = match &self.location {
            Location::Tpm(device) => open_tpm(device)
                .map_err(|e| format!("the master key is sealed to a TPM ({where_}) but {e}"))?
                .unseal(&raw)
                .map_err(|e| format!("the TPM cannot unseal the master key in {where_}: {e}"))?,
            Location::Esp | Location::DataDir => Zeroizing::new(
                decode_key(&raw)
                    .ok_or_else(|| format!("{where_} must hold 64 hex characters or 32 raw bytes"))?
                    .to_vec(),
            ),
        };
        MasterKey::from_bytes(&bytes).map(Some).map_err(|e| format!("{where_}: {e}"))
    }

    fn write(&self, slot: Slot, key: &[u8; MASTER_KEY_LEN]) -> Result<(), String> {
        let encoded = match &self.location {
            Location::Tpm(device) => Zeroizing::new(
                open_tpm(device)?.seal(key).map_err(|e| format!("the TPM cannot seal the master key: {e}"))?,
            ),
            Location::Esp | Location::DataDir => Zeroizing::new(encode_key(key).as_bytes().to_vec()),
        };
        self.files.write(self.file(slot), &encoded)
    }

    fn promote(&self) -> Result<(), String> {
        self.files.rename(self.file(Slot::Next), self.file(Slot::Current))
    }

    fn forget(&self) -> Result<(), String> {
        self.files.remove(self.file(Slot::Next))?;
        self.files.remove(self.file(Slot::Current))
    }

    /// The console line said at every start.
    pub fn announce(&self, key: &MasterKey) -> String {
        let id = key.id_hex();
        match &self.location {
            Location::Tpm(device) => format!(
                "appliance: master key {id} is sealed to the TPM ({}): a copy of the data partition alone decrypts nothing",
                device.display()
            ),
            Location::Esp => format!(
                "appliance: WARNING: no TPM 2.0: master key {id} is kept on the EFI system partition, not the data \
                 partition; the secrets are protected only as well as the boot disk"
            ),
            Location::DataDir => format!(
                "appliance: WARNING: master key {id} is kept in the data directory ({}): a copy of it decrypts every \
                 secret (no TPM and no EFI system partition; see --master-key-store)",
                self.files.describe(MASTER_KEY_FILE)
            ),
        }
    }

    /// The other locations that may hold this data's key from before.
    fn others(&self, data_dir: &Path) -> Vec<KeyStore> {
        let mut others = Vec::new();
        if self.location != Location::DataDir {
            others.push(KeyStore::at(Location::DataDir, data_dir));
        }
        if self.location != Location::Esp && EspFiles::available() {
            others.push(KeyStore::at(Location::Esp, data_dir));
        }
        if !matches!(self.location, Location::Tpm(_)) && tpm::present() {
            others.push(KeyStore::at(Location::Tpm(PathBuf::from(tpm::DEFAULT_DEVICE)), data_dir));
        }
        others
    }
}

/// The kernel's TPM device, or a swtpm command socket (how the host tests attach a TPM).
enum TpmLink {
    Device(tpm::DeviceTransport),
    Socket(tpm::SocketTransport),
}

impl tpm::Transport for TpmLink {
    fn transact(&mut self, command: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            TpmLink::Device(t) => t.transact(command),
            TpmLink::Socket(t) => t.transact(command),
        }
    }
}

fn open_tpm(path: &Path) -> Result<tpm::Tpm<TpmLink>, String> {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket());
    let link = if is_socket {
        tpm::SocketTransport::connect(path).map(TpmLink::Socket)
    } else {
        tpm::DeviceTransport::open(path).map(TpmLink::Device)
    };
    link.map(tpm::Tpm::new).map_err(|e| format!("{} cannot be opened: {e}", path.display()))
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RotationReport {
    pub secrets: usize,
    pub ca_keys: usize,
    pub new_key_id: String,
}

fn fresh_key() -> Result<Zeroizing<[u8; MASTER_KEY_LEN]>, String> {
    MasterKey::generate_bytes().map_err(|e| e.to_string())
}

fn key_from(bytes: &[u8; MASTER_KEY_LEN]) -> Result<MasterKey, String> {
    MasterKey::from_bytes(bytes).map_err(|e| e.to_string())
}

/// Loads the key from `keys` (finishing an interrupted rotation, moving a key found in another
/// location), or creates it on a store that holds nothing sealed yet.
pub fn load(keys: &KeyStore, data_dir: &Path, store: &Store) -> Result<Keyring, String> {
    let mut current = keys.read(Slot::Current)?;
    if let Some(next) = keys.read(Slot::Next)? {
        println!("appliance: an interrupted master-key rotation was found; completing it");
        let previous: Vec<MasterKey> = current.into_iter().collect();
        let ring = Keyring::with_previous(next, previous);
        reseal_all(store, &ring).map_err(|e| e.message)?;
        keys.promote()?;
        current = keys.read(Slot::Current)?;
    }
    for other in keys.others(data_dir) {
        // A location that cannot be read (a TPM that does not know the blob) holds nothing of ours.
        let old = match other.read(Slot::Current) {
            Ok(Some(old)) => old,
            Ok(None) => continue,
            Err(e) => {
                println!("appliance: ignoring a master key in another place: {e}");
                continue;
            }
        };
        let (target, staged) = if let Some(key) = current.take() {
            (key, false)
        } else {
            let bytes = fresh_key()?;
            keys.write(Slot::Next, &bytes)?;
            (key_from(&bytes)?, true)
        };
        let ring = Keyring::with_previous(target, vec![old]);
        let (secrets, ca_keys) = reseal_all(store, &ring).map_err(|e| e.message)?;
        if staged {
            keys.promote()?;
        }
        other.forget()?;
        println!(
            "appliance: master key moved off {} into {}: {secrets} secret(s) and {ca_keys} CA key(s) re-encrypted \
             under a new key",
            other.name(),
            keys.name()
        );
        current = keys.read(Slot::Current)?;
    }
    let key = if let Some(key) = current {
        key
    } else {
        let sealed = sealed_values(store).map_err(|e| e.message)?;
        if sealed > 0 {
            return Err(format!(
                "the store holds {sealed} encrypted value(s) but no master key was found ({}): was the TPM \
                 cleared, or the boot disk replaced? Refusing to start with a new key, which would open none of them",
                keys.files.describe(keys.file(Slot::Current))
            ));
        }
        let bytes = fresh_key()?;
        keys.write(Slot::Current, &bytes)?;
        let key = key_from(&bytes)?;
        println!("appliance: generated a new master key {} ({})", key.id_hex(), keys.name());
        key
    };
    println!("{}", keys.announce(&key));
    Ok(Keyring::new(key))
}

/// Rotates to a fresh key: written to `Slot::Next` first, the running keyring switched to it,
/// every sealed value re-sealed in one transaction, then `Next` promoted. A crash at any point
/// is finished by the next `load`.
pub fn rotate(keys: &KeyStore, store: &Store, live: &LiveKeyring) -> Result<RotationReport, String> {
    let current =
        keys.read(Slot::Current)?.ok_or_else(|| format!("no master key in {} to rotate from", keys.name()))?;
    let bytes = fresh_key()?;
    keys.write(Slot::Next, &bytes)?;
    let next = key_from(&bytes)?;
    let new_key_id = next.id_hex();
    live.replace(Keyring::with_previous(key_from(&bytes)?, vec![current.duplicate().map_err(|e| e.to_string())?]));
    let (secrets, ca_keys) = reseal_all(store, &Keyring::with_previous(next, vec![current])).map_err(|e| e.message)?;
    keys.promote()?;
    Ok(RotationReport { secrets, ca_keys, new_key_id })
}

/// `appliance rotate-key` (the appliance must not be running): with no key files, rotates the
/// key kept where `choice` says; with `--master-key-file OLD --new-master-key-file NEW`
/// (operator-managed keys), re-seals everything under NEW and leaves swapping the files to
/// the operator.
pub fn rotate_offline(
    data_dir: &Path,
    choice: &Choice,
    old_key: Option<&Path>,
    new_key: Option<&Path>,
) -> Result<RotationReport, String> {
    let _lock = crate::keyfiles::DataDirLock::acquire(data_dir)?;
    let store = Store::open(data_dir)?;
    let result = match (old_key, new_key) {
        (None, None) => {
            let keys = KeyStore::choose(choice, data_dir);
            load(&keys, data_dir, &store).and_then(|ring| rotate(&keys, &store, &LiveKeyring::new(ring)))
        }
        (Some(old), Some(new)) => {
            let current = crate::keyfiles::read_master_key(old)?;
            let next = crate::keyfiles::read_master_key(new)?;
            if current.id() == next.id() {
                return Err("the new master key is the same as the current one".into());
            }
            let new_key_id = next.id_hex();
            reseal_all(&store, &Keyring::with_previous(next, vec![current]))
                .map(|(secrets, ca_keys)| RotationReport { secrets, ca_keys, new_key_id })
                .map_err(|e| e.message)
        }
        _ => Err("give both --master-key-file and --new-master-key-file, or neither".into()),
    };
    store.close();
    result
}

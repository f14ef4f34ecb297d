//! What a copy of the data partition alone gives an attacker: the test takes the partition out of
//! a powered-off appliance, mounts it on the host and tries to decrypt every secret in its store
//! with the store format's own code: with every key-shaped file on it, and with the appliance's
//! own key loading. Both must fail. A control then opens every secret with the key kept off the
//! partition (the TPM's, the ESP's), showing the attempt would have seen a key had there been one.

use appliance::crypto::{Keyring, MasterKey};
use appliance::master_key::{self, KeyStore, Location};
use appliance::store::Store;
use image::err;
use image::error::{Context, Result};
use image::host::run_quiet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Key files are tiny; larger files (the store, sandbox disks) are not candidates.
const MAX_KEY_SHAPED: u64 = 4096;

/// A secret as the store keeps it: record key, sealed blob, the associated data it is sealed with.
pub type StoredSecret = (String, Vec<u8>, Vec<u8>);

/// What the copy held.
pub struct Findings {
    /// Every secret in the copy's store.
    pub secrets: Vec<StoredSecret>,
    /// The small files at the partition's root (key-shaped candidates), by name.
    pub small_files: Vec<(String, Vec<u8>)>,
}

/// Mounts `disk` (bytes `extent` of it, or all of it) read-only from a copy, and copies out its
/// store and small root files into `work`; checks that none of them opens a secret.
pub fn decrypts_nothing(disk: &Path, extent: Option<(u64, u64)>, work: &Path) -> Result<Findings> {
    let copy_dir = work.join("data-copy");
    let _ = std::fs::remove_dir_all(&copy_dir);
    std::fs::create_dir_all(&copy_dir).ctx(|| format!("create {}", copy_dir.display()))?;
    copy_out(disk, extent, work, &copy_dir)?;
    let store = Store::open(&copy_dir).map_err(|e| err!("open the copied store: {e}"))?;
    let secrets = read_secrets(&store)?;
    let small_files = small_files(&copy_dir)?;
    let names: Vec<&str> = small_files.iter().map(|(n, _)| n.as_str()).collect();
    if secrets.is_empty() {
        store.close();
        return Err(err!("the copied store holds no secret: nothing was tried (files: {names:?})"));
    }
    for (name, bytes) in &small_files {
        let Some(raw) = appliance::keyfiles::decode_key(bytes) else { continue };
        let key = MasterKey::from_bytes(raw.as_ref()).map_err(|e| err!("{name}: {e}"))?;
        if opened(&Keyring::new(key), &secrets) > 0 {
            store.close();
            return Err(err!("{name} on the data partition decrypts the secrets"));
        }
    }
    // The appliance's own loader, pointed at the copy: it must find no key and refuse.
    let loaded = master_key::load(&KeyStore::at(Location::DataDir, &copy_dir), &copy_dir, &store);
    store.close();
    match loaded {
        Err(e) if e.contains("no master key was found") => {}
        Err(e) => return Err(err!("loading a key from the copy failed for another reason: {e}")),
        Ok(_) => return Err(err!("the appliance's key loading found a master key on the data partition copy")),
    }
    eprintln!(
        "[qemu-test]   data partition copy: {} secret(s), {} small file(s) {names:?}: none opens a secret",
        secrets.len(),
        small_files.len()
    );
    Ok(Findings { secrets, small_files })
}

/// How many of `secrets` `ring` opens.
pub fn opened(ring: &Keyring, secrets: &[StoredSecret]) -> usize {
    secrets.iter().filter(|(_, blob, aad)| ring.open(blob, aad).is_ok()).count()
}

/// The control: `key` (kept off the partition) opens every secret of the copy.
pub fn control_opens_all(key: MasterKey, findings: &Findings, whose: &str) -> Result<()> {
    let n = opened(&Keyring::new(key), &findings.secrets);
    if n != findings.secrets.len() {
        return Err(err!("the {whose} key opens {n} of {} secrets: the check proves nothing", findings.secrets.len()));
    }
    eprintln!("[qemu-test]   control: the {whose} key opens all {n} secret(s)");
    Ok(())
}

fn copy_out(disk: &Path, extent: Option<(u64, u64)>, work: &Path, into: &Path) -> Result<()> {
    let image = work.join("data-copy.img");
    let mount_point = work.join("data-copy-mnt");
    let _ = std::fs::remove_file(&image);
    run_quiet(Command::new("cp").arg("--sparse=always").arg(disk).arg(&image))?;
    std::fs::create_dir_all(&mount_point).ctx(|| format!("create {}", mount_point.display()))?;
    let mut options = String::from("loop,ro,norecovery");
    if let Some((offset, size)) = extent {
        options.push_str(&format!(",offset={offset},sizelimit={size}"));
    }
    run_quiet(Command::new("mount").args(["-t", "xfs", "-o", &options]).arg(&image).arg(&mount_point))?;
    let copied = copy_tree(&mount_point, into);
    let unmounted = run_quiet(Command::new("umount").arg(&mount_point));
    let _ = std::fs::remove_file(&image);
    copied.and(unmounted.map(|_| ()))
}

/// The store directory and the root's small regular files.
fn copy_tree(root: &Path, into: &Path) -> Result<()> {
    run_quiet(Command::new("cp").arg("-a").arg(root.join("store")).arg(into))?;
    for entry in std::fs::read_dir(root).ctx(|| format!("list {}", root.display()))?.flatten() {
        let meta = entry.metadata().ctx(|| format!("stat {}", entry.path().display()))?;
        if meta.is_file() && meta.len() <= MAX_KEY_SHAPED {
            std::fs::copy(entry.path(), into.join(entry.file_name()))
                .ctx(|| format!("copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn small_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).ctx(|| format!("list {}", dir.display()))?.flatten() {
        let path: PathBuf = entry.path();
        if path.is_file() {
            let bytes = std::fs::read(&path).ctx(|| format!("read {}", path.display()))?;
            out.push((entry.file_name().to_string_lossy().into_owned(), bytes));
        }
    }
    out.sort();
    Ok(out)
}

fn read_secrets(store: &Store) -> Result<Vec<StoredSecret>> {
    store
        .read(|rtxn, dbs| {
            let mut out = Vec::new();
            for item in dbs.secrets.iter(rtxn)? {
                let (key, blob) = item?;
                let Some((project, name)) = key.split_once('/') else { continue };
                let aad = appliance::store::records::secret_associated_data(project, name);
                out.push((key.to_string(), blob.to_vec(), aad));
            }
            Ok(out)
        })
        .map_err(|e| err!("read the copied store's secrets: {}", e.message))
}

/// Unseals `blob` with a swtpm started on a copy of the TPM state in `state_dir` (the machine's
/// TPM, after the machine is gone), spoken to over its command socket.
pub fn unseal_with_swtpm(state_dir: &Path, blob: &[u8], work: &Path) -> Result<MasterKey> {
    let state = work.join("tpm-control");
    let _ = std::fs::remove_dir_all(&state);
    run_quiet(Command::new("cp").arg("-a").arg(state_dir).arg(&state))?;
    let server = image::swtpm::SoftTpm::start_command_server(&state, work, "tpm-control")?;
    let unsealed = master_key::tpm::SocketTransport::connect(&server.socket)
        .map_err(|e| err!("connect to swtpm: {e}"))
        .and_then(|t| master_key::tpm::Tpm::new(t).unseal(blob).map_err(|e| err!("unseal with the TPM: {e}")));
    drop(server);
    MasterKey::from_bytes(&unsealed?).map_err(|e| err!("the unsealed key: {e}"))
}

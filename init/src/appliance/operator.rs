//! The operator's settings reach the appliance: `opencomputer.conf` is read from the EFI system
//! partition (mounted read-only just for that), merged with the kernel command line, and the
//! appliance service's inputs are written to a tmpfs: the admin key file (0600) and the proxy
//! settings. QEMU fw_cfg entries, when present, take precedence (the test harness and `image
//! run` pass the key that way). The key's value is never logged.

use super::bootdisk;
use super::config::Config;
use crate::log;
use crate::sys::mount::{self, Mount};
use boot_disk::layout;
use init_handoff::{ADMIN_KEY_FILE, PROXY_CONFIG_FILE, RUN_DIR};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

const ESP_MOUNT: &str = "/run/esp";
const FW_CFG_ADMIN_KEY: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/opencomputer/admin-key/raw";
const FW_CFG_PROXY_CONFIG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/opencomputer/proxy-config/raw";
/// A CA bundle larger than this is a mistake (Debian's whole bundle is ~200 KiB).
const MAX_CA_BYTES: u64 = 1 << 20;

/// The configuration with its file read from the ESP (when booted from the disk image).
pub struct Loaded {
    pub config: Config,
    trusted_ca_pem: Option<String>,
}

pub fn load(cmdline: &str, from_disk: bool) -> Loaded {
    let name = layout::CONFIG_FILE;
    let mounted = if from_disk { Some(mount_esp()) } else { None };
    let (file, mut problems) = match &mounted {
        Some(Ok(())) => match read_config_file() {
            Ok(file) => (file, Vec::new()),
            Err(e) => (None, vec![format!("{e}; using defaults")]),
        },
        Some(Err(e)) => (None, vec![format!("cannot read {name} from the EFI partition: {e}; using defaults")]),
        None => (None, Vec::new()),
    };
    let mut config = Config::merge(file.as_deref(), name, cmdline);
    problems.append(&mut config.problems);
    config.problems = problems;
    let trusted_ca_pem = config.get("trusted_ca").map(str::to_string).and_then(|rel| {
        let read = match &mounted {
            Some(Ok(())) => read_ca(&format!("{ESP_MOUNT}/{}", rel.trim_start_matches('/'))),
            _ => Err(format!("{rel} cannot be read: the EFI partition is not available")),
        };
        read.map_err(|e| {
            let problem = format!("{}{e}; the extra CA is not trusted", config.where_set("trusted_ca", name));
            config.problems.push(problem);
        })
        .ok()
    });
    if let Some(Ok(())) = mounted {
        if let Err(e) = mount::umount(ESP_MOUNT, false) {
            log!("{e}");
        }
    }
    if file.is_some() {
        log!("configuration: {name} read from the EFI partition ({} settings)", config.settings.len());
    }
    for problem in &config.problems {
        log!("CONFIGURATION PROBLEM: {problem}");
    }
    Loaded { config, trusted_ca_pem }
}

/// Mounts the ESP of the boot disk read-only at ESP_MOUNT.
fn mount_esp() -> Result<(), String> {
    let part =
        bootdisk::find_partition(layout::ESP_NAME).ok_or_else(|| format!("no partition named {}", layout::ESP_NAME))?;
    let device = format!("/dev/{part}");
    mount::mount(&Mount {
        source: &device,
        target: ESP_MOUNT,
        fstype: "vfat",
        flags: libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "codepage=437,iocharset=ascii",
    })
    .map_err(|e| e.to_string())
}

/// The file's text; None when there is no such file (all defaults).
fn read_config_file() -> Result<Option<String>, String> {
    let path = format!("{ESP_MOUNT}/{}", layout::CONFIG_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            String::from_utf8(bytes).map(Some).map_err(|_| format!("{} is not UTF-8 text", layout::CONFIG_FILE))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", layout::CONFIG_FILE)),
    }
}

fn read_ca(path: &str) -> Result<String, String> {
    let shown = path.trim_start_matches(ESP_MOUNT).trim_start_matches('/');
    let size = std::fs::metadata(path).map_err(|e| format!("cannot read {shown} on the EFI partition: {e}"))?.len();
    if size > MAX_CA_BYTES {
        return Err(format!("{shown} is {size} bytes; a CA bundle should be far smaller"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown} on the EFI partition: {e}"))?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{shown} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(text)
}

/// Writes the appliance service's admin key and proxy settings to the tmpfs.
pub fn hand_over(loaded: &Loaded) {
    if let Err(e) = std::fs::create_dir_all(RUN_DIR) {
        log!("cannot create {RUN_DIR}: {e}; the appliance gets no admin key or proxy settings");
        return;
    }
    let name = layout::CONFIG_FILE;
    let key = match std::fs::read(FW_CFG_ADMIN_KEY) {
        Ok(bytes) => Some((bytes, "QEMU fw_cfg".to_string())),
        Err(_) => loaded.config.get("admin_key").map(|k| {
            (k.as_bytes().to_vec(), loaded.config.where_set("admin_key", name).trim_end_matches(": ").to_string())
        }),
    };
    match key {
        Some((bytes, source)) => match write_private(ADMIN_KEY_FILE, &bytes) {
            Ok(()) => log!("admin API key: from {source}"),
            Err(e) => log!("ADMIN KEY PROBLEM: cannot write {ADMIN_KEY_FILE}: {e}"),
        },
        None => log!(
            "admin API key: none given this boot; the appliance keeps a previously stored one. \
             To set one, put `admin_key = <long random string>` in {name} on the EFI partition"
        ),
    }
    let proxy = match std::fs::read(FW_CFG_PROXY_CONFIG) {
        Ok(bytes) => Some((bytes, "QEMU fw_cfg")),
        Err(_) => loaded.config.proxy_json(loaded.trusted_ca_pem.as_deref()).map(|j| (j.into_bytes(), name)),
    };
    if let Some((bytes, source)) = proxy {
        match write_private(PROXY_CONFIG_FILE, &bytes) {
            Ok(()) => log!("proxy settings: from {source}"),
            Err(e) => log!("PROXY SETTINGS PROBLEM: cannot write {PROXY_CONFIG_FILE}: {e}"),
        }
    }
}

fn write_private(path: &str, bytes: &[u8]) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

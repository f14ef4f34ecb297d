//! The operator's settings reach the appliance: `opencomputer.conf` is read from the EFI system
//! partition (mounted read-only just for that), merged with the kernel command line, and the
//! appliance service's inputs are written to a tmpfs: the admin key file (0600), the proxy
//! settings, the API's TLS settings (the operator's certificate and key, or plain HTTP) and the
//! extra public keys the operator trusts for signed upgrade images.
//! QEMU fw_cfg entries, when present, take precedence (the test harness and `image run` pass the
//! key that way). Neither the admin key's value nor the TLS private key is ever logged.

use super::bootdisk;
use super::config::Config;
use crate::log;
use crate::sys::mount::{self, Mount};
use boot_disk::layout;
use init_handoff::{ADMIN_KEY_FILE, API_TLS_FILE, PROXY_CONFIG_FILE, RUN_DIR, UPGRADE_KEYS_FILE};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

const ESP_MOUNT: &str = "/run/esp";
const FW_CFG_ADMIN_KEY: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/opencomputer/admin-key/raw";
const FW_CFG_PROXY_CONFIG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/opencomputer/proxy-config/raw";
/// `image run --plain-http` hands `{"plainHttp": true}` over this way.
const FW_CFG_API_TLS: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/opencomputer/api-tls/raw";
/// A CA bundle larger than this is a mistake (Debian's whole bundle is ~200 KiB).
const MAX_CA_BYTES: u64 = 1 << 20;
/// The API's certificate chain or its key: either is far smaller than this.
const MAX_TLS_BYTES: u64 = 1 << 20;

/// The configuration with its file read from the ESP (when booted from the disk image).
pub struct Loaded {
    pub config: Config,
    trusted_ca_pem: Option<String>,
    api_tls: Option<ApiTls>,
}

/// The operator's certificate chain and private key for the API (tls_cert, tls_key). No Debug:
/// the key must not reach a log by accident.
struct ApiTls {
    /// tls_cert's value: the certificate file's path on the ESP.
    cert_path: String,
    cert_pem: String,
    key_pem: String,
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
            Some(Ok(())) => read_ca(&esp_path(&rel)),
            _ => Err(format!("{rel} cannot be read: the EFI partition is not available")),
        };
        read.map_err(|e| {
            let problem = format!("{}{e}; the extra CA is not trusted", config.where_set("trusted_ca", name));
            config.problems.push(problem);
        })
        .ok()
    });
    let api_tls = match (config.get("tls_cert"), config.get("tls_key")) {
        (Some(cert), Some(key)) => {
            let (cert, key) = (cert.to_string(), key.to_string());
            let read = match &mounted {
                Some(Ok(())) => read_api_tls(&esp_path(&cert), &esp_path(&key)),
                _ => Err(format!("{cert} and {key} cannot be read: the EFI partition is not available")),
            };
            match read {
                Ok((cert_pem, key_pem)) => Some(ApiTls { cert_path: cert, cert_pem, key_pem }),
                Err(e) => {
                    let problem = format!(
                        "{}{e}; the appliance's generated certificate is used instead",
                        config.where_set("tls_cert", name)
                    );
                    config.problems.push(problem);
                    None
                }
            }
        }
        // Config::merge keeps both or neither (and said so).
        _ => None,
    };
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
    Loaded { config, trusted_ca_pem, api_tls }
}

/// A configured path (relative to the ESP's root) where the ESP is mounted.
fn esp_path(rel: &str) -> String {
    format!("{ESP_MOUNT}/{}", rel.trim_start_matches('/'))
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
    let text = read_small_text(path, MAX_CA_BYTES, "a CA bundle")?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", shown(path)));
    }
    Ok(text)
}

/// The API's certificate chain (tls_cert) and private key (tls_key), both PEM. Errors name the
/// files, never the key's contents.
fn read_api_tls(cert_path: &str, key_path: &str) -> Result<(String, String), String> {
    let cert = read_small_text(cert_path, MAX_TLS_BYTES, "a certificate chain")?;
    if !cert.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", shown(cert_path)));
    }
    let key = read_small_text(key_path, MAX_TLS_BYTES, "a private key")?;
    let marker = key.lines().map(str::trim).find(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----"));
    match marker {
        None => Err(format!(
            "{} holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)",
            shown(key_path)
        )),
        Some(l) if l.contains("ENCRYPTED") || key.contains("Proc-Type: 4,ENCRYPTED") => {
            Err(format!("{} holds an encrypted private key; the appliance needs it unencrypted", shown(key_path)))
        }
        Some(_) => Ok((cert, key)),
    }
}

/// The path as the operator wrote it (relative to the ESP's root).
fn shown(path: &str) -> &str {
    path.trim_start_matches(ESP_MOUNT).trim_start_matches('/')
}

/// A UTF-8 file of at most `max` bytes; `what` says what it should hold. Errors never quote it.
fn read_small_text(path: &str, max: u64, what: &str) -> Result<String, String> {
    let shown = shown(path);
    let size = std::fs::metadata(path).map_err(|e| format!("cannot read {shown} on the EFI partition: {e}"))?.len();
    if size > max {
        return Err(format!("{shown} is {size} bytes; {what} should be far smaller"));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {shown} on the EFI partition: {e}"))?;
    String::from_utf8(bytes).map_err(|_| format!("{shown} is not PEM text (not UTF-8)"))
}

/// The API TLS handoff file's contents and the console line saying what it asks for, when the
/// operator set something (their certificate and key, or plain HTTP). The line never shows the key.
fn api_tls_handoff(loaded: &Loaded) -> Option<(String, String)> {
    let tls = loaded.api_tls.as_ref();
    let json = loaded.config.api_tls_json(tls.map(|t| (t.cert_pem.as_str(), t.key_pem.as_str())))?;
    let said = if loaded.config.plain_http() {
        format!("API TLS: plain HTTP, turned on by plain_http in {}", layout::CONFIG_FILE)
    } else {
        format!("API TLS: operator certificate from {} (EFI partition)", tls?.cert_path)
    };
    Some((json, said))
}

/// The upgrade keys handoff file's text and the console line saying how many keys it adds (with
/// each key's first 16 hex digits), when the operator configured at least one valid key.
fn upgrade_keys_handoff(config: &Config) -> Option<(String, String)> {
    let text = config.upgrade_keys_text()?;
    let keys = config.upgrade_keys();
    let short: Vec<&str> = keys.iter().map(|k| k.get(..16).unwrap_or(k)).collect();
    let said = format!(
        "upgrade signing keys: {} more trusted from {} ({})",
        keys.len(),
        layout::CONFIG_FILE,
        short.join(", ")
    );
    Some((text, said))
}

/// Writes the appliance service's admin key, proxy settings, API TLS settings and extra trusted
/// upgrade keys to the tmpfs.
pub fn hand_over(loaded: &Loaded) {
    if let Err(e) = std::fs::create_dir_all(RUN_DIR) {
        log!("cannot create {RUN_DIR}: {e}; the appliance gets no admin key, proxy, API TLS settings or upgrade keys");
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
    let api_tls = match std::fs::read_to_string(FW_CFG_API_TLS) {
        Ok(json) => Some((json, "API TLS: settings from QEMU fw_cfg".to_string())),
        Err(_) => api_tls_handoff(loaded),
    };
    // Absent: the appliance serves HTTPS with the certificate it generated.
    hand_over_optional(
        API_TLS_FILE,
        api_tls,
        write_private,
        "API TLS PROBLEM",
        "the appliance serves HTTPS with its generated certificate",
    );
    // Absent: only the keys shipped in the image are trusted.
    hand_over_optional(
        UPGRADE_KEYS_FILE,
        upgrade_keys_handoff(&loaded.config),
        write_public,
        "UPGRADE KEYS PROBLEM",
        "only the keys shipped in the image are trusted",
    );
}

/// Writes a handoff file the operator's settings ask for (logging what it says), or removes a
/// leftover one when they ask for nothing. A write failure leaves the appliance's default,
/// which `fallback` names.
fn hand_over_optional(
    path: &str,
    content: Option<(String, String)>,
    write: fn(&str, &[u8]) -> std::io::Result<()>,
    problem: &str,
    fallback: &str,
) {
    match content {
        Some((text, said)) => match write(path, text.as_bytes()) {
            Ok(()) => log!("{said}"),
            Err(e) => log!("{problem}: cannot write {path}: {e}; {fallback}"),
        },
        None => {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A secret for the appliance service alone (0600).
fn write_private(path: &str, bytes: &[u8]) -> std::io::Result<()> {
    write_file(path, bytes, 0o600)
}

/// A file that holds nothing secret (0644).
fn write_public(path: &str, bytes: &[u8]) -> std::io::Result<()> {
    write_file(path, bytes, 0o644)
}

/// Replaces `path` with `bytes`, created with `mode` (before the umask).
fn write_file(path: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\"x\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN EC PRIVATE KEY-----\nc2VjcmV0\n-----END EC PRIVATE KEY-----\n";

    /// A fresh directory holding `files`, removed when dropped.
    struct Dir(std::path::PathBuf);
    impl Dir {
        fn new(name: &str, files: &[(&str, &[u8])]) -> Dir {
            let dir = std::env::temp_dir().join(format!("oc-operator-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            for (file, bytes) in files {
                std::fs::write(dir.join(file), bytes).expect("write");
            }
            Dir(dir)
        }
        fn path(&self, file: &str) -> String {
            self.0.join(file).to_string_lossy().into_owned()
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_the_operators_certificate_and_key() {
        let dir = Dir::new("tls-ok", &[("api.crt", CERT.as_bytes()), ("api.key", KEY.as_bytes())]);
        let (cert, key) = read_api_tls(&dir.path("api.crt"), &dir.path("api.key")).expect("read");
        assert_eq!((cert.as_str(), key.as_str()), (CERT, KEY));
        for header in ["PRIVATE KEY", "RSA PRIVATE KEY"] {
            let key = format!("-----BEGIN {header}-----\nc2VjcmV0\n-----END {header}-----\n");
            std::fs::write(dir.path("other.key"), &key).expect("write");
            assert!(read_api_tls(&dir.path("api.crt"), &dir.path("other.key")).is_ok(), "{header}");
        }
    }

    #[test]
    fn a_key_or_certificate_that_is_not_pem_is_refused_without_quoting_it() {
        let dir = Dir::new(
            "tls-bad",
            &[
                ("api.crt", CERT.as_bytes()),
                ("api.key", KEY.as_bytes()),
                ("secret.der", b"s3cr3t-key-bytes"),
                ("binary.der", &[0x30, 0x82, 0xff, 0xfe]),
                ("encrypted.key", b"-----BEGIN ENCRYPTED PRIVATE KEY-----\ns3cr3t\n"),
            ],
        );
        let e = read_api_tls(&dir.path("api.crt"), &dir.path("secret.der")).expect_err("not PEM");
        assert!(e.contains("secret.der holds no PEM private key"), "{e}");
        assert!(!e.contains("s3cr3t"), "the key's contents are never repeated: {e}");
        let e = read_api_tls(&dir.path("api.crt"), &dir.path("binary.der")).expect_err("not text");
        assert!(e.contains("binary.der is not PEM text"), "{e}");
        let e = read_api_tls(&dir.path("api.crt"), &dir.path("encrypted.key")).expect_err("encrypted");
        assert!(e.contains("encrypted private key") && !e.contains("s3cr3t"), "{e}");
        let e = read_api_tls(&dir.path("api.key"), &dir.path("api.key")).expect_err("a key is no certificate");
        assert!(e.contains("api.key holds no PEM certificate"), "{e}");
        let e = read_api_tls(&dir.path("api.crt"), &dir.path("missing.key")).expect_err("missing");
        assert!(e.contains("cannot read") && e.contains("missing.key"), "{e}");
    }

    #[test]
    fn a_file_over_the_size_cap_is_refused() {
        let big = format!("{CERT}{}", "A".repeat(MAX_TLS_BYTES as usize));
        let dir = Dir::new("tls-big", &[("big.crt", big.as_bytes()), ("api.key", KEY.as_bytes())]);
        let e = read_api_tls(&dir.path("big.crt"), &dir.path("api.key")).expect_err("too big");
        assert!(e.contains("big.crt is 1048") && e.contains("should be far smaller"), "{e}");
    }

    fn loaded(conf: &str, api_tls: Option<ApiTls>) -> Loaded {
        Loaded { config: Config::merge(Some(conf), layout::CONFIG_FILE, ""), trusted_ca_pem: None, api_tls }
    }

    #[test]
    fn the_handoff_file_is_written_only_when_the_operator_set_something() {
        assert!(api_tls_handoff(&loaded("", None)).is_none());
        assert!(api_tls_handoff(&loaded("plain_http = false\n", None)).is_none());

        let (json, said) = api_tls_handoff(&loaded("plain_http = true\n", None)).expect("plain");
        assert_eq!(json, "{\"plainHttp\": true}\n");
        assert_eq!(said, "API TLS: plain HTTP, turned on by plain_http in opencomputer.conf");

        let tls = ApiTls { cert_path: "tls/api.crt".into(), cert_pem: CERT.into(), key_pem: KEY.into() };
        let (json, said) =
            api_tls_handoff(&loaded("tls_cert = tls/api.crt\ntls_key = tls/api.key\n", Some(tls))).expect("cert");
        assert_eq!(
            json,
            "{\"plainHttp\": false, \
             \"certPem\": \"-----BEGIN CERTIFICATE-----\\nMIIB\\\"x\\n-----END CERTIFICATE-----\\n\", \
             \"keyPem\": \"-----BEGIN EC PRIVATE KEY-----\\nc2VjcmV0\\n-----END EC PRIVATE KEY-----\\n\"}\n"
        );
        assert_eq!(said, "API TLS: operator certificate from tls/api.crt (EFI partition)");
        assert!(!said.contains("c2VjcmV0"));
    }

    const UPGRADE_KEY_A: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    const UPGRADE_KEY_B: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";

    #[test]
    fn the_upgrade_keys_file_is_written_only_when_a_valid_key_is_configured() {
        assert!(upgrade_keys_handoff(&loaded("", None).config).is_none());
        assert!(upgrade_keys_handoff(&loaded("upgrade_keys = 1234\n", None).config).is_none());

        let conf = format!("upgrade_keys = {UPGRADE_KEY_A}, not-a-key , {}\n", UPGRADE_KEY_B.to_uppercase());
        let (text, said) = upgrade_keys_handoff(&loaded(&conf, None).config).expect("keys");
        assert_eq!(text, format!("{UPGRADE_KEY_A}\n{UPGRADE_KEY_B}\n"));
        assert_eq!(
            said,
            "upgrade signing keys: 2 more trusted from opencomputer.conf (d75a980182b10ab7, 3d4017c3e843895a)"
        );

        // What hand_over writes, written into a temp dir: exactly the text, readable by all.
        let dir = Dir::new("upgrade-keys", &[("upgrade-keys", b"stale\n")]);
        let path = dir.path("upgrade-keys");
        write_public(&path, text.as_bytes()).expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), format!("{UPGRADE_KEY_A}\n{UPGRADE_KEY_B}\n"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode & 0o600, 0o600, "{mode:o}");
        assert_eq!(mode & 0o022, 0, "{mode:o}");
    }
}

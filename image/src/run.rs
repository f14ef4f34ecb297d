//! The main command: build what is missing, boot the appliance, print where its API is, and
//! shut it down cleanly on Ctrl-C or SIGTERM.

use crate::disk_image::{self, DiskImage};
use crate::err;
use crate::error::{Context, Result};
use crate::host::{self, tool};
use crate::pipeline::{self, Variant};
use crate::qemu::{self, Boot, DiskFormat, Machine, MachineConfig, Network};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub struct RunOptions {
    pub port: u16,
    /// None: qemu::default_cpus for the accelerator in use.
    pub cpus: Option<u32>,
    pub memory_mib: u32,
    pub data_disk: Option<PathBuf>,
    pub data_disk_gib: u64,
    /// Operator proxy settings (JSON) for the appliance's sealing proxy.
    pub proxy_config: Option<PathBuf>,
    /// Boot the GPT disk image under UEFI instead of -kernel with separate disks.
    pub disk: bool,
    /// Serve the API over plain HTTP (local experiments) instead of HTTPS.
    pub plain_http: bool,
    /// Attach a software TPM (swtpm), to which the appliance seals its master key.
    pub tpm: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            port: 8080,
            cpus: None,
            memory_mib: 4096,
            data_disk: None,
            data_disk_gib: 32,
            proxy_config: None,
            disk: false,
            plain_http: false,
            tpm: true,
        }
    }
}

/// How long the appliance may take to answer after QEMU starts (TCG is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(180);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_stop_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, request_stop as *const () as libc::sighandler_t) };
    }
}

/// Where the persistent data disk and run files live: `$OC_STATE_DIR`, else
/// `~/.local/share/opencomputer`.
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OC_STATE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".local/share/opencomputer")
}

/// A fresh random admin key (hex of 24 bytes from the kernel's CSPRNG).
pub fn generate_api_key() -> Result<String> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .ctx(|| "read /dev/urandom".into())?;
    Ok(format!("oc_{}", crate::cache::hex(&bytes)))
}

/// Writes the key to a file only the current user can read, for QEMU's fw_cfg.
pub fn write_key_file(path: &std::path::Path, key: &str) -> Result<()> {
    let _ = std::fs::remove_file(path);
    create_private_file(path, key.as_bytes())
}

/// Creates `path` (it must not exist yet) readable by the current user only, holding `bytes`.
pub fn create_private_file(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .ctx(|| format!("create {}", path.display()))?;
    file.write_all(bytes).ctx(|| format!("write {}", path.display()))
}

/// The software TPM's state, beside the disk it belongs to (`data.img` -> `data.img.tpm/`).
pub fn tpm_state_dir(boot: &Boot) -> PathBuf {
    let disk = match boot {
        Boot::Kernel { data_disk, .. } => data_disk,
        Boot::Disk { image, .. } => image,
    };
    let mut name = disk.file_name().unwrap_or_default().to_os_string();
    name.push(".tpm");
    disk.with_file_name(name)
}

pub fn run(opts: RunOptions) -> Result<()> {
    install_stop_handlers();
    let (key, generated) = match std::env::var("OPENCOMPUTER_API_KEY") {
        Ok(key) if !key.trim().is_empty() => (key.trim().to_string(), false),
        _ => (generate_api_key()?, true),
    };
    let state = state_dir();
    let boot = if opts.disk {
        let (_, built) = disk_image::build_disk(Variant::Product)?;
        qemu::ensure_disk_tools()?;
        let image = opts.data_disk.clone().unwrap_or_else(|| state.join("opencomputer.img"));
        persistent_disk_copy(&built, &image, opts.data_disk_gib)?;
        Boot::Disk { image, format: DiskFormat::Raw }
    } else {
        let artifacts = pipeline::build(Variant::Product)?;
        host::ensure(&[tool("qemu-system-x86_64", "qemu-system-x86")])?;
        let data_disk = opts.data_disk.clone().unwrap_or_else(|| state.join("data.img"));
        qemu::create_data_disk(&data_disk, opts.data_disk_gib)?;
        Boot::Kernel { artifacts, data_disk }
    };
    let run_dir = state.join("run");
    std::fs::create_dir_all(&run_dir).ctx(|| format!("create {}", run_dir.display()))?;
    let key_file = run_dir.join("admin-key");
    write_key_file(&key_file, &key)?;
    let (accel, why) = qemu::detect_accel();
    let api_port = qemu::free_port(opts.port)?;
    let tpm_state = opts.tpm.then(|| tpm_state_dir(&boot));
    let cfg = MachineConfig {
        boot,
        network: Network::Outbound,
        memory_mib: opts.memory_mib,
        cpus: opts.cpus.unwrap_or(qemu::default_cpus(accel)),
        api_port,
        api_guest_addr: None,
        admin_key_file: Some(key_file),
        proxy_config_file: opts.proxy_config.clone(),
        plain_http: opts.plain_http,
        tpm_state,
        run_dir: run_dir.clone(),
        accel,
    };
    let started = Instant::now();
    let mut machine = Machine::start(&cfg)?;
    eprintln!("[run] booting the appliance ({accel:?}: {why}); console log: {}", machine.console_log.display());
    match &cfg.boot {
        Boot::Kernel { data_disk, .. } => eprintln!("[run] data disk: {}", data_disk.display()),
        Boot::Disk { image, .. } => eprintln!("[run] boot disk (UEFI, data partition inside): {}", image.display()),
    }
    if let Some(state) = &cfg.tpm_state {
        eprintln!(
            "[run] TPM 2.0 (swtpm), state in {}: the appliance seals its master key to it, so keep it with the disk",
            state.display()
        );
    }
    let ready = machine.wait_api_ready(BOOT_TIMEOUT, &|| STOP.load(Ordering::SeqCst));
    match ready {
        Ok(_) => {}
        Err(e) => {
            eprintln!("[run] {e}; last console lines:\n{}", machine.console_tail(40));
            if STOP.load(Ordering::SeqCst) {
                return shut_down(&mut machine);
            }
            return Err(e);
        }
    }
    println!("API ready: {}", machine.api().url());
    if !opts.plain_http {
        let fingerprint = crate::api_trust::fingerprint_on_console(&machine.console()).unwrap_or_default();
        let ca = machine.api_ca_file.display();
        println!("API CA (trust this file): {ca}");
        eprintln!("[run] its SHA-256 fingerprint, as the appliance's console printed it: {fingerprint}");
        eprintln!("[run] Python SDK: SSL_CERT_FILE={ca}; Node SDK: NODE_EXTRA_CA_CERTS={ca}; curl: --cacert {ca}");
    }
    if generated {
        eprintln!("[run] admin API key (generated; set OPENCOMPUTER_API_KEY to choose one): {key}");
    } else {
        eprintln!("[run] admin API key: the value of OPENCOMPUTER_API_KEY");
    }
    eprintln!(
        "[run] booted in {:.1}s; Ctrl-C or SIGTERM shuts the appliance down cleanly",
        started.elapsed().as_secs_f64()
    );
    while !STOP.load(Ordering::SeqCst) {
        if let Some(status) = machine.try_exit()? {
            return Err(err!("the appliance stopped by itself ({status}); console: {}", machine.console_log.display()));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    shut_down(&mut machine)
}

/// The operator's disk (with its data partition) is made from the build once and then kept;
/// a newer build does not replace it (that is what A/B upgrades will do), but says so.
fn persistent_disk_copy(built: &DiskImage, image: &std::path::Path, gib: u64) -> Result<()> {
    let stamp = image.with_extension("img.sha256");
    if image.exists() {
        let made_from = std::fs::read_to_string(&stamp).unwrap_or_default();
        if made_from.trim() != built.sha256 {
            eprintln!(
                "[run] {} was made from an older build and keeps its data; delete it to boot the new image",
                image.display()
            );
        }
        return qemu::resize(image, DiskFormat::Raw, gib);
    }
    qemu::prepare_disk_copy(&built.path, image, gib)?;
    std::fs::write(&stamp, &built.sha256).ctx(|| format!("write {}", stamp.display()))
}

fn shut_down(machine: &mut Machine) -> Result<()> {
    eprintln!("[run] shutting the appliance down (ACPI power button)");
    let status = machine.power_down(SHUTDOWN_TIMEOUT).map_err(|e| {
        machine.kill();
        err!("{e}; QEMU killed")
    })?;
    if status.success() {
        eprintln!("[run] appliance powered off cleanly");
        Ok(())
    } else {
        Err(err!("QEMU exited with {status}"))
    }
}

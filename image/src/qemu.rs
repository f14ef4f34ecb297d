//! Booting the appliance in QEMU: accelerator choice, the machine's command line, the serial
//! console captured to a file, the human monitor on a Unix socket, and readiness checks.

use crate::err;
use crate::error::{Context, Result};
use crate::pipeline::{Artifacts, ADMIN_KEY_FW_CFG, API_PORT_IN_GUEST, API_TLS_FW_CFG, PROXY_CONFIG_FW_CFG};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// KVM when this host's /dev/kvm is a normal hardware KVM (kvm_intel or kvm_amd loaded);
/// otherwise TCG with `-cpu max`, which emulates SVM so the appliance still gets a nested
/// /dev/kvm. `OC_QEMU_ACCEL=kvm|tcg` overrides. The reason is printed to the operator.
pub fn detect_accel() -> (Accel, String) {
    match std::env::var("OC_QEMU_ACCEL").as_deref() {
        Ok("kvm") => return (Accel::Kvm, "OC_QEMU_ACCEL=kvm".into()),
        Ok("tcg") => return (Accel::Tcg, "OC_QEMU_ACCEL=tcg".into()),
        _ => {}
    }
    let kvm_usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    let hardware_module = ["kvm_intel", "kvm_amd"].into_iter().find(|m| Path::new("/sys/module").join(m).exists());
    match (kvm_usable, hardware_module) {
        (true, Some(module)) => (Accel::Kvm, format!("/dev/kvm backed by {module}")),
        (true, None) => (
            Accel::Tcg,
            "/dev/kvm is not a hardware KVM (no kvm_intel/kvm_amd); using TCG with nested KVM inside".into(),
        ),
        (false, _) => (Accel::Tcg, "no usable /dev/kvm; using TCG with nested KVM inside".into()),
    }
}

/// vCPUs for the appliance VM. Under TCG one: with two, the emulated SVM occasionally
/// livelocks the whole appliance during a nested boot (seen in about 1 of 20 boots; with one
/// vCPU, 60 boots in a row passed and each was no slower, BENCHMARKS.md).
pub fn default_cpus(accel: Accel) -> u32 {
    match accel {
        Accel::Kvm => 2,
        Accel::Tcg => 1,
    }
}

/// What the machine boots from.
#[derive(Clone, Debug)]
pub enum Boot {
    /// `-kernel/-initrd/-append` from the build artifacts, with a separate data disk and the
    /// system disk attached read-only.
    Kernel { artifacts: Artifacts, data_disk: PathBuf },
    /// UEFI firmware (OVMF) boots the GPT disk image alone: no -kernel, no other disk.
    Disk { image: PathBuf, format: DiskFormat },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// The machine's one NIC (QEMU user networking, with the API port forwarded from loopback).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// Outbound connections work (NAT to the host's network).
    Outbound,
    /// `restrict=on`: the guest can reach nothing outside (no NAT, no host services), but
    /// QEMU's DHCP server and the host's port forward into the guest still work. This is the
    /// network-unplugged appliance as far as the appliance can tell, yet still testable.
    Unplugged,
}

/// Debian's OVMF: the firmware code is shared read-only; each machine gets its own copy of the
/// variable store (boot entries), since firmware writes to it.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";

pub struct MachineConfig {
    pub boot: Boot,
    pub network: Network,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Host loopback port forwarded to the API port inside.
    pub api_port: u16,
    /// The guest address that forward goes to; None: the one QEMU's DHCP server hands out.
    /// Set for an appliance configured with a static address.
    pub api_guest_addr: Option<std::net::Ipv4Addr>,
    /// A 0600 file holding the admin API key, handed over with fw_cfg.
    pub admin_key_file: Option<PathBuf>,
    /// Operator proxy settings (JSON), handed over with fw_cfg like the key.
    pub proxy_config_file: Option<PathBuf>,
    /// Serve the API over plain HTTP (handed over with fw_cfg); otherwise it is HTTPS with the
    /// appliance's own CA, trusted by the fingerprint it prints (see `wait_api_ready`).
    pub plain_http: bool,
    /// A software TPM 2.0 with its state in this directory (kept with the disk: the appliance
    /// seals its master key to it); None: a machine without a TPM.
    pub tpm_state: Option<PathBuf>,
    /// Console log, monitor socket, the learned API CA (`api-ca.pem`).
    pub run_dir: PathBuf,
    pub accel: Accel,
}

/// The file in the run directory holding the API CA learned from the console's fingerprint.
pub const API_CA_FILE: &str = "api-ca.pem";

pub struct Machine {
    child: Option<Child>,
    /// Dropped after QEMU (fields drop in order): the TPM outlives the machine using it.
    _tpm: Option<crate::swtpm::SoftTpm>,
    pub console_log: PathBuf,
    monitor_socket: PathBuf,
    pub api_port: u16,
    plain_http: bool,
    /// Trust for the API's HTTPS, once learned.
    api_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Where the learned API CA is written.
    pub api_ca_file: PathBuf,
}

/// Installs what booting a disk image needs: UEFI firmware and qemu-img.
pub fn ensure_disk_tools() -> Result<()> {
    crate::host::ensure(&[
        crate::host::tool("qemu-system-x86_64", "qemu-system-x86"),
        crate::host::tool(OVMF_CODE, "ovmf"),
        crate::host::tool("qemu-img", "qemu-utils"),
    ])
}

/// Copies a built disk image to `target` (sparse) and grows it to `gib` GiB, the room the
/// appliance's data partition gets on first boot.
pub fn prepare_disk_copy(image: &Path, target: &Path, gib: u64) -> Result<()> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).ctx(|| format!("create {}", parent.display()))?;
    }
    let _ = std::fs::remove_file(target);
    crate::host::run_quiet(Command::new("cp").arg("--sparse=always").arg(image).arg(target))?;
    resize(target, DiskFormat::Raw, gib)
}

/// Grows a disk image to `gib` GiB (never shrinks).
pub fn resize(image: &Path, format: DiskFormat, gib: u64) -> Result<()> {
    let current = std::fs::metadata(image).ctx(|| format!("stat {}", image.display()))?.len();
    if format == DiskFormat::Raw && current >= gib << 30 {
        return Ok(());
    }
    crate::host::run_quiet(
        Command::new("qemu-img").args(["resize", "-q", "-f", format.name()]).arg(image).arg(format!("{gib}G")),
    )
    .map(|_| ())
}

/// Creates a sparse raw disk of `gib` GiB if it does not exist yet.
pub fn create_data_disk(path: &Path, gib: u64) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).ctx(|| format!("create {}", parent.display()))?;
    }
    let file = std::fs::File::create(path).ctx(|| format!("create {}", path.display()))?;
    file.set_len(gib << 30).ctx(|| format!("size {}", path.display()))
}

/// A free TCP port on loopback, preferring `preferred` (0: any).
pub fn free_port(preferred: u16) -> Result<u16> {
    if preferred != 0 && std::net::TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).ctx(|| "bind a free loopback port".into())?;
    Ok(listener.local_addr().ctx(|| "read bound port".into())?.port())
}

impl Machine {
    pub fn start(cfg: &MachineConfig) -> Result<Machine> {
        std::fs::create_dir_all(&cfg.run_dir).ctx(|| format!("create {}", cfg.run_dir.display()))?;
        let console_log = cfg.run_dir.join("console.log");
        let monitor_socket = cfg.run_dir.join("monitor.sock");
        let _ = std::fs::remove_file(&monitor_socket);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "q35", "-nodefaults", "-no-user-config", "-display", "none"]);
        match cfg.accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => {
                let threads = std::env::var("OC_TCG_THREAD").unwrap_or_else(|_| "multi".into());
                cmd.args(["-accel", &format!("tcg,thread={threads}"), "-cpu", "max"])
            }
        };
        cmd.arg("-smp").arg(cfg.cpus.to_string()).arg("-m").arg(cfg.memory_mib.to_string());
        cmd.arg("-chardev").arg(format!("file,id=console,path={},append=on", console_log.display()));
        cmd.args(["-serial", "chardev:console"]);
        cmd.arg("-monitor").arg(format!("unix:{},server=on,wait=off", monitor_socket.display()));
        match &cfg.boot {
            Boot::Kernel { artifacts, data_disk } => {
                cmd.arg("-kernel").arg(&artifacts.kernel);
                cmd.arg("-initrd").arg(&artifacts.initramfs);
                cmd.arg("-append").arg(&artifacts.cmdline);
                cmd.arg("-drive").arg(format!("file={},if=none,id=data,format=raw,discard=unmap", data_disk.display()));
                cmd.args(["-device", "virtio-blk-pci,drive=data"]);
                // Read-only: the appliance must not change it, and init never mistakes it for the data disk.
                cmd.arg("-drive")
                    .arg(format!("file={},if=none,id=system,format=raw,readonly=on", artifacts.system_disk.display()));
                cmd.args(["-device", "virtio-blk-pci,drive=system"]);
            }
            Boot::Disk { image, format } => {
                let vars = cfg.run_dir.join("OVMF_VARS.fd");
                std::fs::copy(OVMF_VARS, &vars)
                    .ctx(|| format!("copy {OVMF_VARS} (package ovmf) to {}", vars.display()))?;
                cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"));
                cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
                cmd.arg("-drive").arg(format!(
                    "file={},if=none,id=boot,format={},discard=unmap",
                    image.display(),
                    format.name()
                ));
                cmd.args(["-device", "virtio-blk-pci,drive=boot,bootindex=0"]);
            }
        }
        let restrict = match cfg.network {
            Network::Outbound => "",
            Network::Unplugged => "restrict=on,",
        };
        let guest = cfg.api_guest_addr.map(|a| a.to_string()).unwrap_or_default();
        cmd.arg("-netdev")
            .arg(format!("user,id=net0,{restrict}hostfwd=tcp:127.0.0.1:{}-{guest}:{API_PORT_IN_GUEST}", cfg.api_port));
        cmd.args(["-device", "virtio-net-pci,netdev=net0"]);
        cmd.args(["-device", "virtio-rng-pci"]);
        let tpm = match &cfg.tpm_state {
            Some(state) => {
                crate::swtpm::ensure_installed()?;
                let tpm = crate::swtpm::SoftTpm::start(state, &cfg.run_dir)?;
                cmd.args(tpm.qemu_args());
                Some(tpm)
            }
            None => None,
        };
        if let Some(config) = &cfg.proxy_config_file {
            cmd.arg("-fw_cfg").arg(format!("name={PROXY_CONFIG_FW_CFG},file={}", config.display()));
        }
        if let Some(key_file) = &cfg.admin_key_file {
            cmd.arg("-fw_cfg").arg(format!("name={ADMIN_KEY_FW_CFG},file={}", key_file.display()));
        }
        if cfg.plain_http {
            let settings = cfg.run_dir.join("api-tls.json");
            std::fs::write(&settings, r#"{"plainHttp": true}"#).ctx(|| format!("write {}", settings.display()))?;
            cmd.arg("-fw_cfg").arg(format!("name={API_TLS_FW_CFG},file={}", settings.display()));
        }
        // Own process group: the operator's Ctrl-C reaches us, and we shut the guest down cleanly
        // instead of QEMU dying mid-write.
        cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::null());
        let stderr_log = cfg.run_dir.join("qemu.stderr");
        cmd.stderr(std::fs::File::create(&stderr_log).ctx(|| format!("create {}", stderr_log.display()))?);
        let child = cmd.spawn().ctx(|| "start qemu-system-x86_64".into())?;
        Ok(Machine {
            child: Some(child),
            _tpm: tpm,
            console_log,
            monitor_socket,
            api_port: cfg.api_port,
            plain_http: cfg.plain_http,
            api_tls: None,
            api_ca_file: cfg.run_dir.join(API_CA_FILE),
        })
    }

    /// Runs one human-monitor command and returns its output.
    pub fn monitor(&self, command: &str) -> Result<String> {
        let mut stream = UnixStream::connect(&self.monitor_socket)
            .ctx(|| format!("connect to QEMU monitor {}", self.monitor_socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ctx(|| "monitor timeout".into())?;
        read_until_prompt(&mut stream)?;
        stream.write_all(format!("{command}\n").as_bytes()).ctx(|| format!("send {command} to QEMU"))?;
        let out = read_until_prompt(&mut stream)?;
        Ok(out)
    }

    /// Waits up to `timeout` for QEMU to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The exit status if QEMU has ended.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else { return Err(err!("QEMU was already reaped")) };
        let status = child.try_wait().ctx(|| "wait for QEMU".into())?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    pub fn console(&self) -> String {
        std::fs::read(&self.console_log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    pub fn console_tail(&self, lines: usize) -> String {
        let text = self.console();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the console, after byte offset `from`, contains `needle`; returns the line.
    pub fn wait_for_console(&mut self, needle: &str, from: usize, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console();
            if let Some(pos) = text.get(from..).and_then(|t| t.find(needle)) {
                let start = text[..from + pos].rfind('\n').map_or(0, |p| p + 1);
                let end = text[from + pos..].find('\n').map_or(text.len(), |p| from + pos + p);
                // The console's tty turns "\n" into "\r\n".
                return Ok(text[start..end].trim_end().to_string());
            }
            if let Some(status) = self.try_exit()? {
                return Err(err!("QEMU exited ({status}) before the console showed {needle:?}"));
            }
            if Instant::now() >= deadline {
                return Err(err!("the console did not show {needle:?} within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Where the API answers, with the trust learned so far.
    pub fn api(&self) -> crate::http::Endpoint {
        crate::http::Endpoint { port: self.api_port, tls: self.api_tls.clone() }
    }

    /// Polls `GET /api/healthz` until it answers 200; returns the body. Over HTTPS, first
    /// learns the API CA: the one in the presented chain whose fingerprint the console printed
    /// (written to `api_ca_file`); the health check then verifies the API against it.
    pub fn wait_api_ready(&mut self, timeout: Duration, stop: &dyn Fn() -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut trust_problem = String::new();
        loop {
            if !self.plain_http && self.api_tls.is_none() {
                if let Some(expected) = crate::api_trust::fingerprint_on_console(&self.console()) {
                    match crate::api_trust::trust_by_fingerprint(self.api_port, &expected, &self.api_ca_file) {
                        Ok(tls) => self.api_tls = Some(tls),
                        Err(e) => trust_problem = format!(" ({e})"),
                    }
                }
            }
            if self.plain_http || self.api_tls.is_some() {
                if let Ok(resp) =
                    crate::http::request(&self.api(), "GET", "/api/healthz", &[], b"", Duration::from_secs(5))
                {
                    if resp.status == 200 {
                        return Ok(resp.text());
                    }
                }
            }
            if let Some(status) = self.try_exit()? {
                return Err(err!("QEMU exited ({status}) before the API answered"));
            }
            if stop() {
                return Err(err!("interrupted while waiting for the API"));
            }
            if Instant::now() >= deadline {
                return Err(err!("the API did not answer on port {} within {timeout:?}{trust_problem}", self.api_port));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Asks the guest to power off (ACPI power button) and waits for QEMU to exit.
    pub fn power_down(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.monitor("system_powerdown")?;
        self.wait_exit(timeout)?.ok_or_else(|| err!("the appliance did not power off within {timeout:?}"))
    }

    /// Ends QEMU at once (a power cut, from the guest's point of view).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_until_prompt(stream: &mut UnixStream) -> Result<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.ends_with(b"(qemu) ") {
        let n = stream.read(&mut buf).ctx(|| "read from QEMU monitor".into())?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

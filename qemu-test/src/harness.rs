//! The shared test appliance and the scenario runner.

use crate::api::Api;
use crate::upstream::Upstream;
use image::error::{Context, Result};
use image::pipeline::{self, Artifacts, Variant};
use image::qemu::{self, Machine, MachineConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// TCG boots take tens of seconds; a generous bound still catches a hang.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(180);

/// One booted test appliance with its persistent data disk.
pub struct Appliance {
    pub machine: Machine,
    pub api_key: String,
    pub data_disk: PathBuf,
    pub run_dir: PathBuf,
    artifacts: Artifacts,
    key_file: PathBuf,
    proxy_config: PathBuf,
    /// The recording HTTPS server the sandboxes' sealed requests go to (test variant only).
    pub upstream: Option<Upstream>,
    pub boot_time: Duration,
}

/// The test appliance's software TPM state, in the work dir: new with every fresh data disk.
pub const TPM_STATE_DIR: &str = "tpm";

pub fn work_dir() -> PathBuf {
    image::workspace::target_dir().join("qemu-test")
}

impl Appliance {
    /// Builds the test image and boots it with a fresh, blank data disk.
    pub fn boot_fresh() -> Result<Appliance> {
        Appliance::boot_fresh_variant(Variant::Test, "")
    }

    /// Builds `variant` and boots it with `extra` appended to the appliance kernel's command
    /// line (how the benchmarks tell their test-only service what to do).
    pub fn boot_fresh_variant(variant: Variant, extra: &str) -> Result<Appliance> {
        let mut artifacts = pipeline::build(variant)?;
        if !extra.trim().is_empty() {
            artifacts.cmdline = format!("{} {}", artifacts.cmdline, extra.trim());
        }
        image::host::ensure(&[
            image::host::tool("qemu-system-x86_64", "qemu-system-x86"),
            image::host::tool("xfs_repair", "xfsprogs"),
        ])?;
        let dir = work_dir();
        std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
        let data_disk = dir.join("data.img");
        let _ = std::fs::remove_file(&data_disk);
        // The master key sealed to the old TPM belonged to the old disk.
        let _ = std::fs::remove_dir_all(dir.join(TPM_STATE_DIR));
        let _ = std::fs::remove_file(dir.join("console.log"));
        qemu::create_data_disk(&data_disk, 8)?;
        let api_key = image::run::generate_api_key()?;
        let key_file = dir.join("admin-key");
        image::run::write_key_file(&key_file, &api_key)?;
        let upstream = match variant {
            Variant::Test => Some(Upstream::start(&dir.join("upstream"))?),
            _ => None,
        };
        let proxy_config = dir.join("proxy-config.json");
        let settings = upstream.as_ref().map_or_else(|| serde_json::json!({}), Upstream::proxy_config);
        std::fs::write(&proxy_config, settings.to_string()).ctx(|| "write the proxy settings".into())?;
        let mut appliance = Appliance {
            machine: start(&artifacts, &data_disk, &key_file, &proxy_config, &dir)?,
            api_key,
            data_disk,
            run_dir: dir,
            artifacts,
            key_file,
            proxy_config,
            upstream,
            boot_time: Duration::ZERO,
        };
        appliance.wait_ready()?;
        Ok(appliance)
    }

    /// Waits for `GET /api/healthz`, recording how long the boot took.
    pub fn wait_ready(&mut self) -> Result<String> {
        let started = Instant::now();
        let body = self
            .machine
            .wait_api_ready(BOOT_TIMEOUT, &|| false)
            .map_err(|e| image::err!("{e}\nlast console lines:\n{}", self.machine.console_tail(40)))?;
        self.boot_time = started.elapsed();
        Ok(body)
    }

    /// Boots the same disk again after the previous QEMU exited.
    pub fn boot_again(&mut self) -> Result<()> {
        self.machine = start(&self.artifacts, &self.data_disk, &self.key_file, &self.proxy_config, &self.run_dir)?;
        self.wait_ready().map(|_| ())
    }

    /// The API of this appliance, with its admin key.
    pub fn api(&self) -> Api {
        Api::new(self.machine.api(), &self.api_key)
    }

    pub fn console_len(&self) -> usize {
        self.machine.console().len()
    }
}

fn start(artifacts: &Artifacts, data_disk: &Path, key_file: &Path, proxy_config: &Path, dir: &Path) -> Result<Machine> {
    let (accel, why) = qemu::detect_accel();
    eprintln!(
        "[qemu-test] booting the test appliance ({accel:?}: {why}); console: {}",
        dir.join("console.log").display()
    );
    let cfg = MachineConfig {
        tpm_state: Some(dir.join(TPM_STATE_DIR)),
        boot: qemu::Boot::Kernel { artifacts: artifacts.clone(), data_disk: data_disk.to_path_buf() },
        network: qemu::Network::Outbound,
        memory_mib: 3072,
        cpus: std::env::var("OC_QEMU_CPUS").ok().and_then(|c| c.parse().ok()).unwrap_or(qemu::default_cpus(accel)),
        api_port: qemu::free_port(0)?,
        api_guest_addr: None,
        admin_key_file: Some(key_file.to_path_buf()),
        plain_http: false,
        proxy_config_file: Some(proxy_config.to_path_buf()),
        run_dir: dir.to_path_buf(),
        accel,
    };
    Machine::start(&cfg)
}

/// A named end-to-end check against the shared appliance.
#[derive(Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub run: fn(&mut Appliance) -> Result<()>,
}

/// Runs scenarios in order; a failure prints the console's last lines. Returns the failure count.
pub fn run_all(appliance: &mut Appliance, scenarios: &[Scenario]) -> usize {
    let mut failures = 0;
    for scenario in scenarios {
        let started = Instant::now();
        match (scenario.run)(appliance) {
            Ok(()) => eprintln!("[qemu-test] PASS {} ({:.1}s)", scenario.name, started.elapsed().as_secs_f64()),
            Err(e) => {
                failures += 1;
                eprintln!("[qemu-test] FAIL {} ({:.1}s): {e}", scenario.name, started.elapsed().as_secs_f64());
                eprintln!("[qemu-test] last console lines:\n{}", appliance.machine.console_tail(30));
            }
        }
    }
    failures
}

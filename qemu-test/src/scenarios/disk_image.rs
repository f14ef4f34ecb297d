//! `qemu-test e2e-disk`: the bootable disk image on its own. UEFI firmware (OVMF) boots a copy of
//! the built image with no -kernel and no other disk; the admin key comes from the
//! configuration file on its EFI partition. Checks: API ready, a project survives a reboot (on
//! a disk grown in between, so the data partition is grown too), the appliance serves and runs
//! a sandbox with the network unplugged (templates come from the image), and the same image
//! converted to compressed qcow2 boots. No test upstream is started. Prints the measurements.

use crate::api::Api;
use super::check;
use image::err;
use image::error::{Context, Result};
use image::esp;
use image::pipeline::{self, Variant};
use image::qemu::{self, Boot, DiskFormat, Machine, MachineConfig, Network};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(180);
const PROJECT: &str = "disk-e2e";

struct Run {
    dir: PathBuf,
    key: String,
    times: Vec<(String, f64)>,
}

pub fn run() -> Result<String> {
    let started = Instant::now();
    let (_, built) = pipeline::build_disk(Variant::Product)?;
    qemu::ensure_disk_tools()?;
    let dir = image::workspace::target_dir().join("qemu-test-disk");
    std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
    let mut run = Run { dir: dir.clone(), key: image::run::generate_api_key()?, times: Vec::new() };

    // The operator's configuration goes onto the copy's EFI partition, like an operator would.
    let conf = dir.join("opencomputer.conf");
    std::fs::write(&conf, format!("# written by qemu-test e2e-disk\nadmin_key = {}\nhostname = oc-disk-e2e\n", run.key))
        .ctx(|| "write the test configuration".into())?;
    let pristine = dir.join("configured.img");
    qemu::prepare_disk_copy(&built.path, &pristine, 0)?;
    esp::copy_in(&pristine, &image::disk_image::esp_offset_spec(&pristine)?, image::disk_image::CONFIG_FILE, &conf)?;

    let disk = dir.join("disk.img");
    qemu::prepare_disk_copy(&pristine, &disk, 8)?;

    // Boot 1: first boot creates the data partition; a project is stored.
    let mut m = run.boot("first boot (raw, 8 GiB)", &disk, DiskFormat::Raw, Network::Outbound)?;
    m.wait_for_console("data partition /dev/vda4 created", 0, Duration::from_secs(5))?;
    m.wait_for_console("admin API key: from opencomputer.conf line 2", 0, Duration::from_secs(1))?;
    check(!m.console().contains(&run.key), || "the admin key appears on the console".into())?;
    let api = Api::new(m.api_port, &run.key);
    let project = api.expect(201, "POST", "/projects", &json!({"name": PROJECT}))?;
    let id = project["id"].as_str().ok_or_else(|| err!("no id in {project}"))?.to_string();
    power_down(&mut m)?;

    // Boot 2, after the disk grew: the partition and filesystem grow, the project is still there.
    qemu::resize(&disk, DiskFormat::Raw, 12)?;
    let mut m = run.boot("second boot (disk grown to 12 GiB)", &disk, DiskFormat::Raw, Network::Outbound)?;
    m.wait_for_console("data partition /dev/vda4 grown", 0, Duration::from_secs(5))?;
    m.wait_for_console("data filesystem on /dev/vda4 grown", 0, Duration::from_secs(5))?;
    let api = Api::new(m.api_port, &run.key);
    let again = api.expect(200, "GET", &format!("/projects/{id}"), &Value::Null)?;
    check(again["name"] == PROJECT, || format!("the project did not survive the reboot: {again}"))?;
    power_down(&mut m)?;

    // Boot 3, network unplugged: only the API port forward reaches the guest.
    let mut m = run.boot("network unplugged", &disk, DiskFormat::Raw, Network::Unplugged)?;
    let api = Api::new(m.api_port, &run.key);
    let sandbox_started = Instant::now();
    let sid = api.create_sandbox(&json!({}))?;
    let (code, out, err_out) = api.run(&sid, "echo hi", 60)?;
    check(code == 0 && out == "hi\n", || format!("echo hi in a sandbox: exit {code}, stdout {out:?}, stderr {err_out:?}"))?;
    run.times.push(("sandbox created + echo hi (unplugged)".into(), sandbox_started.elapsed().as_secs_f64()));
    power_down(&mut m)?;

    // The configured image as compressed qcow2, booted fresh.
    let qcow2 = dir.join("disk.qcow2");
    let _ = std::fs::remove_file(&qcow2);
    image::host::run_quiet(Command::new("qemu-img").args(["convert", "-c", "-O", "qcow2"]).arg(&pristine).arg(&qcow2))?;
    let qcow2_size = size(&qcow2)?;
    qemu::resize(&qcow2, DiskFormat::Qcow2, 8)?;
    let mut m = run.boot("qcow2 first boot", &qcow2, DiskFormat::Qcow2, Network::Outbound)?;
    m.wait_for_console("data partition /dev/vda4 created", 0, Duration::from_secs(5))?;
    power_down(&mut m)?;

    let allocated = allocated(&built.path)?;
    let mut report = format!(
        "disk image {}\n  sha256 {}\n  raw size {} MiB ({} MiB allocated), qcow2 -c {} MiB\n",
        built.path.display(),
        built.sha256,
        built.size >> 20,
        allocated >> 20,
        qcow2_size >> 20
    );
    for (what, secs) in &run.times {
        report.push_str(&format!("  {what}: {secs:.1}s\n"));
    }
    report.push_str(&format!("  e2e-disk total {:.0}s\n", started.elapsed().as_secs_f64()));
    Ok(report)
}

impl Run {
    /// Boots `disk` under UEFI alone and waits for the API; records the time to API ready.
    fn boot(&mut self, what: &str, disk: &Path, format: DiskFormat, network: Network) -> Result<Machine> {
        let (accel, why) = qemu::detect_accel();
        let run_dir = self.dir.join("run");
        let _ = std::fs::remove_file(run_dir.join("console.log"));
        eprintln!("[qemu-test] {what}: booting {} ({accel:?}: {why}); console: {}", disk.display(), run_dir.join("console.log").display());
        let cfg = MachineConfig {
            boot: Boot::Disk { image: disk.to_path_buf(), format },
            network,
            memory_mib: 3072,
            cpus: std::env::var("OC_QEMU_CPUS").ok().and_then(|c| c.parse().ok()).unwrap_or(qemu::default_cpus(accel)),
            api_port: qemu::free_port(0)?,
            // The key comes from the configuration file on the EFI partition, not fw_cfg.
            admin_key_file: None,
            proxy_config_file: None,
            run_dir,
            accel,
        };
        let started = Instant::now();
        let mut machine = Machine::start(&cfg)?;
        machine
            .wait_api_ready(BOOT_TIMEOUT, &|| false)
            .map_err(|e| err!("{what}: {e}\nlast console lines:\n{}", machine.console_tail(40)))?;
        let secs = started.elapsed().as_secs_f64();
        eprintln!("[qemu-test] {what}: API ready after {secs:.1}s");
        self.times.push((format!("{what}: boot to API ready"), secs));
        Ok(machine)
    }
}

fn power_down(machine: &mut Machine) -> Result<()> {
    let status = machine.power_down(SHUTDOWN_TIMEOUT)?;
    check(status.success(), || format!("QEMU exited with {status}"))?;
    machine.wait_for_console("/data unmounted cleanly", 0, Duration::from_secs(1)).map(|_| ())
}

fn size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).ctx(|| format!("stat {}", path.display()))?.len())
}

fn allocated(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path).ctx(|| format!("stat {}", path.display()))?.blocks() * 512)
}

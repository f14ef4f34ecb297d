//! The foundation: our PID 1 boots the appliance, supervises services, reaps zombies, keeps
//! data across a clean reboot, and powers off cleanly leaving a consistent data disk.

use crate::harness::{Appliance, Scenario, SHUTDOWN_TIMEOUT};
use image::err;
use image::error::Result;
use std::time::Duration;

/// Scenarios that leave the appliance running as they found it.
pub const SCENARIOS: &[Scenario] = &[
    Scenario { name: "healthz answers and /dev/kvm inside creates a VM and a vCPU", run: kvm_inside_works },
    Scenario {
        name: "the API is HTTPS with the CA whose fingerprint the console printed; plain HTTP is told so",
        run: api_is_https,
    },
    Scenario { name: "PID 1 is our init and it supervises the appliance service", run: pid1_supervises },
    Scenario { name: "an orphaned zombie is reaped by init", run: zombie_reaped },
    Scenario { name: "a killed service is restarted by init", run: killed_service_restarts },
    Scenario { name: "the image's mke2fs makes an ext4 disk from a directory inside the appliance", run: mke2fs_works },
];

/// Reboots the appliance: runs after the scenarios that store data to check afterwards.
pub const REBOOT_SCENARIOS: &[Scenario] =
    &[Scenario { name: "a file on the data disk survives a clean reboot", run: data_survives_reboot }];

/// Powers the appliance off: runs last.
pub const FINAL_SCENARIOS: &[Scenario] = &[
    Scenario { name: "system_powerdown shuts down cleanly and the data disk checks clean", run: powerdown_is_clean },
    Scenario {
        name: "a copy of the data disk decrypts nothing on the host; the TPM's key opens every secret",
        run: data_disk_copy_decrypts_nothing,
    },
];

const PROBE_TIMEOUT: Duration = Duration::from_secs(180);

fn healthz(appliance: &Appliance) -> Result<String> {
    let resp =
        image::http::request(&appliance.machine.api(), "GET", "/api/healthz", &[], b"", Duration::from_secs(10))?;
    if resp.status != 200 {
        return Err(err!("healthz answered {}: {}", resp.status, resp.text()));
    }
    Ok(resp.text())
}

fn kvm_inside_works(appliance: &mut Appliance) -> Result<()> {
    let body = healthz(appliance)?;
    if !body.contains("\"kvm\":\"ok\"") || !body.contains("\"vcpu\":true") {
        return Err(err!("healthz does not report a working nested KVM: {body}"));
    }
    Ok(())
}

/// The harness already trusts the API only through the CA whose fingerprint the console printed
/// (image::api_trust); this checks that it did, that the trusted file is that CA, and that a
/// plain-HTTP client of the same port gets a JSON answer pointing at https://.
fn api_is_https(appliance: &mut Appliance) -> Result<()> {
    let api = appliance.machine.api();
    if api.tls.is_none() || !api.url().starts_with("https://") {
        return Err(err!("the harness reaches the API without TLS: {}", api.url()));
    }
    let console = appliance.machine.console();
    let printed = image::api_trust::fingerprint_on_console(&console)
        .ok_or_else(|| err!("the console shows no API CA fingerprint"))?;
    let pem_text = std::fs::read_to_string(&appliance.machine.api_ca_file)
        .map_err(|e| err!("{}: {e}", appliance.machine.api_ca_file.display()))?;
    let der = pem::parse(&pem_text).map_err(|e| err!("the trusted CA file is not PEM: {e}"))?;
    let trusted = image::api_trust::fingerprint(der.contents());
    if trusted != printed {
        return Err(err!("the trusted CA has fingerprint {trusted}, the console printed {printed}"));
    }
    let plain = image::http::Endpoint::plain(api.port);
    let resp = image::http::request(&plain, "GET", "/api/healthz", &[], b"", Duration::from_secs(10))?;
    if resp.status != 400 || !resp.text().contains("https://") {
        return Err(err!("plain HTTP to the HTTPS port answered {}: {}", resp.status, resp.text()));
    }
    eprintln!("[qemu-test]   API CA {printed} trusted; plain HTTP answered 400");
    Ok(())
}

fn probe_line(appliance: &mut Appliance, prefix: &str) -> Result<String> {
    appliance.machine.wait_for_console(&format!("PROBE {prefix}"), 0, PROBE_TIMEOUT)
}

fn expect_ok(line: &str) -> Result<()> {
    if line.contains("FAIL") {
        Err(err!("probe reported: {line}"))
    } else {
        Ok(())
    }
}

fn pid1_supervises(appliance: &mut Appliance) -> Result<()> {
    let exe = probe_line(appliance, "pid1 exe=")?;
    if !exe.ends_with("exe=/init") {
        return Err(err!("PID 1 is not our /init: {exe}"));
    }
    expect_ok(&probe_line(appliance, "supervised")?)
}

fn zombie_reaped(appliance: &mut Appliance) -> Result<()> {
    expect_ok(&probe_line(appliance, "zombie-reaped")?)
}

/// The appliance makes template disks from imported archives with `/sbin/mke2fs -t ext4 -d`;
/// the probe runs it there (no /etc/mke2fs.conf in the image) and checks the result.
fn mke2fs_works(appliance: &mut Appliance) -> Result<()> {
    let line = probe_line(appliance, "mke2fs")?;
    expect_ok(&line)?;
    eprintln!("[qemu-test]   {}", line.trim());
    Ok(())
}

fn killed_service_restarts(appliance: &mut Appliance) -> Result<()> {
    let line = probe_line(appliance, "service-restart")?;
    expect_ok(&line)?;
    appliance.machine.wait_for_console("appliance exited (killed by signal 9)", 0, Duration::from_secs(5))?;
    // The restarted service must answer again.
    appliance.wait_ready().map(|_| ())
}

fn data_survives_reboot(appliance: &mut Appliance) -> Result<()> {
    let first = probe_line(appliance, "boots=")?;
    if !first.ends_with("boots=1") {
        return Err(err!("fresh disk should count boot 1: {first}"));
    }
    probe_line(appliance, "done")?;
    let offset = appliance.console_len();
    // Ctrl-Alt-Del reaches PID 1 as SIGINT: a clean reboot, not a reset.
    appliance.machine.monitor("sendkey ctrl-alt-delete")?;
    appliance.machine.wait_for_console("shutting down (signal 2) to reboot", offset, Duration::from_secs(60))?;
    appliance.machine.wait_for_console("/data unmounted cleanly", offset, Duration::from_secs(60))?;
    let second = appliance.machine.wait_for_console("PROBE boots=", offset, Duration::from_secs(600))?;
    if !second.ends_with("boots=2") {
        return Err(err!("after a reboot the counter written on boot 1 must read 2: {second}"));
    }
    appliance.wait_ready().map(|_| ())
}

fn powerdown_is_clean(appliance: &mut Appliance) -> Result<()> {
    let offset = appliance.console_len();
    let status = appliance.machine.power_down(SHUTDOWN_TIMEOUT)?;
    if !status.success() {
        return Err(err!("QEMU exited with {status} after system_powerdown"));
    }
    appliance.machine.wait_for_console("/data unmounted cleanly", offset, Duration::from_secs(1))?;
    super::xfs_check(&appliance.data_disk)
}

/// Runs after the power-off: the master key was sealed to the (software) TPM, so the data disk
/// alone holds only the sealed blob.
fn data_disk_copy_decrypts_nothing(appliance: &mut Appliance) -> Result<()> {
    let findings = super::data_copy::decrypts_nothing(&appliance.data_disk, None, &appliance.run_dir)?;
    let (_, blob) = findings
        .small_files
        .iter()
        .find(|(name, _)| name == "master.key.tpm")
        .ok_or_else(|| err!("no sealed master key (master.key.tpm) on the data disk"))?;
    let state = appliance.run_dir.join(crate::harness::TPM_STATE_DIR);
    let key = super::data_copy::unseal_with_swtpm(&state, blob, &appliance.run_dir)?;
    super::data_copy::control_opens_all(key, &findings, "TPM's")
}

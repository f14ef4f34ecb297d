//! `qemu-test bench snapshot` (issue 16): in one booted test appliance, create -> first command
//! output through the API, with a kernel boot and from the template snapshot, several times
//! each, alternating; then hibernate and wake times and the resident memory of a hibernated
//! sandbox (its VMM processes' RSS, from /metrics). A create boots its kernel when its machine
//! or disk differs from the template snapshot's (1 vCPU, 512 MiB, the template's disk): the boot
//! runs ask for a root disk 16 MiB larger, which costs the guest nothing measurable.

use crate::api::{metric, Api};
use crate::harness::Appliance;
use image::err;
use image::error::Result;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The template disk's size (image/src/template.rs) plus 16 MiB: not the snapshot's disk.
const BOOT_DISK_MB: u32 = 2048 + 16;
const SNAPSHOT_WAIT: Duration = Duration::from_secs(600);

pub struct SnapshotBench {
    pub boot_ms: Vec<f64>,
    pub restore_ms: Vec<f64>,
    pub hibernate_ms: Vec<f64>,
    pub wake_ms: Vec<f64>,
    pub hibernated_rss_mib: f64,
    pub running_rss_mib: f64,
}

/// The median of `v` (the upper one of an even count; 0 for none).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        0.0
    } else {
        s[s.len() / 2]
    }
}

impl SnapshotBench {
    pub fn last_line(&self) -> String {
        let (boot, restore) = (median(&self.boot_ms), median(&self.restore_ms));
        format!(
            "snapshot-bench boot_first_command_ms={boot:.0} restore_first_command_ms={restore:.0} ratio={:.2} hibernate_ms={:.0} wake_ms={:.0} hibernated_rss_mib={:.1}",
            if boot > 0.0 { restore / boot } else { 0.0 },
            median(&self.hibernate_ms),
            median(&self.wake_ms),
            self.hibernated_rss_mib
        )
    }

    pub fn report(&self) -> String {
        let list = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
        format!(
            "create -> first command, kernel boot (ms): {}\ncreate -> first command, template snapshot (ms): {}\nhibernate (ms): {}\nwake (ms): {}\nVMM RSS of the sandbox running: {:.1} MiB; hibernated: {:.1} MiB\n{}",
            list(&self.boot_ms),
            list(&self.restore_ms),
            list(&self.hibernate_ms),
            list(&self.wake_ms),
            self.running_rss_mib,
            self.hibernated_rss_mib,
            self.last_line()
        )
    }
}

fn vmm_rss_mib(api: &Api) -> Result<f64> {
    let text = api.metrics()?;
    let bytes = metric(&text, "appliance_vmm_resident_bytes").ok_or_else(|| err!("no VMM RSS gauge in /metrics"))?;
    Ok(bytes / f64::from(1 << 20))
}

/// Create with `body`, then the first command's output; returns the milliseconds and the id.
pub fn create_to_first_output(api: &Api, body: &Value) -> Result<(f64, String)> {
    let started = Instant::now();
    let id = api.create_sandbox(body)?;
    let (code, out, err) = api.run(&id, "echo first-output", 60)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if code != 0 || out.trim() != "first-output" {
        return Err(err!("first command in {id}: exit {code}, {out:?}, {err:?}"));
    }
    Ok((ms, id))
}

/// Waits until the appliance has taken the template snapshot of `base` (its first boot takes them
/// in the background); answers how long that was.
pub fn wait_for_base_snapshot(appliance: &Appliance) -> Result<Duration> {
    let api = appliance.api();
    let wait = Instant::now();
    loop {
        let ready = metric(&api.metrics()?, "appliance_template_snapshots_ready").unwrap_or(0.0);
        let console = appliance.machine.console();
        if ready >= 1.0 && console.contains("template base: snapshot") {
            return Ok(wait.elapsed());
        }
        if let Some(at) = console.find("template base: no snapshot") {
            let line = console[at..].lines().next().unwrap_or_default();
            return Err(err!("the appliance took no snapshot of template base: {line}"));
        }
        if wait.elapsed() > SNAPSHOT_WAIT {
            return Err(err!("no template snapshot was ready after {}s", SNAPSHOT_WAIT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn snapshot(runs: u32) -> Result<SnapshotBench> {
    let appliance = Appliance::boot_fresh()?;
    eprintln!(
        "[qemu-test] appliance up after {:.1}s; waiting for the template snapshots",
        appliance.boot_time.as_secs_f64()
    );
    let api = appliance.api();
    let waited = wait_for_base_snapshot(&appliance)?;
    eprintln!("[qemu-test] template snapshots ready after {:.1}s", waited.as_secs_f64());
    let mut bench = SnapshotBench {
        boot_ms: Vec::new(),
        restore_ms: Vec::new(),
        hibernate_ms: Vec::new(),
        wake_ms: Vec::new(),
        hibernated_rss_mib: -1.0,
        running_rss_mib: -1.0,
    };
    for n in 0..runs {
        let (ms, id) = create_to_first_output(&api, &json!({"timeout": 0, "diskMB": BOOT_DISK_MB}))?;
        api.expect(204, "DELETE", &format!("/sandboxes/{id}"), &Value::Null)?;
        eprintln!("[qemu-test] run {n}: kernel boot {ms:.0} ms");
        bench.boot_ms.push(ms);
        let (ms, id) = create_to_first_output(&api, &json!({"timeout": 0}))?;
        eprintln!("[qemu-test] run {n}: template snapshot {ms:.0} ms");
        bench.restore_ms.push(ms);
        // Hibernate and wake the resumed sandbox; with it the only one, the VMM RSS is its own.
        bench.running_rss_mib = vmm_rss_mib(&api)?;
        let started = Instant::now();
        api.expect(200, "POST", &format!("/sandboxes/{id}/hibernate"), &Value::Null)?;
        bench.hibernate_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        bench.hibernated_rss_mib = vmm_rss_mib(&api)?;
        let started = Instant::now();
        api.expect(200, "POST", &format!("/sandboxes/{id}/wake"), &json!({}))?;
        bench.wake_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        api.run(&id, "true", 30)?;
        api.expect(204, "DELETE", &format!("/sandboxes/{id}"), &Value::Null)?;
    }
    Ok(bench)
}

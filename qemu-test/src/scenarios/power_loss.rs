//! Power cuts: QEMU is killed while four clients write 200 projects through the API. After the
//! next boot every write the API acknowledged (201) is there, and the data filesystem, with
//! its log replayed, checks clean. Repeated `OC_POWER_LOSS_ROUNDS` times (default 10), each cut
//! at a different point of the stream.

use super::xfs_check;
use crate::api::Api;
use crate::check::check;
use crate::harness::{Appliance, Scenario, SHUTDOWN_TIMEOUT};
use image::err;
use image::error::{Context, Result};
use image::host::run_quiet;
use image::qemu::Machine;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Runs once the appliance is powered off; boots it again for every round.
pub const SCENARIOS: &[Scenario] = &[Scenario {
    name: "acknowledged writes survive a power cut during 200 API writes, and the filesystem checks clean",
    run: power_cuts,
}];

const WRITES: usize = 200;
const WRITERS: usize = 4;

fn rounds() -> Result<usize> {
    match std::env::var("OC_POWER_LOSS_ROUNDS") {
        Err(_) => Ok(10),
        Ok(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| err!("OC_POWER_LOSS_ROUNDS={text}: expected 1..=100")),
    }
}

fn power_cuts(appliance: &mut Appliance) -> Result<()> {
    let rounds = rounds()?;
    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..rounds {
        let started = Instant::now();
        appliance.boot_again()?;
        let boot = started.elapsed();
        check_present(&appliance.api(), &acknowledged)?;
        // Cut after a different number of acknowledged writes each round, from early to late.
        let key = appliance.api_key.clone();
        let (acked, in_flight) =
            write_until_cut(&mut appliance.machine, &key, &format!("cut-{round}"), cut_point(round))?;
        let cut_at = acked.len();
        acknowledged.extend(acked);
        check_xfs_after_cut(&appliance.data_disk, None, &appliance.run_dir).map_err(|e| err!("round {round}: {e}"))?;
        eprintln!(
            "[qemu-test]   round {}: booted in {:.1}s, cut after {} acknowledged writes ({in_flight} in flight), filesystem clean",
            round + 1,
            boot.as_secs_f64(),
            cut_at
        );
    }
    // The last round's writes must be there too, and a clean power-off leaves a clean disk.
    appliance.boot_again()?;
    check_present(&appliance.api(), &acknowledged)?;
    let status = appliance.machine.power_down(SHUTDOWN_TIMEOUT)?;
    check(status.success(), || format!("QEMU exited with {status} after system_powerdown"))?;
    xfs_check(&appliance.data_disk)?;
    eprintln!("[qemu-test]   {rounds} power cuts, {} acknowledged writes, none lost", acknowledged.len());
    Ok(())
}

/// After how many acknowledged writes round `round` cuts: a different point each round, from
/// early to late in the stream.
pub fn cut_point(round: usize) -> usize {
    10 + (round * 173) % (WRITES - 40)
}

/// Four clients write projects `<prefix>-<n>`; QEMU is killed once `cut_after` have been
/// acknowledged. Returns the acknowledged names and how many requests were in flight at the cut.
pub fn write_until_cut(
    machine: &mut Machine,
    key: &str,
    prefix: &str,
    cut_after: usize,
) -> Result<(Vec<String>, usize)> {
    let endpoint = machine.api();
    let next = AtomicUsize::new(0);
    let sent = AtomicUsize::new(0);
    let acked: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut in_flight = 0;
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..WRITERS {
            scope.spawn(|| {
                let api = Api::new(endpoint.clone(), key);
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= WRITES {
                        return;
                    }
                    let name = format!("{prefix}-{n}");
                    sent.fetch_add(1, Ordering::SeqCst);
                    match api.call("POST", "/projects", &json!({"name": name, "memoryMB": 256 + n})) {
                        Ok((201, _)) => acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(name),
                        // The machine is gone (connection refused or reset): this writer is done.
                        _ => return,
                    }
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len() < cut_after {
            if Instant::now() > deadline {
                machine.kill();
                return Err(err!("{prefix}: fewer than {cut_after} writes acknowledged in 120 s"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let acked_now = acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
        machine.kill();
        in_flight = sent.load(Ordering::SeqCst).saturating_sub(acked_now);
        Ok(())
    })?;
    let acked = acked.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    check(acked.len() < WRITES, || format!("{prefix}: all {WRITES} writes finished before the cut"))?;
    Ok((acked, in_flight))
}

pub fn check_present(api: &Api, acknowledged: &[String]) -> Result<()> {
    let listing = api.expect(200, "GET", "/projects", &Value::Null)?;
    let names: HashSet<&str> =
        listing.as_array().map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect()).unwrap_or_default();
    let missing: Vec<&String> = acknowledged.iter().filter(|n| !names.contains(n.as_str())).collect();
    check(missing.is_empty(), || {
        format!("{} acknowledged writes lost after a power cut: {:?}", missing.len(), &missing[..missing.len().min(10)])
    })
}

/// A cut leaves a dirty XFS log, which `xfs_repair -n` refuses to judge. A copy of the disk is
/// mounted on the host (replaying its log exactly as the next boot will) and then checked; the
/// original stays untouched for the appliance's own recovery. `extent` (byte offset, size)
/// picks the data partition out of a whole disk image.
pub fn check_xfs_after_cut(disk: &Path, extent: Option<(u64, u64)>, scratch: &Path) -> Result<()> {
    let copy = scratch.join("power-cut-copy.img");
    let mount_point = scratch.join("power-cut-mnt");
    let _ = std::fs::remove_file(&copy);
    run_quiet(Command::new("cp").arg("--sparse=always").arg("--reflink=auto").arg(disk).arg(&copy))?;
    std::fs::create_dir_all(&mount_point).ctx(|| format!("create {}", mount_point.display()))?;
    let mut attach = Command::new("losetup");
    attach.args(["--find", "--show"]);
    if let Some((offset, size)) = extent {
        attach.arg("--offset").arg(offset.to_string()).arg("--sizelimit").arg(size.to_string());
    }
    let checked = run_quiet(attach.arg(&copy)).and_then(|out| {
        let device = out.trim().to_string();
        let mounted = run_quiet(Command::new("mount").args(["-t", "xfs", &device]).arg(&mount_point));
        let unmounted = mounted.and_then(|_| run_quiet(Command::new("umount").arg(&mount_point)));
        let checked = unmounted.and_then(|_| xfs_check(Path::new(&device)));
        let detached = run_quiet(Command::new("losetup").arg("--detach").arg(&device));
        checked.and(detached.map(|_| ()))
    });
    let _ = std::fs::remove_file(&copy);
    checked
}

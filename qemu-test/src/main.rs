//! `qemu-test e2e`: builds the test image, boots it once, runs every scenario against it.
//! `qemu-test e2e-disk`: the UEFI disk image booted on its own (scenarios/disk_image.rs).
//! `qemu-test bench vmm`: our VMM against QEMU microvm inside the same appliance (issue 3).
//! `qemu-test bench snapshot`, `qemu-test bench templates`: creates from template snapshots and
//! from imported templates, in one booted appliance.
//! `qemu-test template-fixture`: builds the archives the template scenarios upload, and says where.

use qemu_test::harness::{run_all, Appliance, Scenario};
use qemu_test::scenarios;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("e2e") => e2e(),
        Some("e2e-disk") => match scenarios::disk_image::run() {
            Ok(report) => {
                println!("{report}");
                eprintln!("[qemu-test] e2e-disk passed");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("[qemu-test] e2e-disk FAILED: {e}");
                ExitCode::FAILURE
            }
        },
        Some("bench") if args.get(1).map(String::as_str) == Some("vmm") => bench_vmm(),
        Some("bench") if args.get(1).map(String::as_str) == Some("snapshot") => bench_snapshot(),
        Some("bench") if args.get(1).map(String::as_str) == Some("templates") => bench_templates(),
        Some("template-fixture") => template_fixture(),
        _ => {
            eprintln!("usage: qemu-test e2e | qemu-test e2e-disk | qemu-test bench vmm | qemu-test bench snapshot | qemu-test bench templates | qemu-test template-fixture   (OC_BENCH_RUNS=N runs per VMM, path or template, default 5; OC_BENCH_DIAG=N diagnostic rounds first)");
            ExitCode::from(2)
        }
    }
}

fn e2e() -> ExitCode {
    let started = Instant::now();
    let mut appliance = match Appliance::boot_fresh() {
        Ok(appliance) => appliance,
        Err(e) => {
            eprintln!("[qemu-test] the test appliance did not boot: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("[qemu-test] API ready after {:.1}s of boot", appliance.boot_time.as_secs_f64());
    let all: Vec<Scenario> = [
        scenarios::foundation::SCENARIOS,
        scenarios::sandboxes::SCENARIOS,
        scenarios::control_plane::SCENARIOS,
        scenarios::control_plane_load::SCENARIOS,
        scenarios::documented::SCENARIOS,
        scenarios::published_clients::SCENARIOS,
        scenarios::file_streams::SCENARIOS,
        scenarios::snapshots::SCENARIOS,
        scenarios::checkpoints::SCENARIOS,
        scenarios::templates::SCENARIOS,
        scenarios::sealing::SCENARIOS,
        scenarios::service_restart::SCENARIOS,
        scenarios::foundation::REBOOT_SCENARIOS,
        scenarios::control_plane::AFTER_REBOOT,
        scenarios::foundation::FINAL_SCENARIOS,
        scenarios::sealing::AFTER_POWERDOWN,
        scenarios::power_loss::SCENARIOS,
        scenarios::checkpoints::POWER_CUT,
    ]
    .concat();
    // OC_E2E_ONLY=<text>[,<text>...] runs only the scenarios whose name contains one of them.
    let only = std::env::var("OC_E2E_ONLY").unwrap_or_default();
    let wanted: Vec<&str> = only.split(',').collect();
    let scenarios: Vec<Scenario> = all.into_iter().filter(|s| wanted.iter().any(|w| s.name.contains(w))).collect();
    let failures = run_all(&mut appliance, &scenarios);
    eprintln!(
        "[qemu-test] {} scenarios, {} passed, {failures} failed, {:.0}s in all",
        scenarios.len(),
        scenarios.len() - failures,
        started.elapsed().as_secs_f64()
    );
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// OC_BENCH_RUNS: runs per VMM or path (default 5).
fn bench_runs() -> Result<u32, ExitCode> {
    match std::env::var("OC_BENCH_RUNS") {
        Err(_) => Ok(5),
        Ok(text) => match text.parse::<u32>() {
            Ok(n) if (1..=50).contains(&n) => Ok(n),
            _ => {
                eprintln!("[qemu-test] OC_BENCH_RUNS={text} is not a number in 1..=50");
                Err(ExitCode::from(2))
            }
        },
    }
}

fn bench_snapshot() -> ExitCode {
    let runs = match bench_runs() {
        Ok(runs) => runs,
        Err(code) => return code,
    };
    match qemu_test::bench::snapshot::snapshot(runs) {
        Ok(bench) => {
            println!("{}", bench.report());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("[qemu-test] the snapshot benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench_templates() -> ExitCode {
    let runs = match bench_runs() {
        Ok(runs) => runs,
        Err(code) => return code,
    };
    match qemu_test::bench::templates::templates(runs) {
        Ok(bench) => {
            println!("{}", bench.report());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("[qemu-test] the templates benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Builds (or finds in the cache) the template archives without booting anything.
fn template_fixture() -> ExitCode {
    match qemu_test::template_fixture::build() {
        Ok(fixture) => {
            println!("rootfs {}", fixture.rootfs_tar.display());
            for (what, archive) in [("oci", &fixture.oci), ("docker-save", &fixture.docker)]
                .into_iter()
                .chain(fixture.hostile.iter().map(|h| (h.what, &h.archive)))
            {
                println!("{:.1} MiB sha256:{} {} ({what})", archive.mib(), archive.sha256, archive.path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("[qemu-test] the template fixture failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench_vmm() -> ExitCode {
    let runs = match bench_runs() {
        Ok(runs) => runs,
        Err(code) => return code,
    };
    // OC_BENCH_DIAG=N: diagnostic boots (timelines, KVM counters, N rounds of each variant)
    // before the measured runs.
    let diag = match std::env::var("OC_BENCH_DIAG") {
        Err(_) => None,
        Ok(text) => match text.parse::<u32>() {
            Ok(n) if (1..=50).contains(&n) => Some(n),
            _ => {
                eprintln!("[qemu-test] OC_BENCH_DIAG={text} is not a number in 1..=50");
                return ExitCode::from(2);
            }
        },
    };
    match qemu_test::bench::vmm(runs, diag) {
        Ok((summary, _)) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("[qemu-test] the VMM benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}

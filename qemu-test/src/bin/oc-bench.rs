//! `oc-bench`: a supervised service that exists only in the bench image variant. When the kernel
//! command line says `oc.bench=vmm` it boots the sandbox guest with our VMM and with QEMU
//! `-M microvm`, alternating, and prints one `BENCH ...` line per boot on the console; otherwise
//! it idles. It must never be part of the product image.

use qemu_test::bench::report::{Vmm, PREFIX};
use qemu_test::bench::runner::Plan;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The appliance imports its templates here at start (appliance/src/vmm_runtime/templates.rs);
/// the `.id` file is written last, once the disk is complete.
const TEMPLATE: &str = "/data/templates/base.ext4";
const TEMPLATE_ID: &str = "/data/templates/base.id";
const WORK_DIR: &str = "/data/bench";
const VMM_BIN: &str = "/bin/vmm";
const TEMPLATE_WAIT: Duration = Duration::from_secs(600);
/// The appliance's defaults for a sandbox (appliance/src/api/projects.rs).
const DEFAULT_VCPUS: u32 = 1;
const DEFAULT_MEMORY_MIB: u32 = 512;
const DEFAULT_RUNS: u32 = 5;
const MAX_RUNS: u32 = 50;

fn report(line: &str) {
    print_line(&format!("{PREFIX}{line}"));
}

/// One write per line, so the supervisor never sees half a line.
fn print_line(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn main() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline_value(&cmdline, "oc.bench") == Some("vmm") {
        match plan(&cmdline).and_then(|plan| run(&plan)) {
            Ok(()) => report("done"),
            Err(e) => report(&format!("error {e}")),
        }
    }
    // Stay up: if this service exited, init would restart it (and run the benchmark again).
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The last `key=value` for `key` on the kernel command line.
fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_whitespace().filter_map(|w| w.split_once('=')).filter(|(k, _)| *k == key).map(|(_, v)| v).next_back()
}

fn number(cmdline: &str, key: &str, default: u32, max: u32) -> Result<u32, String> {
    match cmdline_value(cmdline, key) {
        None => Ok(default),
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(format!("{key}={text} is not a number in 1..={max}")),
        },
    }
}

fn plan(cmdline: &str) -> Result<Plan, String> {
    Ok(Plan {
        runs: number(cmdline, "oc.bench_runs", DEFAULT_RUNS, MAX_RUNS)?,
        vcpus: number(cmdline, "oc.bench_vcpus", DEFAULT_VCPUS, 8)?,
        memory_mib: number(cmdline, "oc.bench_memory_mib", DEFAULT_MEMORY_MIB, 2048)?,
        kernel: PathBuf::from(image::pipeline::GUEST_KERNEL_PATH),
        bzimage: PathBuf::from(image::pipeline::GUEST_BZIMAGE_PATH),
        template: PathBuf::from(TEMPLATE),
        work_dir: PathBuf::from(WORK_DIR),
        vmm_bin: PathBuf::from(VMM_BIN),
        qemu_bin: PathBuf::from(image::pipeline::COMPARISON_QEMU_PATH),
    })
}

fn run(plan: &Plan) -> Result<(), String> {
    wait_for(Path::new(TEMPLATE_ID), TEMPLATE_WAIT)?;
    for needed in
        [&plan.kernel, &plan.bzimage, &plan.template, &plan.vmm_bin, &plan.qemu_bin, &PathBuf::from("/dev/kvm")]
    {
        if !needed.exists() {
            return Err(format!("{} does not exist", needed.display()));
        }
    }
    let _ = std::fs::remove_dir_all(&plan.work_dir);
    std::fs::create_dir_all(&plan.work_dir).map_err(|e| format!("create {}: {e}", plan.work_dir.display()))?;
    report(&format!(
        "start runs={} vcpus={} memory_mib={} cmdline={}",
        plan.runs,
        plan.vcpus,
        plan.memory_mib,
        qemu_test::bench::runner::guest_cmdline()
    ));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline_value(&cmdline, "oc.bench_diag").is_some() {
        let rounds = number(&cmdline, "oc.bench_diag", 1, MAX_RUNS)?;
        qemu_test::bench::diag::run(plan, rounds, &|line| report(line));
    }
    // Alternating, so that a slow phase of the shared machine hits every VMM alike.
    for n in 1..=plan.runs {
        for vmm in [Vmm::Ours, Vmm::Qemu, Vmm::QemuPvh] {
            let run = plan.run_once(vmm, n)?;
            print_line(&run.line());
        }
    }
    let _ = std::fs::remove_dir_all(&plan.work_dir);
    Ok(())
}

fn wait_for(path: &Path, limit: Duration) -> Result<(), String> {
    let started = Instant::now();
    while !path.exists() {
        if started.elapsed() > limit {
            return Err(format!(
                "{} did not appear within {limit:?} (did the appliance import its templates?)",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

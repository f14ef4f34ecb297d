//! The measurement inside the appliance: boots the guest kernel on a reflink clone of the `base`
//! template with our `vmm` and with QEMU `-M microvm`, alternating, and times each boot from
//! spawning the VMM process until its serial console shows the output of the guest's first
//! command. Everything is timed with the appliance's clock, never the nested guest's.

use super::memory;
use super::report::{Run, Vmm};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// FICLONE = _IOW(0x94, 9, int): the clone shares the template's blocks (nothing is copied).
const FICLONE: libc::c_ulong = 0x4004_9409;
/// How often the console file is checked for the marker: the resolution of the measurement.
const POLL: Duration = Duration::from_millis(5);
/// A nested boot takes seconds; a guest that shows nothing in this time is reported as failed.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// RSS is sampled when the marker appears and then this often, this many times (guest idle).
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(250);
const RSS_SAMPLES: u32 = 5;

/// What the guest prints as its first command: the shell computes the number, so the text only
/// appears once a shell has run (it is not in the kernel command line, which a kernel may echo).
pub const MARKER: &str = "OC-FIRST-COMMAND-42";

/// The guest kernel command line, identical for both VMMs; each adds only its own device
/// declarations (`virtio_mmio.device=...`). No `--`: QEMU appends its declarations at the very
/// end, which would hand them to init instead of the kernel. Init arguments without `=` or `.`
/// are passed to init by the kernel as they are.
pub fn guest_cmdline() -> String {
    // The sandbox's own options (appliance/src/vmm_runtime/vm.rs) minus hostname and init.
    "console=ttyS0 reboot=k panic=-1 pci=off quiet root=/dev/vda rw \
     init=/bin/sh -c \"echo OC-FIRST-COMMAND-$((40+2)); exec /bin/sleep 3600\""
        .to_string()
}

/// Inputs of one benchmark.
pub struct Plan {
    pub runs: u32,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The ELF vmlinux: what the appliance boots sandboxes with (our VMM), and QEMU's PVH boot.
    pub kernel: PathBuf,
    /// The same kernel as a bzImage, QEMU's usual `-kernel` format.
    pub bzimage: PathBuf,
    /// The template disk every run gets a clone of.
    pub template: PathBuf,
    /// On the same (reflink-capable) filesystem as the template.
    pub work_dir: PathBuf,
    pub vmm_bin: PathBuf,
    pub qemu_bin: PathBuf,
}

impl Plan {
    fn command(&self, vmm: Vmm, disk: &Path, console: &Path) -> Command {
        let kernel = if vmm == Vmm::Qemu { &self.bzimage } else { &self.kernel };
        self.command_with(vmm, kernel, &guest_cmdline(), disk, console)
    }

    /// The command line that boots `kernel` with `vmm`, `cmdline` for the guest.
    pub fn command_with(&self, vmm: Vmm, kernel: &Path, cmdline: &str, disk: &Path, console: &Path) -> Command {
        let mut cmd;
        match vmm {
            Vmm::Ours => {
                cmd = Command::new(&self.vmm_bin);
                cmd.arg("run").arg("--kernel").arg(kernel);
                cmd.arg("--vcpus").arg(self.vcpus.to_string()).arg("--memory-mib").arg(self.memory_mib.to_string());
                cmd.arg("--disk").arg(disk).arg("--console-log").arg(console);
                cmd.arg("--cmdline").arg(cmdline);
            }
            Vmm::Qemu | Vmm::QemuPvh => {
                cmd = Command::new(&self.qemu_bin);
                // acpi=off: the guest kernel has no ACPI and finds devices on its command line,
                // which microvm then fills in (auto-kernel-cmdline).
                cmd.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host"]);
                cmd.args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
                cmd.arg("-smp").arg(self.vcpus.to_string()).arg("-m").arg(self.memory_mib.to_string());
                cmd.arg("-serial").arg(format!("file:{}", console.display()));
                cmd.arg("-kernel").arg(kernel).arg("-append").arg(cmdline);
                cmd.arg("-drive").arg(format!("id=root,file={},format=raw,if=none", disk.display()));
                cmd.args(["-device", "virtio-blk-device,drive=root"]);
            }
        }
        cmd
    }

    /// Boots once with `vmm`, measures, and removes the run's files unless it failed.
    pub fn run_once(&self, vmm: Vmm, n: u32) -> Result<Run, String> {
        let tag = format!("{}-{n}", vmm.name());
        let disk = self.work_dir.join(format!("{tag}.ext4"));
        let console = self.work_dir.join(format!("{tag}.console"));
        let stderr = self.work_dir.join(format!("{tag}.stderr"));
        let _ = std::fs::remove_file(&console);
        reflink(&self.template, &disk)?;
        let stderr_file = File::create(&stderr).map_err(|e| format!("create {}: {e}", stderr.display()))?;
        let mut cmd = self.command(vmm, &disk, &console);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr_file);

        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| format!("start {}: {e}", vmm.name()))?;
        let measured = wait_for_marker(&mut child, &console, started)
            .and_then(|first_command| Ok((first_command, worst_memory_sample(child.id(), self.memory_mib)?)));
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&disk);
        let (first_command, sample) = measured
            .map_err(|e| format!("{tag}: {e}; console: {}; stderr: {}", tail(&console, 5), tail(&stderr, 5)))?;
        let _ = std::fs::remove_file(&console);
        let _ = std::fs::remove_file(&stderr);
        Ok(Run {
            vmm,
            n,
            first_command_ms: u64::try_from(first_command.as_millis()).unwrap_or(u64::MAX),
            vmrss_kib: sample.vmrss_kib,
            rss_kib: sample.rss_kib,
            guest_rss_kib: sample.guest_rss_kib,
        })
    }
}

/// Polls the console file until it contains the marker; returns the time since `started`.
pub fn wait_for_marker(child: &mut Child, console: &Path, started: Instant) -> Result<Duration, String> {
    loop {
        // Read whole each time: with `quiet` the guest prints nothing before the marker.
        if let Ok(text) = std::fs::read(console) {
            if text.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()) {
                return Ok(started.elapsed());
            }
        }
        match child.try_wait() {
            Ok(Some(status)) => return Err(format!("the VMM ended ({status}) before the guest's first command")),
            Ok(None) => {}
            Err(e) => return Err(format!("wait for the VMM: {e}")),
        }
        if started.elapsed() > BOOT_LIMIT {
            return Err(format!("no first command within {BOOT_LIMIT:?}"));
        }
        std::thread::sleep(POLL);
    }
}

/// Samples the idle VMM a few times and keeps the sample with the largest overhead.
fn worst_memory_sample(pid: u32, memory_mib: u32) -> Result<memory::Sample, String> {
    let guest_kib = u64::from(memory_mib) * 1024;
    let mut worst = memory::sample(pid, guest_kib)?;
    for _ in 1..RSS_SAMPLES {
        std::thread::sleep(RSS_SAMPLE_EVERY);
        let next = memory::sample(pid, guest_kib)?;
        if next.overhead_kib() > worst.overhead_kib() {
            worst = next;
        }
    }
    Ok(worst)
}

/// Makes `to` a copy-on-write clone of `from`.
pub fn reflink(from: &Path, to: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(to);
    let src = File::open(from).map_err(|e| format!("open {}: {e}", from.display()))?;
    let dst = File::create(to).map_err(|e| format!("create {}: {e}", to.display()))?;
    // SAFETY: FICLONE takes the source descriptor as its integer argument; both descriptors are
    // open for the duration of the call and no memory is passed.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(to);
        return Err(format!("reflink {} to {}: {e}", from.display(), to.display()));
    }
    Ok(())
}

/// The last `lines` lines of a file, joined with " | ", for error messages on one console line.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_hands_init_a_shell_command_without_spelling_the_marker() {
        let line = guest_cmdline();
        assert!(!line.contains(MARKER), "the kernel could echo the marker itself: {line}");
        assert!(!line.contains(" -- "), "QEMU would append its devices after init's arguments: {line}");
        // Everything after init= goes to init: no '=' or '.' that the kernel would take for itself.
        let init_args = line.split_once("init=/bin/sh").map_or("", |(_, rest)| rest);
        assert!(init_args.contains("-c \"echo OC-FIRST-COMMAND-$((40+2));"), "{init_args}");
        assert!(!init_args.contains('=') && !init_args.contains('.'), "{init_args}");
    }

    #[test]
    fn both_vmms_get_the_same_kernel_disk_size_and_command_line() {
        let plan = Plan {
            runs: 1,
            vcpus: 1,
            memory_mib: 512,
            kernel: PathBuf::from("/k/vmlinux"),
            bzimage: PathBuf::from("/k/bzImage"),
            template: PathBuf::from("/t/base.ext4"),
            work_dir: PathBuf::from("/w"),
            vmm_bin: PathBuf::from("/bin/vmm"),
            qemu_bin: PathBuf::from("/usr/bin/qemu-system-x86_64"),
        };
        for (vmm, kernel) in [(Vmm::Ours, "/k/vmlinux"), (Vmm::Qemu, "/k/bzImage"), (Vmm::QemuPvh, "/k/vmlinux")] {
            let cmd = plan.command(vmm, Path::new("/w/d.ext4"), Path::new("/w/c.log"));
            let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
            let joined = args.join(" ");
            assert!(args.contains(&guest_cmdline()), "{vmm:?}: {joined}");
            assert!(args.iter().any(|a| a == kernel), "{vmm:?}: {joined}");
            assert!(joined.contains("/w/d.ext4") && joined.contains("/w/c.log"), "{vmm:?}: {joined}");
            assert!(joined.contains("512") && joined.contains(" 1 "), "{vmm:?}: {joined}");
        }
    }

    #[test]
    fn a_marker_in_the_console_file_is_found_and_an_early_exit_is_reported() {
        let dir = std::env::temp_dir().join(format!("oc-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let console = dir.join("console");
        let script = format!("sleep 0.2; echo boot > {0}; sleep 0.3; echo {MARKER} >> {0}; sleep 5", console.display());
        let mut child = Command::new("sh").arg("-c").arg(&script).spawn().expect("sh");
        let took = wait_for_marker(&mut child, &console, Instant::now()).expect("marker seen");
        // The first line is not the marker: only the second one ends the wait.
        assert!(took >= Duration::from_millis(450) && took < Duration::from_secs(4), "{took:?}");
        let _ = child.kill();
        let _ = child.wait();

        let quiet = dir.join("quiet");
        let mut child = Command::new("sh").arg("-c").arg("exit 3").spawn().expect("sh");
        let e = wait_for_marker(&mut child, &quiet, Instant::now()).expect_err("ended without marker");
        assert!(e.contains("ended"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

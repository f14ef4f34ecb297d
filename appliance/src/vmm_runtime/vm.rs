//! One VMM process per sandbox: its directory on the data disk, its config, spawning it, noticing
//! when it ends (and why), killing it, and adopting VMMs that outlived an appliance restart.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_contract::{Control, DiskConfig, Event, ExitStatus, VmConfig};

use super::snapshot_dir;
use crate::runtime::Snapshot;

/// Files in a sandbox's directory.
pub const ROOT_DISK: &str = "root.ext4";
const CONFIG: &str = "vm.json";
const PID_FILE: &str = "vmm.pid";
pub const CONSOLE_LOG: &str = "console.log";
const VMM_LOG: &str = "vmm.log";
const EVENTS: &str = "vmm.events";
pub const MEMORY_DUMP: &str = "memory.dump";
/// Adopted VMMs are not our children; their end is noticed by polling.
const ADOPTED_POLL: Duration = Duration::from_millis(500);

/// Where the sandbox PID 1 is in the sandbox initramfs (image/src/sandbox_initrd.rs).
pub const GUEST_INIT: &str = "/oc-init";

/// What the guest kernel is told. `quiet` keeps console exits (each byte is a VM exit) rare.
/// `rdinit=` runs our init from the initramfs, never one from the root disk; it mounts the disk
/// the VMM names with `root=` (the first one, `/dev/vda`) and switches to it.
pub fn guest_cmdline(sandbox_id: &str) -> String {
    format!(
        "console=ttyS0 reboot=k panic=-1 pci=off quiet oc.hostname={} rdinit={GUEST_INIT} -- sandbox",
        guest_hostname(sandbox_id)
    )
}

/// A sandbox's hostname: `sandbox-` and the first 8 characters of its id.
pub fn guest_hostname(sandbox_id: &str) -> String {
    format!("sandbox-{}", sandbox_id.get(..8).unwrap_or(sandbox_id))
}

pub struct VmSpec<'a> {
    pub sandbox_id: &'a str,
    pub dir: &'a Path,
    pub vmm_bin: &'a Path,
    pub kernel: &'a Path,
    /// The sandbox initramfs (our init and agent).
    pub initrd: &'a Path,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub cid: u32,
    /// A snapshot directory to resume (`snapshot_dir`) instead of booting the kernel.
    pub restore_from: Option<&'a Path>,
}

/// A running (or ended) VMM.
pub struct Vm {
    pub pid: i32,
    pub cid: u32,
    pub dir: PathBuf,
    /// Found running after an appliance restart: not our child, so its exit status is unknown.
    adopted: bool,
    /// None while running; Some(exit code or None when killed by a signal / unknown) once ended.
    #[allow(clippy::option_option)] // the two Nones mean different things, as said above
    ended: Mutex<Option<Option<i32>>>,
    ended_signal: Condvar,
}

impl Vm {
    pub fn has_ended(&self) -> bool {
        self.ended.lock().map_or(true, |e| e.is_some())
    }

    /// Waits up to `limit` for the process to be gone.
    pub fn wait_ended(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let Ok(mut ended) = self.ended.lock() else { return true };
        while ended.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            ended = match self.ended_signal.wait_timeout(ended, left) {
                Ok((guard, _)) => guard,
                Err(_) => return true,
            };
        }
        true
    }

    /// How the VMM ended, once it has: (clean, description).
    pub fn exit(&self) -> Option<(bool, String)> {
        let status = (*self.ended.lock().ok()?)?;
        let clean =
            status.and_then(vmm_contract::ExitStatus::from_code).is_some_and(vmm_contract::ExitStatus::is_clean);
        Some((clean, vmm_contract::exit::describe(status).to_string()))
    }

    pub fn kill(&self) {
        if !self.has_ended() {
            // SAFETY: kill(2) on a pid we started (or adopted after checking its command line);
            // no memory is involved.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }

    /// Has the VMM write guest RAM to its memory dump file and waits for the event saying it is
    /// done; returns the dump's size.
    pub fn dump_memory(&self, limit: Duration) -> Result<u64, String> {
        self.ask(Control::DumpMemory, "the dump", limit, |event| match event {
            Event::MemoryDumped { bytes } => Some(Ok(bytes)),
            Event::MemoryDumpFailed { error } => Some(Err(format!("memory dump failed: {error}"))),
            _ => None,
        })
    }

    /// Has the VMM write its snapshot (`snapshot_dir::NEXT`) and exit, and waits for both; the
    /// caller makes the snapshot durable and keeps it. On an error the guest runs on, unless the
    /// VMM ended (then it is gone, as its exit says).
    pub fn hibernate(&self, limit: Duration) -> Result<Snapshot, String> {
        let deadline = Instant::now() + limit;
        let snapshot = self.ask(Control::Hibernate, "the snapshot", limit, snapshot_answer)?;
        if !self.wait_ended(deadline.saturating_duration_since(Instant::now())) {
            // A paused guest whose VMM does not do what it said is of no use to anyone.
            self.kill();
            return Err("the VMM wrote its snapshot but did not exit; it was killed".into());
        }
        let status = self.ended.lock().map_err(|_| "VMM state poisoned".to_string())?.flatten();
        let hibernated = i32::from(ExitStatus::Hibernated.code());
        match status {
            Some(code) if code == hibernated => Ok(snapshot),
            // An adopted VMM's exit status cannot be known; the event and its end say enough.
            None if self.adopted => Ok(snapshot),
            other => Err(format!(
                "the VMM wrote its snapshot, then ended otherwise: {}",
                vmm_contract::exit::describe(other)
            )),
        }
    }

    /// Has the VMM write a checkpoint (`snapshot_dir::NEXT`, the root disk's copy included) while
    /// the guest stands still, and waits for the event saying it is done; the guest runs on.
    pub fn checkpoint(&self, limit: Duration) -> Result<Snapshot, String> {
        self.ask(Control::Checkpoint, "the checkpoint", limit, snapshot_answer)
    }

    /// Sends `request` and waits up to `limit` for the first new event `answer` takes (`what` names
    /// the work in errors).
    fn ask<T>(
        &self,
        request: Control,
        what: &str,
        limit: Duration,
        answer: impl Fn(Event) -> Option<Result<T, String>>,
    ) -> Result<T, String> {
        let events = self.dir.join(EVENTS);
        let seen = fs::metadata(&events).map_or(0, |m| m.len());
        // SAFETY: as in kill(); the signal is one of the VMM's documented requests.
        if self.has_ended() || unsafe { libc::kill(self.pid, request.signal()) } != 0 {
            return Err("the VMM is not running".into());
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            // Looked at before the events, so an event written just before the end is still read.
            let ended = self.has_ended();
            let text = fs::read(&events).unwrap_or_default();
            let new = String::from_utf8_lossy(text.get(seen as usize..).unwrap_or_default()).into_owned();
            if let Some(result) = Event::parse_lines(&new).into_iter().find_map(&answer) {
                return result;
            }
            if ended {
                return Err(format!("the VMM ended before it finished {what}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("the VMM did not finish {what} within {}s", limit.as_secs()))
    }

    fn mark_ended(&self, status: Option<i32>) {
        if let Ok(mut ended) = self.ended.lock() {
            *ended = Some(status);
        }
        self.ended_signal.notify_all();
    }

    /// The last lines of the guest console, to explain a failed boot.
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.dir.join(CONSOLE_LOG), lines) + &tail(&self.dir.join(VMM_LOG), lines)
    }
}

/// Resident memory of process `pid` (0 once it is gone), from /proc/<pid>/statm.
pub fn resident_bytes(pid: i32) -> u64 {
    let Ok(statm) = fs::read_to_string(format!("/proc/{pid}/statm")) else { return 0 };
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf reads a constant of the running kernel; no memory is involved.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// The VMM's answer to a snapshot request, among its events.
fn snapshot_answer(event: Event) -> Option<Result<Snapshot, String>> {
    match event {
        Event::SnapshotWritten { state_bytes, memory_bytes, paused_ms } => {
            Some(Ok(Snapshot { state_bytes, memory_bytes, paused_ms }))
        }
        Event::SnapshotFailed { error } => Some(Err(format!("the snapshot could not be written: {error}"))),
        _ => None,
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].iter().map(|l| format!("{l}\n")).collect()
}

/// Writes the config and starts the VMM; `on_exit` runs once (on a waiter thread) when it ends.
pub fn spawn(spec: &VmSpec, on_exit: impl FnOnce(Option<i32>) + Send + 'static) -> Result<Arc<Vm>, String> {
    let vcpus = u8::try_from(spec.vcpus).map_err(|_| format!("{} vCPUs is more than a VMM runs", spec.vcpus))?;
    let config = VmConfig {
        initrd: Some(spec.initrd.to_path_buf()),
        cmdline: Some(guest_cmdline(spec.sandbox_id)),
        vcpus,
        memory_mib: spec.memory_mib,
        console_log: Some(spec.dir.join(CONSOLE_LOG)),
        disks: vec![DiskConfig { path: spec.dir.join(ROOT_DISK), read_only: false }],
        vsock_cid: Some(u64::from(spec.cid)),
        memory_dump: Some(spec.dir.join(MEMORY_DUMP)),
        events: Some(spec.dir.join(EVENTS)),
        snapshot_to: Some(snapshot_dir::target(spec.dir)),
        restore_from: spec.restore_from.map(snapshot_dir::source),
        ..VmConfig::new(spec.kernel)
    };
    // The VMM creates its snapshot files in here when it starts; nothing else is in it.
    snapshot_dir::prepare_next(spec.dir).map_err(|e| format!("cannot prepare the snapshot directory: {e}"))?;
    let config_path = spec.dir.join(CONFIG);
    fs::write(&config_path, config.to_json()).map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    let log = File::create(spec.dir.join(VMM_LOG)).map_err(|e| format!("cannot create the VMM log: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("cannot share the VMM log: {e}"))?;
    let mut child: Child = Command::new(spec.vmm_bin)
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", spec.vmm_bin.display()))?;
    let pid = child.id() as i32;
    if let Err(e) = fs::write(spec.dir.join(PID_FILE), pid.to_string()) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("cannot record the VMM pid: {e}"));
    }
    let vm = Arc::new(Vm {
        pid,
        cid: spec.cid,
        dir: spec.dir.to_path_buf(),
        adopted: false,
        ended: Mutex::new(None),
        ended_signal: Condvar::new(),
    });
    let watched = Arc::clone(&vm);
    let waiter = std::thread::Builder::new().name(format!("vmm-{pid}")).spawn(move || {
        let status = child.wait().ok().and_then(|s| s.code());
        watched.mark_ended(status);
        on_exit(status);
    });
    if let Err(e) = waiter {
        vm.kill();
        return Err(format!("cannot start the VMM waiter thread: {e}"));
    }
    Ok(vm)
}

/// The vsock CID in the configuration the sandbox in `dir` last ran with (kept while it is
/// hibernated, so it wakes with the same one).
pub fn configured_cid(dir: &Path) -> Option<u32> {
    let config = VmConfig::from_json(&fs::read_to_string(dir.join(CONFIG)).ok()?).ok()?;
    u32::try_from(config.vsock_cid?).ok()
}

/// Re-attaches to the VMM of the sandbox in `dir` if it is still running (the appliance
/// restarted while sandboxes were up). `on_exit` runs when it ends.
pub fn adopt(dir: &Path, on_exit: impl FnOnce(Option<i32>) + Send + 'static) -> Option<Arc<Vm>> {
    let pid: i32 = fs::read_to_string(dir.join(PID_FILE)).ok()?.trim().parse().ok()?;
    let config = VmConfig::from_json(&fs::read_to_string(dir.join(CONFIG)).ok()?).ok()?;
    let cid = u32::try_from(config.vsock_cid?).ok()?;
    let config_path = dir.join(CONFIG);
    if !runs_config(pid, &config_path) {
        return None;
    }
    let vm = Arc::new(Vm {
        pid,
        cid,
        dir: dir.to_path_buf(),
        adopted: true,
        ended: Mutex::new(None),
        ended_signal: Condvar::new(),
    });
    let watched = Arc::clone(&vm);
    std::thread::Builder::new()
        .name(format!("vmm-{pid}"))
        .spawn(move || {
            while runs_config(pid, &config_path) {
                std::thread::sleep(ADOPTED_POLL);
            }
            watched.mark_ended(None);
            on_exit(None);
        })
        .ok()?;
    Some(vm)
}

/// Whether process `pid` is a VMM started with `config` (pids are reused; the command line is not).
fn runs_config(pid: i32, config: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let wanted = config.as_os_str().as_encoded_bytes();
    // A zombie has an empty command line: it has ended.
    cmdline.split(|&b| b == 0).any(|arg| arg == wanted)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A stand-in VMM (bash) that answers the hibernate request (SIGPWR) as a real one would:
    /// writes its snapshot files, appends `answer` to its events file (beside its config, where the
    /// real one is told to write them), then exits with `exit` (or idles on without one).
    pub fn fake_vmm(dir: &Path, answer: Option<&Event>, exit: Option<i32>) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        if let Some(event) = answer {
            fs::write(dir.join("answer"), event.to_line()).expect("answer");
        }
        let on_pwr = [
            r#"printf s > "$d/snapshot.next/state"; printf mm > "$d/snapshot.next/memory""#.to_string(),
            answer.map_or(String::new(), |_| r#"cat "$d/answer" >> "$d/vmm.events""#.to_string()),
            exit.map_or(String::new(), |code| format!("exit {code}")),
        ]
        .join("\n");
        let text = format!(
            "#!/bin/bash\nd=$(dirname \"$3\")\non_pwr() {{\n{on_pwr}\n:\n}}\ntrap on_pwr PWR\nwhile :; do sleep 0.05; done\n"
        );
        let script = dir.join("fake-vmm.sh");
        fs::write(&script, text).expect("script");
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
        script
    }

    pub const WRITTEN: Event = Event::SnapshotWritten { state_bytes: 1, memory_bytes: 2, paused_ms: 3 };

    fn spawn_fake(tag: &str, answer: Option<&Event>, exit: Option<i32>) -> (Arc<Vm>, PathBuf) {
        let dir = std::env::temp_dir().join(format!("appliance-vm-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        let vmm = fake_vmm(&dir, answer, exit);
        let spec = VmSpec {
            sandbox_id: "s1",
            dir: &dir,
            vmm_bin: &vmm,
            kernel: Path::new("/k"),
            initrd: Path::new("/i"),
            vcpus: 1,
            memory_mib: 128,
            cid: 9,
            restore_from: None,
        };
        let vm = spawn(&spec, |_| {}).expect("spawn");
        // Let bash set its trap before it is signalled.
        std::thread::sleep(Duration::from_millis(200));
        (vm, dir)
    }

    #[test]
    fn hibernation_waits_for_the_snapshot_event_and_the_hibernated_exit() {
        let (vm, dir) = spawn_fake("hibernates", Some(&WRITTEN), Some(5));
        let snapshot = vm.hibernate(Duration::from_secs(10)).expect("hibernated");
        assert_eq!(snapshot, Snapshot { state_bytes: 1, memory_bytes: 2, paused_ms: 3 });
        assert!(vm.has_ended());
        assert_eq!(fs::read(dir.join(snapshot_dir::NEXT).join(snapshot_dir::MEMORY)).expect("memory"), b"mm");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_snapshot_leaves_the_vmm_running_and_a_vmm_that_dies_is_no_snapshot() {
        let failed = Event::SnapshotFailed { error: "disk full".into() };
        let (vm, dir) = spawn_fake("snapshot-fails", Some(&failed), None);
        let err = vm.hibernate(Duration::from_secs(10)).expect_err("failed");
        assert!(err.contains("disk full"), "{err}");
        assert!(!vm.has_ended(), "the guest runs on");
        vm.kill();
        assert!(vm.wait_ended(Duration::from_secs(5)));
        let _ = fs::remove_dir_all(&dir);

        // Reports nothing and exits as a crash would.
        let (vm, dir) = spawn_fake("snapshot-crash", None, Some(1));
        let err = vm.hibernate(Duration::from_secs(10)).expect_err("no snapshot");
        assert!(err.contains("ended before it finished the snapshot"), "{err}");
        let _ = fs::remove_dir_all(&dir);

        // Reports the snapshot, then exits otherwise than a hibernated VMM: not kept.
        let (vm, dir) = spawn_fake("snapshot-wrong-exit", Some(&WRITTEN), Some(1));
        let err = vm.hibernate(Duration::from_secs(10)).expect_err("wrong exit");
        assert!(err.contains("then ended otherwise: VMM error"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_guest_command_line_hands_over_to_the_sandbox_init() {
        let line = guest_cmdline("0123456789abcdef");
        // Our init from the initramfs, never one from the root disk.
        assert!(line.contains(" rdinit=/oc-init -- sandbox"), "{line}");
        assert!(!line.contains(" init=") && !line.contains("root="), "the VMM appends root=: {line}");
        assert!(line.contains("oc.hostname=sandbox-01234567"), "{line}");
        assert!(line.contains("reboot=k"), "{line}");
    }

    #[test]
    fn spawn_tracks_the_process_and_reports_its_status() {
        let dir = std::env::temp_dir().join(format!("appliance-vm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        // A stand-in VMM that fails at once, like a VMM refusing to start.
        let fake = PathBuf::from("/bin/false");
        let (tx, rx) = std::sync::mpsc::channel();
        let spec = VmSpec {
            sandbox_id: "s1",
            dir: &dir,
            vmm_bin: &fake,
            kernel: Path::new("/k"),
            initrd: Path::new("/i"),
            vcpus: 1,
            memory_mib: 128,
            cid: 9,
            restore_from: None,
        };
        let vm = spawn(&spec, move |status| tx.send(status).expect("send")).expect("spawn");
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).expect("exit"), Some(1));
        assert!(vm.wait_ended(Duration::from_secs(1)));
        let config = VmConfig::from_json(&fs::read_to_string(dir.join(CONFIG)).expect("cfg")).expect("json");
        assert_eq!(config.vsock_cid, Some(9));
        assert_eq!((config.kernel.as_path(), config.initrd.as_deref()), (Path::new("/k"), Some(Path::new("/i"))));
        assert!(config.cmdline.as_deref().is_some_and(|c| c.ends_with(" rdinit=/oc-init -- sandbox")), "{config:?}");
        assert!(!config.disks[0].read_only);
        assert_eq!(config.events, Some(dir.join(EVENTS)));
        // Every VMM can be hibernated: its snapshot goes to a directory of its own.
        let target = config.snapshot_to.expect("snapshot target");
        assert_eq!(target.state, dir.join(snapshot_dir::NEXT).join(snapshot_dir::STATE));
        assert!(dir.join(snapshot_dir::NEXT).is_dir());
        assert_eq!(config.restore_from, None);
        assert_eq!(configured_cid(&dir), Some(9));
        // Its pid no longer runs that config: nothing to adopt.
        assert!(adopt(&dir, |_| {}).is_none());
        let _ = fs::remove_dir_all(&dir);
    }
}

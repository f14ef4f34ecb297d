//! PID 1 inside a sandbox microVM: switches from the initramfs it is started from to the root
//! disk (switch_root), prepares the guest (root read-write, kernel filesystems, hostname,
//! loopback), runs the agent as a child process and restarts it if it dies, reaps every orphan,
//! and on request stops everything, syncs and powers off or reboots.
//!
//! The agent is a separate process so that PID 1's `waitpid(-1)` reaping never steals the exit
//! status of a command the agent is waiting for. Requests: SIGTERM, SIGUSR2 or SIGPWR power
//! off; SIGINT or SIGUSR1 reboot (the agent's power operation sends these).

use super::{grow_root, loopback, switch_root};
use crate::log;
use crate::sys::mount::{self, Mount};
use crate::sys::power::{self, PowerAction};
use crate::sys::process::{self, SignalFd};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const HOSTNAME_DEFAULT: &str = "sandbox";
/// Time processes get between SIGTERM and SIGKILL at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// An agent that dies sooner than this after starting is restarted after a pause, not at once.
const AGENT_MIN_UPTIME: Duration = Duration::from_secs(5);

const HANDLED_SIGNALS: [libc::c_int; 6] =
    [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGPWR];

pub fn run() -> ! {
    let root = match switch_root::from_initramfs() {
        Ok(root) => root,
        Err(e) => no_root(&e),
    };
    early_mounts();
    let on = root.map(|device| format!(" on {device} (from the initramfs)")).unwrap_or_default();
    log!("OpenComputer sandbox init {}{on} starting", env!("CARGO_PKG_VERSION"));
    let signals = match SignalFd::new(&HANDLED_SIGNALS) {
        Ok(fd) => fd,
        // Without a signal channel no shutdown request could be honoured: reboot (panic policy).
        Err(e) => panic!("cannot create the signal channel: {e}"),
    };
    let cmdline = crate::sys::fs::kernel_cmdline();
    let hostname = crate::sys::fs::cmdline_value(&cmdline, "oc.hostname").unwrap_or(HOSTNAME_DEFAULT);
    if let Err(e) = crate::sys::hostname::set(hostname) {
        log!("hostname {hostname:?}: {e}");
    }
    if let Err(e) = loopback::bring_up() {
        log!("loopback: {e}; the egress proxy will be unreachable");
    }
    let mut agent = AgentProcess { pid: None, started: Instant::now(), restart_at: None };
    agent.start();
    let action = event_loop(&signals, &mut agent);
    shutdown(&signals, action)
}

/// Without its root disk the sandbox has nothing to run: says why and powers off (which ends the
/// VMM), never panics (an exiting or panicking PID 1 would panic the kernel).
fn no_root(e: &std::io::Error) -> ! {
    log!("cannot switch to the root disk: {e}; powering off");
    crate::sys::fs::sync_all();
    let err = power::execute(PowerAction::PowerOff);
    log!("power off failed: {err}");
    power::halt_forever()
}

fn early_mounts() {
    // Switched from the initramfs, the root is read-write already; a kernel that mounted the
    // disk itself may have mounted it read-only. The disk is this sandbox's own clone.
    if let Err(e) = remount_root_rw() {
        log!("{e}; the root filesystem stays read-only");
    }
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let mounts = [
        Mount { source: "proc", target: "/proc", fstype: "proc", flags: nosuid_nodev | libc::MS_NOEXEC, data: "" },
        Mount { source: "sysfs", target: "/sys", fstype: "sysfs", flags: nosuid_nodev | libc::MS_NOEXEC, data: "" },
        Mount { source: "devtmpfs", target: "/dev", fstype: "devtmpfs", flags: libc::MS_NOSUID, data: "mode=0755" },
        Mount {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: libc::MS_NOSUID | libc::MS_NOEXEC,
            data: "gid=5,mode=0620,ptmxmode=0666",
        },
        Mount { source: "tmpfs", target: "/dev/shm", fstype: "tmpfs", flags: nosuid_nodev, data: "mode=1777" },
        Mount { source: "tmpfs", target: "/run", fstype: "tmpfs", flags: nosuid_nodev, data: "mode=0755" },
        Mount { source: "tmpfs", target: "/tmp", fstype: "tmpfs", flags: nosuid_nodev, data: "mode=1777" },
        Mount {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: nosuid_nodev | libc::MS_NOEXEC,
            data: "",
        },
    ];
    for m in &mounts {
        if let Err(e) = mount::mount(m) {
            log!("{e}");
        }
    }
    // A create with `diskMB` gives the sandbox a disk larger than its template's filesystem.
    match grow_root::grow() {
        Ok(g) if g.after > g.before => log!("root filesystem grown from {} to {} MiB", g.before >> 20, g.after >> 20),
        Ok(_) => {}
        Err(e) => log!("cannot grow the root filesystem: {e}"),
    }
    // What udev would create: bash process substitution and many scripts use these.
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(target, link) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => log!("symlink {link}: {e}"),
            _ => {}
        }
    }
}

fn remount_root_rw() -> std::io::Result<()> {
    let root = crate::sys::cstr("/")?;
    // SAFETY: `root` is a live CString; null source, fstype and data are allowed for MS_REMOUNT.
    let ret =
        unsafe { libc::mount(std::ptr::null(), root.as_ptr(), std::ptr::null(), libc::MS_REMOUNT, std::ptr::null()) };
    crate::sys::check(ret, || "remount / read-write".into()).map(|_| ())
}

/// The agent child process and its restart schedule.
struct AgentProcess {
    pid: Option<libc::pid_t>,
    started: Instant,
    restart_at: Option<Instant>,
}

impl AgentProcess {
    fn start(&mut self) {
        self.restart_at = None;
        self.started = Instant::now();
        // A fresh image of this same binary, so the agent starts with one thread. It clears
        // the signal mask it inherits from here first thing.
        match std::process::Command::new("/proc/self/exe").args(["sandbox", "agent"]).spawn() {
            // The child is reaped by `reap_all` below, not through this handle.
            Ok(child) => self.pid = Some(child.id() as libc::pid_t),
            Err(e) => {
                log!("cannot start the agent: {e}; retrying");
                self.restart_at = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }

    fn exited(&mut self) {
        self.pid = None;
        let pause =
            if self.started.elapsed() < AGENT_MIN_UPTIME { Duration::from_secs(2) } else { Duration::from_millis(100) };
        self.restart_at = Some(Instant::now() + pause);
    }

    /// Milliseconds until a pending restart is due (-1: none pending), for poll(2).
    fn poll_timeout_ms(&self) -> i32 {
        match self.restart_at {
            None => -1,
            Some(at) => at.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32,
        }
    }
}

fn event_loop(signals: &SignalFd, agent: &mut AgentProcess) -> PowerAction {
    loop {
        if let Err(e) = process::poll_readable(&[signals.as_raw_fd()], agent.poll_timeout_ms()) {
            log!("poll: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
        while let Some(signal) = signals.next() {
            match signal {
                libc::SIGCHLD => {
                    for (pid, status) in process::reap_all() {
                        if agent.pid == Some(pid) {
                            log!("agent exited ({status}); restarting it");
                            agent.exited();
                        }
                    }
                }
                libc::SIGTERM | libc::SIGUSR2 | libc::SIGPWR => return PowerAction::PowerOff,
                libc::SIGINT | libc::SIGUSR1 => return PowerAction::Reboot,
                _ => {}
            }
        }
        if agent.restart_at.is_some_and(|at| Instant::now() >= at) {
            agent.start();
        }
    }
}

fn shutdown(signals: &SignalFd, action: PowerAction) -> ! {
    log!("{}: stopping all processes", action.name());
    process::kill_everything(libc::SIGTERM);
    wait_for_processes(signals, SHUTDOWN_GRACE);
    process::kill_everything(libc::SIGKILL);
    wait_for_processes(signals, Duration::from_secs(1));
    crate::sys::fs::sync_all();
    if let Err(e) = mount::remount_readonly("/") {
        log!("{e}");
    }
    crate::sys::fs::sync_all();
    log!("{}", action.name());
    let err = power::execute(action);
    log!("{} failed: {err}", action.name());
    power::halt_forever()
}

/// Reaps until no process but PID 1 is left or `limit` passes.
fn wait_for_processes(signals: &SignalFd, limit: Duration) {
    let until = Instant::now() + limit;
    loop {
        while signals.next().is_some() {}
        process::reap_all();
        if !process::user_processes_remain() || Instant::now() >= until {
            return;
        }
        let _ = process::poll_readable(&[signals.as_raw_fd()], 50);
    }
}

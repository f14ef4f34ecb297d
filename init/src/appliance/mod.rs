//! The appliance role of PID 1: bring the machine up, supervise the services, and take it down
//! cleanly on request.
//!
//! Shutdown requests: SIGTERM, SIGUSR2, SIGPWR or the ACPI power button power off; SIGINT
//! (Ctrl-Alt-Del) and SIGUSR1 reboot. A service asks for either by signalling PID 1.

mod bootdisk;
mod config;
mod datadisk;
mod modules;
mod operator;
mod powerbutton;
mod services;
mod slot;
pub mod systemdisk;

use crate::log;
use crate::sys::mount::{self, Mount};
use crate::sys::net;
use crate::sys::power::{self, PowerAction};
use crate::sys::process::{self, SignalFd};
use std::time::{Duration, Instant};

/// Time a service gets between SIGTERM and SIGKILL at shutdown.
const SERVICE_GRACE: Duration = Duration::from_secs(10);
/// Time the remaining processes get between SIGTERM and SIGKILL.
const STRAGGLER_GRACE: Duration = Duration::from_secs(3);
/// How long processes killed at shutdown may take to be gone before /data is unmounted anyway.
const KILLED_GRACE: Duration = Duration::from_secs(10);
const HOSTNAME_DEFAULT: &str = "opencomputer";

pub fn run() -> ! {
    early_mounts();
    log!("OpenComputer appliance init {} starting", env!("CARGO_PKG_VERSION"));
    if let Err(e) = power::route_ctrl_alt_del_to_init() {
        log!("{e}; Ctrl-Alt-Del will hard-reset");
    }
    let signals = match SignalFd::new(&HANDLED_SIGNALS) {
        Ok(fd) => fd,
        Err(e) => {
            // Without a signal channel we cannot shut down cleanly on request: a reboot is
            // better than an appliance that ignores its power button.
            panic!("cannot create the signal channel: {e}")
        }
    };
    let cmdline = crate::sys::fs::kernel_cmdline();

    modules::load_all();
    let from_disk = crate::sys::fs::cmdline_value(&cmdline, "oc.boot") == Some("disk");
    let data_partition = if from_disk { prepare_data_partition() } else { None };
    let operator = operator::load(&cmdline, from_disk);
    operator::hand_over(&operator);
    // The configuration file's settings with the kernel command line's on top, in the
    // command-line form the network and data-disk code read.
    let settings = operator.config.as_cmdline();
    let hostname = operator.config.get("hostname").unwrap_or(HOSTNAME_DEFAULT);
    set_hostname(hostname);
    let origin = operator.config.where_set("hostname", boot_disk::layout::CONFIG_FILE);
    log!("hostname {hostname} ({})", if origin.is_empty() { "default" } else { origin.trim_end_matches(": ") });
    bring_up_network(&settings, &operator.config);
    match datadisk::mount_data(&settings, data_partition.as_deref()) {
        Ok(device) => log!("data disk {device} mounted at {}", datadisk::MOUNT_POINT),
        Err(e) => {
            log!("DATA DISK PROBLEM: {e}");
            // The appliance serves 503 with this reason instead of storing into RAM.
            let written = std::fs::create_dir_all(init_handoff::RUN_DIR)
                .and_then(|()| std::fs::write(init_handoff::DATA_PROBLEM_FILE, &e));
            if let Err(w) = written {
                log!("cannot write {}: {w}", init_handoff::DATA_PROBLEM_FILE);
            }
        }
    }
    let slot = if from_disk { boot_disk::entry::Slot::from_cmdline(&cmdline) } else { None };
    match systemdisk::mount_system(slot) {
        Ok(device) => log!("system disk {device} mounted read-only at {}", systemdisk::MOUNT_POINT),
        Err(e) => log!("SYSTEM DISK PROBLEM: {e}; sandboxes cannot start (no templates)"),
    }

    let mut buttons = powerbutton::PowerButtons::open();
    log!("watching {} power button device(s)", buttons.count());
    let specs = match std::fs::read_to_string(services::SERVICES_FILE)
        .map_err(|e| format!("{}: {e}", services::SERVICES_FILE))
        .and_then(|text| services::parse_services(&text))
    {
        Ok(specs) => specs,
        Err(e) => {
            log!("SERVICES PROBLEM: {e}; starting none");
            Vec::new()
        }
    };
    let mut supervisor = services::Supervisor::new(specs);
    supervisor.start_all();
    if let Some(slot) = slot {
        slot::watch(slot, slot::trial_timeout(&operator.config));
    }
    log!("boot complete");

    let (action, reason) = event_loop(&signals, &mut buttons, &mut supervisor);
    shutdown(&mut supervisor, action, &reason)
}

const HANDLED_SIGNALS: [libc::c_int; 6] =
    [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGPWR];

fn early_mounts() {
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
            data: "mode=0620,ptmxmode=0666",
        },
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
}

fn set_hostname(name: &str) {
    if let Err(e) = crate::sys::hostname::set(name) {
        log!("hostname {name:?}: {e}");
    }
}

/// Creates or grows the data partition on the boot disk; its device, or None (said why).
fn prepare_data_partition() -> Option<String> {
    match bootdisk::prepare() {
        Ok(p) => {
            let size = p.size_bytes >> 20;
            match p.change {
                bootdisk::Change::Created { .. } => {
                    log!("data partition {} created ({size} MiB, first boot)", p.device);
                }
                bootdisk::Change::Grown { .. } => {
                    log!("data partition {} grown to {size} MiB (the disk grew)", p.device);
                }
                bootdisk::Change::Unchanged { .. } => log!("data partition {} ({size} MiB) fills the disk", p.device),
            }
            Some(p.device)
        }
        Err(e) => {
            log!("DATA PARTITION PROBLEM: {e}");
            None
        }
    }
}

fn bring_up_network(cmdline: &str, settings: &config::Config) {
    if let Err(e) = net::bring_up_loopback() {
        log!("loopback: {e}");
    }
    let config = match net::NetConfig::from_cmdline(cmdline) {
        Ok(config) => config,
        Err(e) => {
            let e = settings.explain(&e, boot_disk::layout::CONFIG_FILE);
            log!("NETWORK CONFIGURATION PROBLEM: {e}; the network stays down");
            return;
        }
    };
    let Some(iface) = net::choose_nic(&config, Duration::from_secs(10)) else {
        log!("no network interface found; the API is only reachable if a NIC appears and the appliance restarts");
        return;
    };
    match net::configure(&config, &iface) {
        Ok(status) => {
            log!(
                "network {}: {}/{} via {} ({}), dns {:?}",
                status.interface,
                status.address,
                status.prefix_len,
                status.gateway.map_or_else(|| "no gateway".into(), |g| g.to_string()),
                status.source,
                status.dns
            );
            net::spawn_dhcp_renewal(&status, |line| crate::sys::console::line("dhcp", line));
        }
        Err(e) => log!("NETWORK PROBLEM on {iface}: {e}"),
    }
}

fn event_loop(
    signals: &SignalFd,
    buttons: &mut powerbutton::PowerButtons,
    supervisor: &mut services::Supervisor,
) -> (PowerAction, String) {
    use std::os::fd::AsRawFd;
    loop {
        let mut fds = vec![signals.as_raw_fd()];
        fds.extend(buttons.fds());
        fds.extend(supervisor.output_fds());
        let timeout_ms = supervisor.next_deadline().map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32);
        let ready = match process::poll_readable(&fds, timeout_ms) {
            Ok(ready) => ready,
            Err(e) => {
                log!("poll: {e}");
                std::thread::sleep(Duration::from_millis(100));
                Vec::new()
            }
        };
        for fd in ready {
            if fd == signals.as_raw_fd() {
                while let Some(sig) = signals.next() {
                    if let Some(request) = shutdown_request(sig) {
                        return request;
                    }
                }
            } else if buttons.fds().contains(&fd) {
                if buttons.pressed(fd) {
                    return (PowerAction::PowerOff, "power button pressed".into());
                }
            } else {
                supervisor.forward_output(fd);
            }
        }
        // SIGCHLD may coalesce, so reap on every wake-up rather than per signal.
        for (pid, status) in process::reap_all() {
            if !supervisor.on_exit(pid, status) {
                log!("reaped orphan pid {pid} ({status})");
            }
        }
        supervisor.restart_due();
    }
}

fn shutdown_request(sig: libc::c_int) -> Option<(PowerAction, String)> {
    let action = match sig {
        libc::SIGTERM | libc::SIGUSR2 | libc::SIGPWR => PowerAction::PowerOff,
        libc::SIGINT | libc::SIGUSR1 => PowerAction::Reboot,
        _ => return None,
    };
    Some((action, format!("signal {sig}")))
}

fn shutdown(supervisor: &mut services::Supervisor, action: PowerAction, reason: &str) -> ! {
    let started = Instant::now();
    log!("shutting down ({reason}) to {}", action.name());
    supervisor.stop_all(SERVICE_GRACE);
    stop_stragglers();
    crate::sys::fs::sync_all();
    unmount_data();
    log!("shutdown took {:.1}s; {} now", started.elapsed().as_secs_f64(), action.name());
    let err = power::execute(action);
    log!("reboot(2) failed: {err}");
    power::halt_forever()
}

fn stop_stragglers() {
    if !process::user_processes_remain() {
        return;
    }
    process::kill_everything(libc::SIGTERM);
    let deadline = Instant::now() + STRAGGLER_GRACE;
    while Instant::now() < deadline {
        for (pid, status) in process::reap_all() {
            log!("reaped pid {pid} ({status})");
        }
        if !process::user_processes_remain() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    log!("killing remaining processes");
    process::kill_everything(libc::SIGKILL);
    // A killed process holds its files until the kernel has torn it down (a VMM unmapping guest
    // RAM backed by a snapshot file on /data takes a while under emulation), and /data cannot be
    // unmounted before: wait for them, within bounds.
    let deadline = Instant::now() + KILLED_GRACE;
    loop {
        process::reap_all();
        if !process::user_processes_remain() {
            return;
        }
        if Instant::now() >= deadline {
            log!("processes remain {}s after SIGKILL", KILLED_GRACE.as_secs());
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unmount_data() {
    if !mount::is_mounted(datadisk::MOUNT_POINT) {
        return;
    }
    match mount::umount(datadisk::MOUNT_POINT, false) {
        Ok(()) => log!("{} unmounted cleanly", datadisk::MOUNT_POINT),
        Err(e) => {
            log!("{e}; remounting read-only");
            if let Err(e) = mount::remount_readonly(datadisk::MOUNT_POINT) {
                log!("{e}");
            }
        }
    }
}

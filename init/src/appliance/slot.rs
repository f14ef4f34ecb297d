//! The system slot this boot runs from (`oc.slot=` on the unified kernel image's command line),
//! and committing a trial boot: when systemd-boot booted a staged upgrade (its entry still
//! carries a boot counter), the entry is blessed (counter dropped) once the appliance API answers
//! healthy. If it never does within TRIAL_TIMEOUT, the appliance reboots so that systemd-boot
//! counts another failed attempt and, when the tries are used up, falls back to the previous
//! slot. The state is written to init_handoff::BOOT_STATE_FILE for the appliance's `GET /api/system`.

use boot_disk::disk;
use boot_disk::entry::{self, Entry, Slot};
use init_handoff::BootState;

use crate::log;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Boot to a healthy API takes about a minute under emulation; real hardware is much faster.
/// `trial_timeout` (seconds) in the configuration file or on the kernel command line sets it.
const DEFAULT_TRIAL_TIMEOUT: Duration = Duration::from_secs(900);
const ESP_COMMIT_MOUNT: &str = "/run/esp-commit";

/// The configured trial timeout (validated when the configuration was read), or the default.
pub fn trial_timeout(config: &super::config::Config) -> Duration {
    config
        .get("trial_timeout")
        .and_then(super::config::trial_timeout_secs)
        .map_or(DEFAULT_TRIAL_TIMEOUT, Duration::from_secs)
}

/// Records the slot and, for a trial boot, starts the thread that commits or gives up on it.
pub fn watch(slot: Slot, trial_timeout: Duration) {
    let current = match disk::read_entries() {
        Ok(entries) => entry::current_for(&entries, slot).cloned(),
        Err(e) => {
            log!("BOOT ENTRIES PROBLEM: {e}; this boot cannot be committed");
            None
        }
    };
    let Some(current) = current else {
        write_state(slot, None);
        log!("booted slot {slot}, but no boot entry for it was found on the EFI partition");
        return;
    };
    write_state(slot, Some(&current));
    if !current.is_trial() {
        log!("booted slot {slot} ({}, committed)", current.file_name());
        return;
    }
    log!(
        "booted slot {slot} on trial ({}); committing once the API answers healthy, rebooting if it does not within {}s",
        current.file_name(),
        trial_timeout.as_secs()
    );
    let spawned = std::thread::Builder::new()
        .name("commit".into())
        .spawn(move || commit_when_healthy(slot, &current, trial_timeout));
    if let Err(e) = spawned {
        log!("cannot start the commit thread: {e}; this trial boot stays uncommitted");
    }
}

fn commit_when_healthy(slot: Slot, current: &Entry, trial_timeout: Duration) {
    let started = Instant::now();
    while !api_healthy() {
        if started.elapsed() > trial_timeout {
            log!(
                "UPGRADE FAILED: the API did not answer healthy within {}s on slot {slot}; rebooting so the boot loader counts a failed try",
                trial_timeout.as_secs()
            );
            // SAFETY: kill(2) with our own pid and a signal PID 1 handles (reboot) has no memory effects.
            unsafe { libc::kill(1, libc::SIGUSR1) };
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let blessed = current.blessed();
    let renamed = disk::with_esp_rw(ESP_COMMIT_MOUNT, |root| {
        let from = format!("{root}/{}", current.path());
        let to = format!("{root}/{}", blessed.path());
        std::fs::rename(&from, &to)
            .map_err(|e| format!("rename {} to {}: {e}", current.file_name(), blessed.file_name()))
    });
    match renamed {
        Ok(()) => {
            write_state(slot, Some(&blessed));
            log!("UPGRADE COMMITTED: slot {slot} is now the default ({})", blessed.file_name());
        }
        Err(e) => log!("UPGRADE COMMIT PROBLEM: {e}; the boot loader may fall back on the next boot"),
    }
}

fn api_healthy() -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], init_handoff::LOOPBACK_API_PORT));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream.write_all(b"GET /api/healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && (head.starts_with(b"HTTP/1.0 200") || head.starts_with(b"HTTP/1.1 200"))
}

/// `slot=`, `entry=` and `state=` lines (committed, trial or unknown).
fn write_state(slot: Slot, current: Option<&Entry>) {
    let (name, state) = match current {
        Some(e) => (e.file_name(), if e.is_trial() { "trial" } else { "committed" }),
        None => (String::new(), "unknown"),
    };
    let text = BootState { slot: slot.letter().to_string(), entry: name, state: state.to_string() }.encode();
    let tmp = format!("{}.tmp", init_handoff::BOOT_STATE_FILE);
    let written = std::fs::create_dir_all(init_handoff::RUN_DIR)
        .and_then(|()| std::fs::write(&tmp, text))
        .and_then(|()| std::fs::rename(&tmp, init_handoff::BOOT_STATE_FILE));
    if let Err(e) = written {
        log!("cannot write {}: {e}", init_handoff::BOOT_STATE_FILE);
    }
}

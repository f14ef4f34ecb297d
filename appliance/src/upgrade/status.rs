//! What `GET /api/system` reports: the slot and version running, whether this boot is
//! committed, and an upgrade staged (or failed) in the other slot.

use boot_disk::entry::{self, Entry, Slot, VERSION_KEY};
use serde_json::{json, Value};

/// The running image's version, from its os-release.
pub fn running_version() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix(VERSION_KEY).and_then(|r| r.strip_prefix('=')).map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
}

/// The booted slot and its state, as init recorded them (None: not booted from the disk image).
pub fn boot_state() -> Option<(Slot, String, String)> {
    let text = std::fs::read_to_string(init_handoff::BOOT_STATE_FILE).ok()?;
    let state = init_handoff::BootState::parse(&text);
    Some((Slot::parse(&state.slot)?, state.entry, state.state))
}

/// The machine's host name (set by init from the operator's configuration).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

pub fn report() -> Value {
    let version = running_version();
    let Some((slot, entry_name, state)) = boot_state() else {
        return json!({"slot": null, "version": version, "hostname": hostname(), "state": "not booted from the disk image", "staged": null, "entries": []});
    };
    let (entries, problem) = match boot_disk::disk::read_entries() {
        Ok(entries) => (entries, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let order: Vec<String> = entry::boot_order(&entries).into_iter().map(Entry::file_name).collect();
    let other = entries.iter().filter(|e| e.slot == slot.other() && e.is_trial()).max_by_key(|e| e.generation);
    let staged = other.map(|e| {
        json!({
            "slot": e.slot.letter(),
            "entry": e.file_name(),
            "triesLeft": e.tries.map(|t| t.left),
            "state": if e.is_bad() { "failed" } else { "staged" },
        })
    });
    json!({
        "slot": slot.letter(),
        "version": version,
        "hostname": hostname(),
        "entry": entry_name,
        "state": state,
        "staged": staged,
        "entries": order,
        "problem": problem,
    })
}

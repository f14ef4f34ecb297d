//! Requests to a running VMM and the events it reports.
//!
//! Requests are signals: the appliance may have restarted and adopted the VMM, so there is no
//! connection to keep, only a pid. Events are JSON lines the VMM appends to the events file it
//! opened before confining itself; the requester reads the lines that appeared after its request.

use serde::{Deserialize, Serialize};

/// A request the appliance sends a running VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Write all guest RAM to the configured memory dump file, then report
    /// [`Event::MemoryDumped`] or [`Event::MemoryDumpFailed`].
    DumpMemory,
    /// Pause the vCPUs, write a snapshot (state, memory and a copy of the root disk) to the
    /// configured [`crate::config::SnapshotTarget`], report [`Event::SnapshotWritten`] or
    /// [`Event::SnapshotFailed`], then let the guest run on.
    Checkpoint,
    /// Like `Checkpoint` without the disk copy, then exit with
    /// [`crate::ExitStatus::Hibernated`] instead of running on (or run on if writing failed).
    Hibernate,
}

impl Control {
    /// The signal that carries the request.
    pub fn signal(self) -> libc::c_int {
        match self {
            Control::DumpMemory => libc::SIGUSR1,
            Control::Checkpoint => libc::SIGUSR2,
            Control::Hibernate => libc::SIGPWR,
        }
    }
}

/// Something the VMM reports, one JSON object per line.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The memory dump file holds all guest RAM (`bytes` long).
    MemoryDumped { bytes: u64 },
    /// The dump could not be written.
    MemoryDumpFailed { error: String },
    /// The snapshot files are complete and flushed. `memory_bytes` is what the memory file
    /// holds (holes excluded), `paused_ms` how long the guest stood still for it.
    SnapshotWritten { state_bytes: u64, memory_bytes: u64, paused_ms: u64 },
    /// No usable snapshot was written; the guest runs on.
    SnapshotFailed { error: String },
}

impl Event {
    /// The line to append, newline included.
    pub fn to_line(&self) -> String {
        // An enum of strings and numbers always serialises.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// The events in the complete lines of `text`; unreadable lines are skipped (the file is
    /// written only by the VMM, but the reader must not trust a line cut short).
    pub fn parse_lines(text: &str) -> Vec<Event> {
        text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_lines() {
        let events = [Event::MemoryDumped { bytes: 1 << 29 }, Event::MemoryDumpFailed { error: "disk full".into() }];
        let text: String = events.iter().map(Event::to_line).collect();
        assert_eq!(text.lines().next(), Some(r#"{"event":"memory_dumped","bytes":536870912}"#));
        assert_eq!(Event::parse_lines(&text), events);
        assert_eq!(Event::parse_lines("{\"event\":\"memory_dum"), vec![]);
    }

    #[test]
    fn each_request_has_its_own_signal() {
        assert_eq!(Control::DumpMemory.signal(), libc::SIGUSR1);
        assert_eq!(Control::Checkpoint.signal(), libc::SIGUSR2);
        assert_eq!(Control::Hibernate.signal(), libc::SIGPWR);
        let line = Event::SnapshotWritten { state_bytes: 1, memory_bytes: 2, paused_ms: 3 }.to_line();
        assert_eq!(line, "{\"event\":\"snapshot_written\",\"state_bytes\":1,\"memory_bytes\":2,\"paused_ms\":3}\n");
    }
}

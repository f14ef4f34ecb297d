//! What `vmm run`'s exit status means. The last line the VMM prints on stderr says the same
//! in words.

/// Why a VMM process ended, as its exit status tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest powered off (also a clean `poweroff` inside the sandbox).
    PowerOff,
    /// The VMM itself failed (the stderr line says how).
    VmmError,
    /// The command line or configuration was refused.
    Usage,
    /// The guest rebooted.
    Reboot,
    /// The guest kernel printed its panic banner, then rebooted or hung.
    Panic,
    /// The VMM wrote a snapshot on [`crate::Control::Hibernate`] and stopped; resuming it
    /// continues the guest where it was.
    Hibernated,
}

impl ExitStatus {
    pub const ALL: [ExitStatus; 6] = [
        ExitStatus::PowerOff,
        ExitStatus::VmmError,
        ExitStatus::Usage,
        ExitStatus::Reboot,
        ExitStatus::Panic,
        ExitStatus::Hibernated,
    ];

    pub const fn code(self) -> u8 {
        match self {
            ExitStatus::PowerOff => 0,
            ExitStatus::VmmError => 1,
            ExitStatus::Usage => 2,
            ExitStatus::Reboot => 3,
            ExitStatus::Panic => 4,
            ExitStatus::Hibernated => 5,
        }
    }

    pub fn from_code(code: i32) -> Option<ExitStatus> {
        ExitStatus::ALL.into_iter().find(|s| i32::from(s.code()) == code)
    }

    pub fn describe(self) -> &'static str {
        match self {
            ExitStatus::PowerOff => "guest powered off",
            ExitStatus::VmmError => "VMM error",
            ExitStatus::Usage => "VMM refused its configuration",
            ExitStatus::Reboot => "guest rebooted",
            ExitStatus::Panic => "guest kernel panicked",
            ExitStatus::Hibernated => "guest state saved, VMM stopped",
        }
    }

    /// The guest ended the machine itself, as a sandbox may (not a failure).
    pub fn is_clean(self) -> bool {
        matches!(self, ExitStatus::PowerOff | ExitStatus::Reboot)
    }
}

/// Describes a process's end: its exit code, or `None` when a signal killed it.
pub fn describe(code: Option<i32>) -> &'static str {
    match code {
        None => "VMM was killed",
        Some(code) => ExitStatus::from_code(code).map_or("VMM exited unexpectedly", ExitStatus::describe),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_round_trip() {
        for (i, a) in ExitStatus::ALL.iter().enumerate() {
            assert_eq!(ExitStatus::from_code(a.code().into()), Some(*a));
            assert!(ExitStatus::ALL[i + 1..].iter().all(|b| a.code() != b.code()));
        }
        assert_eq!(ExitStatus::from_code(9), None);
    }

    #[test]
    fn ends_are_described() {
        assert_eq!(describe(Some(0)), "guest powered off");
        assert_eq!(describe(Some(3)), "guest rebooted");
        assert_eq!(describe(Some(4)), "guest kernel panicked");
        assert_eq!(describe(Some(77)), "VMM exited unexpectedly");
        assert_eq!(describe(None), "VMM was killed");
    }
}

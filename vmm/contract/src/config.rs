//! The VM configuration file: JSON, snake_case keys, unknown keys refused. The VMM validates
//! the values (limits depend on its device layout); this module only fixes the shape and the
//! defaults.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One virtio block device; the first is the root disk (`/dev/vda`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// Where the VMM writes a snapshot when asked ([`crate::Control::Checkpoint`] or
/// [`crate::Control::Hibernate`]). The files are created (empty) when the VMM starts, before it
/// confines itself, and overwritten by every snapshot; the requester moves them away once the
/// VMM reports [`crate::Event::SnapshotWritten`]. A snapshot is complete only then: until the
/// event, the files may hold half of one.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotTarget {
    /// The machine state: vCPUs, interrupt controllers, clocks and devices, versioned and
    /// checksummed (small: tens of KiB).
    pub state: PathBuf,
    /// Guest RAM, sparse: file offset = guest-physical address, never-written pages are holes.
    pub memory: PathBuf,
    /// A copy of the root disk taken while the vCPUs are paused (a reflink where the file system
    /// has them). Only a checkpoint writes it: a hibernating VMM exits with the disk as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<PathBuf>,
}

/// A snapshot to resume instead of booting the kernel. The rest of the configuration must
/// describe the same machine (vCPUs, memory, the number of disks, a vsock device); the vsock
/// CID may differ (a fork), and the guest is told its transport was reset either way.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RestoreSource {
    pub state: PathBuf,
    /// Mapped copy-on-write: it must stay unchanged while the restored VMM runs.
    pub memory: PathBuf,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// An ELF vmlinux (entered at its 64-bit entry) or a bzImage, told apart by their first bytes.
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// The guest's command line; the VMM appends the root disk and its virtio-mmio devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Where the guest's ttyS0 goes (discarded without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_log: Option<PathBuf>,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// The guest's vsock CID (vhost-vsock); no vsock device without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_cid: Option<u64>,
    /// Written with all guest RAM on [`crate::Control::DumpMemory`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_dump: Option<PathBuf>,
    /// Where the VMM appends its [`crate::Event`] lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<PathBuf>,
    /// Where snapshots go; without it, snapshot requests are refused (reported as failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_to: Option<SnapshotTarget>,
    /// Resume this snapshot (the kernel and initrd are then not loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<RestoreSource>,
}

pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 128;

fn default_vcpus() -> u8 {
    DEFAULT_VCPUS
}

fn default_memory_mib() -> u32 {
    DEFAULT_MEMORY_MIB
}

impl VmConfig {
    /// A configuration with only the kernel set and every other field at its default.
    pub fn new(kernel: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            console_log: None,
            disks: Vec::new(),
            vsock_cid: None,
            memory_dump: None,
            events: None,
            snapshot_to: None,
            restore_from: None,
        }
    }

    /// Parses the file's text (shape only; the VMM checks the values).
    pub fn from_json(text: &str) -> Result<VmConfig, String> {
        serde_json::from_str(text).map_err(|e| format!("bad configuration: {e}"))
    }

    pub fn to_json(&self) -> String {
        // A struct of paths, strings and numbers always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let mut cfg = VmConfig::new("/k");
        cfg.vcpus = 2;
        cfg.disks.push(DiskConfig { path: "/r".into(), read_only: false });
        cfg.vsock_cid = Some(9);
        cfg.events = Some("/e".into());
        cfg.snapshot_to = Some(SnapshotTarget { state: "/s".into(), memory: "/m".into(), disk: None });
        cfg.restore_from = Some(RestoreSource { state: "/s0".into(), memory: "/m0".into() });
        assert_eq!(VmConfig::from_json(&cfg.to_json()), Ok(cfg));
    }

    #[test]
    fn defaults_and_unknown_keys() {
        let cfg = VmConfig::from_json(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(cfg, VmConfig::new("/k"));
        assert!(VmConfig::from_json(r#"{"kernel": "/k", "vcpu": 2}"#).unwrap_err().contains("unknown field"));
        assert!(VmConfig::from_json(r#"{"kernel": 5}"#).is_err());
    }
}

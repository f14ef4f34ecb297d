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

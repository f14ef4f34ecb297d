//! `vmm run` configuration: the JSON file (`--config`, its shape is `vmm_contract::VmConfig`),
//! command-line flags, or both (flags win), and what the VMM derives from it: the checked
//! limits, the device list and the guest's command line.
//!
//! JSON keys (snake_case, unknown keys rejected):
//! `kernel` (path, required: an ELF vmlinux, entered at its 64-bit entry without decompression,
//! or a bzImage; told apart by their first bytes), `initrd` (path), `cmdline`, `vcpus` (default 1), `memory_mib` (default 128),
//! `console_log` (path; the guest's ttyS0 is discarded without it),
//! `disks` (list of `{"path", "read_only"}`; the first is the root disk, /dev/vda),
//! `vsock_cid` (guest CID for vhost-vsock; no vsock device without it),
//! `memory_dump` (path written with all guest RAM on SIGUSR1),
//! `events` (path the VMM appends its event lines to, e.g. "memory dumped"),
//! `snapshot_to` (`{"state", "memory", "disk"}`: files a checkpoint or hibernation writes),
//! `restore_from` (`{"state", "memory"}`: a snapshot to resume instead of booting).
//! Devices go on the kernel command line and CPUs in an MP table.

use std::path::PathBuf;

pub use vmm_contract::{DiskConfig, VmConfig};

use crate::layout::{IOAPIC_PINS, MAX_VCPUS, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

/// Console on COM1; keyboard-controller reboot (our i8042); reboot at once on panic so the
/// VMM exits with the panic status; no PCI bus to probe; `quiet` because every console byte
/// costs two VM exits (measured: ~3.1 s instead of ~4.9 s to init when nested). Errors, the
/// panic banner and the halt/reboot lines are printed regardless.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";
pub const MAX_DISKS: usize = 8;
// Every device (the disks and a vsock) needs its own IOAPIC pin from VIRTIO_IRQ_BASE on.
const _: () = assert!(MAX_DISKS < (IOAPIC_PINS - VIRTIO_IRQ_BASE) as usize);
const MAX_MEMORY_MIB: u32 = 1 << 20;
const MIN_MEMORY_MIB: u32 = 16;
/// CIDs 0-2 are the hypervisor, local and host; u32::MAX is VMADDR_CID_ANY.
const MIN_GUEST_CID: u64 = 3;
const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// A virtio device in bus order (disks first, then vsock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    Disk(DiskConfig),
    Vsock(u64),
}

/// Where a virtio-mmio device lives: its register window and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub irq: u32,
}

pub const USAGE: &str =
    "usage: vmm run [--config FILE] [--kernel VMLINUX|BZIMAGE] [--initrd FILE] [--cmdline ARGS] [--vcpus N]
               [--memory-mib M] [--console-log FILE] [--disk PATH] [--disk-ro PATH]
               [--vsock-cid CID] [--memory-dump FILE] [--events FILE]
       vmm selfcheck
       vmm check-snapshot STATE MEMORY   (reads both files whole; exit 0 when intact)
exit status of run: 0 guest powered off, 3 guest rebooted, 4 guest panicked,
                    5 hibernated (snapshot written), 1 VMM error, 2 bad usage or configuration
snapshots (checkpoint on SIGUSR2, hibernate on SIGPWR) and restores are set in the
configuration file: snapshot_to {state, memory, disk}, restore_from {state, memory}";

/// Parses the arguments after `run`.
pub fn from_args(args: &[String]) -> Result<VmConfig, String> {
    let mut file: Option<VmConfig> = None;
    let mut it = args.iter();
    let mut flags: Vec<(&str, &str)> = Vec::new();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        if flag == "--config" {
            let text = std::fs::read_to_string(value).map_err(|e| format!("cannot read {value}: {e}"))?;
            file = Some(from_json(&text)?);
        } else {
            flags.push((flag, value));
        }
    }
    let mut cfg = if let Some(c) = file {
        c
    } else {
        let kernel = flags.iter().find(|(f, _)| *f == "--kernel").map(|(_, v)| PathBuf::from(v));
        VmConfig::new(kernel.ok_or("--kernel (or --config) is required")?)
    };
    let mut flag_disks = Vec::new();
    for (flag, value) in flags {
        let number = |what: &str| format!("{flag} wants {what}, got {value:?}");
        match flag {
            "--kernel" => cfg.kernel = value.into(),
            "--initrd" => cfg.initrd = Some(value.into()),
            "--cmdline" => cfg.cmdline = Some(value.to_string()),
            "--vcpus" => cfg.vcpus = value.parse().map_err(|_| number("a number of vCPUs"))?,
            "--memory-mib" => cfg.memory_mib = value.parse().map_err(|_| number("MiB"))?,
            "--console-log" => cfg.console_log = Some(value.into()),
            "--disk" => flag_disks.push(DiskConfig { path: value.into(), read_only: false }),
            "--disk-ro" => flag_disks.push(DiskConfig { path: value.into(), read_only: true }),
            "--vsock-cid" => cfg.vsock_cid = Some(value.parse().map_err(|_| number("a CID"))?),
            "--memory-dump" => cfg.memory_dump = Some(value.into()),
            "--events" => cfg.events = Some(value.into()),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if !flag_disks.is_empty() {
        cfg.disks = flag_disks;
    }
    validate(&cfg)?;
    Ok(cfg)
}

/// Parses and checks a configuration file's text.
pub fn from_json(text: &str) -> Result<VmConfig, String> {
    let cfg = VmConfig::from_json(text)?;
    validate(&cfg)?;
    Ok(cfg)
}

pub fn validate(cfg: &VmConfig) -> Result<(), String> {
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(format!("vcpus must be 1..={MAX_VCPUS}, got {}", cfg.vcpus));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&cfg.memory_mib) {
        return Err(format!("memory_mib must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}, got {}", cfg.memory_mib));
    }
    if cfg.disks.len() > MAX_DISKS {
        return Err(format!("at most {MAX_DISKS} disks, got {}", cfg.disks.len()));
    }
    if let Some(cid) = cfg.vsock_cid {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
            return Err(format!("vsock_cid must be {MIN_GUEST_CID}..={MAX_GUEST_CID}, got {cid}"));
        }
    }
    if let Some(c) = &cfg.cmdline {
        if c.contains('\0') {
            return Err("cmdline contains a NUL byte".into());
        }
    }
    Ok(())
}

/// What the VMM derives from a (validated) configuration.
pub trait Derived {
    fn memory_bytes(&self) -> u64;
    fn devices(&self) -> Vec<DeviceSpec>;
    fn kernel_cmdline(&self) -> String;
    fn device_windows(&self) -> Vec<MmioDevice>;
}

impl Derived for VmConfig {
    fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }

    fn devices(&self) -> Vec<DeviceSpec> {
        let mut d: Vec<DeviceSpec> = self.disks.iter().cloned().map(DeviceSpec::Disk).collect();
        if let Some(cid) = self.vsock_cid {
            d.push(DeviceSpec::Vsock(cid));
        }
        d
    }

    /// The command line the guest gets: the configured (or default) arguments, the root
    /// disk unless the caller chose a root, and one `virtio_mmio.device=` per device.
    fn kernel_cmdline(&self) -> String {
        let line = self.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        // Everything after ` -- ` belongs to init, so the kernel's own arguments go before it.
        let (mut kernel, init) = match line.split_once(" -- ") {
            Some((kernel, init)) => (kernel.to_string(), Some(init.to_string())),
            None => (line, None),
        };
        if let Some(root) = self.disks.first() {
            if !kernel.split_whitespace().any(|a| a.starts_with("root=")) {
                kernel.push_str(if root.read_only { " root=/dev/vda ro" } else { " root=/dev/vda rw" });
            }
        }
        for d in self.device_windows() {
            kernel.push_str(&format!(" virtio_mmio.device={}K@{:#x}:{}", VIRTIO_MMIO_SIZE >> 10, d.base, d.irq));
        }
        match init {
            Some(init) => format!("{kernel} -- {init}"),
            None => kernel,
        }
    }

    /// Where each device of `devices()` lives: its MMIO window and interrupt line.
    fn device_windows(&self) -> Vec<MmioDevice> {
        (0..self.devices().len() as u64)
            .map(|i| MmioDevice { base: VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE, irq: VIRTIO_IRQ_BASE + i as u32 })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn json_with_defaults() {
        let c = from_json(r#"{"kernel": "/k", "disks": [{"path": "/r.ext4"}]}"#).unwrap();
        assert_eq!((c.vcpus, c.memory_mib, c.vsock_cid), (1, 128, None));
        assert_eq!(c.disks, vec![DiskConfig { path: "/r.ext4".into(), read_only: false }]);
    }

    #[test]
    fn json_rejects_unknown_keys_and_bad_values() {
        assert!(from_json(r#"{"kernel": "/k", "vcpu": 2}"#).unwrap_err().contains("unknown field"));
        assert!(from_json(r#"{"kernel": "/k", "vcpus": 0}"#).is_err());
        assert!(from_json(r#"{"kernel": "/k", "vcpus": 300}"#).is_err());
        assert!(from_json(r#"{"kernel": "/k", "memory_mib": 4}"#).is_err());
        assert!(from_json(r#"{"kernel": "/k", "vsock_cid": 2}"#).is_err());
        assert!(from_json(r#"{"kernel": "/k", "vsock_cid": 4294967295}"#).is_err());
        assert!(from_json(r#"{"kernel": 5}"#).is_err());
        assert!(from_json("{").is_err());
        assert!(from_json(r#"{"kernel": "/k", "cmdline": "a\u0000b"}"#).is_err());
    }

    #[test]
    fn flags_build_a_config() {
        let c =
            from_args(&args("--kernel /k --vcpus 2 --memory-mib 256 --disk /a --disk-ro /b --vsock-cid 7")).unwrap();
        assert_eq!((c.vcpus, c.memory_mib, c.vsock_cid), (2, 256, Some(7)));
        assert_eq!(c.disks.len(), 2);
        assert!(c.disks[1].read_only);
        assert!(from_args(&args("--vcpus 2")).unwrap_err().contains("--kernel"));
        assert!(from_args(&args("--kernel /k --vcpus two")).is_err());
        assert!(from_args(&args("--kernel /k --bogus 1")).is_err());
        assert!(from_args(&args("--kernel")).is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let path = std::env::temp_dir().join(format!("vmm-cfg-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"kernel": "/k", "vcpus": 4, "disks": [{"path": "/x"}]}"#).unwrap();
        let c = from_args(&args(&format!("--config {} --vcpus 2 --disk-ro /y", path.display()))).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.disks, vec![DiskConfig { path: "/y".into(), read_only: true }]);
    }

    #[test]
    fn cmdline_declares_devices_and_root() {
        let c = from_json(
            r#"{"kernel": "/k", "disks": [{"path": "/r", "read_only": true}, {"path": "/d"}], "vsock_cid": 9}"#,
        )
        .unwrap();
        assert_eq!(
            c.kernel_cmdline(),
            format!(
                "{DEFAULT_CMDLINE} root=/dev/vda ro virtio_mmio.device=4K@0xd0000000:5 \
                 virtio_mmio.device=4K@0xd0001000:6 virtio_mmio.device=4K@0xd0002000:7"
            )
        );
        let own_root =
            from_json(r#"{"kernel": "/k", "cmdline": "console=ttyS0 root=/dev/vdb", "disks": [{"path": "/r"}]}"#)
                .unwrap();
        assert_eq!(own_root.kernel_cmdline(), "console=ttyS0 root=/dev/vdb virtio_mmio.device=4K@0xd0000000:5");
    }

    #[test]
    fn init_arguments_stay_last_and_windows_follow_the_devices() {
        let mut c = from_json(r#"{"kernel": "/k", "disks": [{"path": "/r"}], "vsock_cid": 3}"#).unwrap();
        c.cmdline = Some("console=ttyS0 rdinit=/oc-init -- sandbox".into());
        assert_eq!(
            c.kernel_cmdline(),
            "console=ttyS0 rdinit=/oc-init root=/dev/vda rw virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6 -- sandbox"
        );
        assert_eq!(
            c.device_windows(),
            vec![MmioDevice { base: 0xd000_0000, irq: 5 }, MmioDevice { base: 0xd000_1000, irq: 6 }]
        );
        assert!(from_args(&args("--kernel /k --acpi true")).unwrap_err().contains("unknown flag"));
    }
}

//! Snapshots: pausing the machine, writing its whole state and memory to the files the
//! configuration named, and reading them back for a restore.
//!
//! A snapshot is three files: the state (vCPUs, VM-wide interrupt controllers and clock,
//! devices; `state_file`), guest memory (`memory_file`), and for a checkpoint a copy of the
//! root disk taken while the vCPUs stood still. The state file is written last: whoever finds
//! it complete (its CRC holds) may rely on the others.

pub mod memory_file;
pub mod resumed_memory;
pub mod state_file;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmm_contract::Event;

use crate::config::{Derived, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::legacy::SerialSnapshot;
use crate::devices::virtio::mmio::TransportState;
use crate::memory::GuestMemory;
use crate::vstate::pause::Pause;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;
use memory_file::MemoryFileInfo;

/// How long the vCPUs get to stop before a snapshot is given up.
const PAUSE_LIMIT: Duration = Duration::from_secs(5);
/// A state file bigger than this is not ours (a real one is tens of KiB).
const MAX_STATE_FILE: u64 = 64 << 20;

/// Everything but guest memory and disks.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    /// The VMM that wrote it (for people; the format version is what is checked).
    pub vmm_version: String,
    pub memory_mib: u32,
    pub memory: MemoryFileInfo,
    pub disks: usize,
    pub vsock: bool,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialSnapshot,
    /// The virtio transports in bus order (disks, then vsock).
    pub devices: Vec<TransportState>,
}

impl MachineState {
    /// Refuses a restore into a machine the configuration describes differently.
    pub fn check_fits(&self, cfg: &VmConfig) -> Result<(), String> {
        let mismatch = |what: &str, snap: String, cfg: String| {
            Err(format!("the snapshot was taken with {snap} {what}, the configuration asks for {cfg}"))
        };
        if self.vcpus.len() != usize::from(cfg.vcpus) {
            return mismatch("vCPUs", self.vcpus.len().to_string(), cfg.vcpus.to_string());
        }
        if self.memory_mib != cfg.memory_mib {
            return mismatch("MiB of memory", self.memory_mib.to_string(), cfg.memory_mib.to_string());
        }
        if self.disks != cfg.disks.len() {
            return mismatch("disks", self.disks.to_string(), cfg.disks.len().to_string());
        }
        if self.vsock != cfg.vsock_cid.is_some() {
            let has = |b: bool| if b { "a" } else { "no" }.to_string();
            return mismatch("vsock device", has(self.vsock), has(cfg.vsock_cid.is_some()));
        }
        if self.devices.len() != cfg.devices().len() {
            return Err(format!(
                "the snapshot holds {} devices, the configuration {}",
                self.devices.len(),
                cfg.devices().len()
            ));
        }
        if self.vcpus.iter().enumerate().any(|(i, v)| usize::from(v.id) != i) {
            return Err("the snapshot's vCPUs are out of order".into());
        }
        Ok(())
    }
}

/// Reads and checks a snapshot's state file.
pub fn load(state: &File, cfg: &VmConfig) -> Result<MachineState, String> {
    let len = state.metadata().map_err(|e| format!("cannot stat the snapshot state: {e}"))?.len();
    if len > MAX_STATE_FILE {
        return Err(format!("the snapshot state file is {len} bytes: not a state file"));
    }
    let mut bytes = vec![0u8; len as usize];
    state.read_exact_at(&mut bytes, 0).map_err(|e| format!("cannot read the snapshot state: {e}"))?;
    let machine = state_file::decode(&bytes)?;
    machine.check_fits(cfg)?;
    Ok(machine)
}

/// `vmm check-snapshot`: reads a snapshot's state and memory files whole and checks them (the
/// state's CRC, the memory's digest and length); returns a one-line JSON summary.
pub fn check_files(state: &std::path::Path, memory: &std::path::Path) -> Result<String, String> {
    let open = |p: &std::path::Path| File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()));
    let state_file = open(state)?;
    let len = state_file.metadata().map_err(|e| format!("cannot stat {}: {e}", state.display()))?.len();
    if len > MAX_STATE_FILE {
        return Err(format!("{} is {len} bytes: not a state file", state.display()));
    }
    let mut bytes = vec![0u8; len as usize];
    state_file.read_exact_at(&mut bytes, 0).map_err(|e| format!("cannot read {}: {e}", state.display()))?;
    let machine = state_file::decode(&bytes)?;
    memory_file::verify(&open(memory)?, &machine.memory)?;
    Ok(format!(
        "{{\"snapshot\":\"ok\",\"formatVersion\":{},\"vcpus\":{},\"memoryMib\":{},\"memoryDataBytes\":{}}}",
        state_file::FORMAT_VERSION,
        machine.vcpus.len(),
        machine.memory_mib,
        machine.memory.data_bytes
    ))
}

/// The files snapshots are written to, opened before the VMM confined itself.
pub struct Target {
    pub state: File,
    pub memory: File,
    /// Where a checkpoint copies the root disk, and the root disk itself.
    pub disk: Option<(File, File)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The guest runs on afterwards; the root disk is copied.
    Checkpoint,
    /// The VMM exits afterwards (unless writing failed); the disk stays as it is.
    Hibernate,
}

/// What a snapshot needs to reach.
pub struct Machine<'a> {
    pub cfg: &'a VmConfig,
    pub vm: &'a VmFd,
    pub mem: &'a GuestMemory,
    pub bus: &'a Bus,
    pub pause: &'a Pause,
    /// Where guest RAM came from, for a resumed guest.
    pub resumed: Option<&'a resumed_memory::ResumedMemory>,
}

/// Takes a snapshot into `target`. On success the vCPUs stay paused for a hibernation (the
/// caller exits) and run on for a checkpoint; on failure they always run on.
pub fn take(kind: Kind, machine: &Machine, target: &Target) -> Result<Event, String> {
    let started = Instant::now();
    let vcpus = machine.pause.pause_all(PAUSE_LIMIT)?;
    let mut backends_paused = 0;
    let result = write_all(kind, machine, target, vcpus, &mut backends_paused, started);
    if result.is_err() || kind == Kind::Checkpoint {
        for t in machine.bus.virtio.iter().take(backends_paused) {
            if let Ok(mut t) = t.lock() {
                if let Err(e) = t.resume_after_save() {
                    eprintln!("vmm: after the snapshot: {e}");
                }
            }
        }
        machine.pause.resume();
    }
    result
}

fn write_all(
    kind: Kind,
    machine: &Machine,
    target: &Target,
    vcpus: Vec<VcpuState>,
    backends_paused: &mut usize,
    started: Instant,
) -> Result<Event, String> {
    let vm = VmState::save(machine.vm)?;
    let mut devices = Vec::with_capacity(machine.bus.virtio.len());
    for t in &machine.bus.virtio {
        let mut t = t.lock().map_err(|_| "a device lock is poisoned".to_string())?;
        devices.push(t.save()?);
        *backends_paused += 1;
    }
    let serial = machine.bus.legacy.serial_snapshot()?;
    let memory = memory_file::write(machine.mem, &target.memory, machine.resumed)?;
    if kind == Kind::Checkpoint {
        let (copy, root) = target.disk.as_ref().ok_or("no disk copy file is configured for checkpoints")?;
        copy_disk(root, copy)?;
    }
    let state = MachineState {
        vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        memory_mib: machine.cfg.memory_mib,
        memory,
        disks: machine.cfg.disks.len(),
        vsock: machine.cfg.vsock_cid.is_some(),
        vcpus,
        vm,
        serial,
        devices,
    };
    let bytes = state_file::encode(&state)?;
    target.state.set_len(0).map_err(|e| format!("cannot empty the state file: {e}"))?;
    target.state.write_all_at(&bytes, 0).map_err(|e| format!("cannot write the state file: {e}"))?;
    target.state.sync_data().map_err(|e| format!("cannot flush the state file: {e}"))?;
    Ok(Event::SnapshotWritten {
        state_bytes: bytes.len() as u64,
        memory_bytes: memory.data_bytes,
        paused_ms: started.elapsed().as_millis() as u64,
    })
}

/// Copies the root disk with copy_file_range, which shares the blocks (a reflink) where the
/// file system can and copies them elsewhere; either way the copy is independent of the disk.
fn copy_disk(from: &File, to: &File) -> Result<(), String> {
    let len = from.metadata().map_err(|e| format!("cannot stat the root disk: {e}"))?.len();
    to.set_len(0).map_err(|e| format!("cannot empty the disk copy: {e}"))?;
    let (mut off_in, mut off_out): (libc::loff_t, libc::loff_t) = (0, 0);
    while (off_in as u64) < len {
        let want = ((len - off_in as u64) as usize).min(1 << 30);
        // SAFETY: both descriptors are open files of this process and the offsets are locals
        // the kernel updates.
        let n = unsafe {
            libc::copy_file_range(from.as_raw_fd(), &raw mut off_in, to.as_raw_fd(), &raw mut off_out, want, 0)
        };
        if n < 0 {
            return Err(format!("cannot copy the root disk: {}", std::io::Error::last_os_error()));
        }
        if n == 0 {
            return Err("the root disk ended early while it was copied".into());
        }
    }
    to.set_len(len).map_err(|e| format!("cannot size the disk copy: {e}"))?;
    to.sync_data().map_err(|e| format!("cannot flush the disk copy: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_copy_is_independent_of_the_disk() {
        let dir = std::env::temp_dir();
        let (a, b) = (
            dir.join(format!("vmm-disk-a-{}", std::process::id())),
            dir.join(format!("vmm-disk-b-{}", std::process::id())),
        );
        std::fs::write(&a, vec![5u8; 3 << 20]).unwrap();
        std::fs::write(&b, b"old copy, longer than nothing").unwrap();
        let from = File::options().read(true).write(true).open(&a).unwrap();
        let to = File::options().read(true).write(true).open(&b).unwrap();
        copy_disk(&from, &to).unwrap();
        from.write_all_at(b"changed after", 0).unwrap();
        let copy = std::fs::read(&b).unwrap();
        assert_eq!(copy.len(), 3 << 20);
        assert!(copy.iter().all(|&x| x == 5));
        std::fs::remove_file(a).unwrap();
        std::fs::remove_file(b).unwrap();
    }
}

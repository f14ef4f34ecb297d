//! Admission control: what the machine can give sandboxes (guest memory after a reserve for the
//! appliance itself, vCPUs, data-disk space) and what admitted sandboxes hold. A create reserves
//! its guest memory before anything is booted, under one lock, so concurrent creates cannot
//! overcommit; the reservation is handed back when it is dropped (any failed create) or, once
//! the sandbox runs, when the sandbox ends or hibernates (`release` by id, so a second release is
//! a no-op); a wake is admitted like a create (`hibernation`).
//! vCPUs are not refused on their sum (overcommitting vCPUs is normal for VMs), only a single
//! sandbox asking for more than the machine has.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::{json, Value};

use crate::error::AppError;

/// The appliance keeps at least this much memory for itself (the API, LMDB's page cache, the
/// proxy, one VMM process per sandbox), or 10% of the machine when that is more.
pub const MIN_MEMORY_RESERVE_MB: u64 = 512;
/// Creates are refused when the data disk has less free space than this (the store, sandbox
/// disks' copy-on-write growth and console logs need room to keep working).
pub const DEFAULT_DISK_RESERVE_MB: u64 = 1024;

const MIB: u64 = 1 << 20;

/// How the capacity is set: each `None` is measured on the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityConfig {
    /// Total memory (default: MemTotal of /proc/meminfo).
    pub memory_total_mb: Option<u64>,
    /// Memory kept for the appliance itself (default: `default_memory_reserve_mb`).
    pub memory_reserve_mb: Option<u64>,
    /// vCPUs a single sandbox may have at most (default: the CPUs this process may run on).
    pub vcpus: Option<u32>,
    /// Free space the data disk must keep; creates are refused below it.
    pub disk_reserve_mb: u64,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self { memory_total_mb: None, memory_reserve_mb: None, vcpus: None, disk_reserve_mb: DEFAULT_DISK_RESERVE_MB }
    }
}

/// The machine's capacity, resolved once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_total_mb: u64,
    pub memory_reserved_mb: u64,
    pub vcpus: u32,
    pub disk_reserve_mb: u64,
}

impl Limits {
    /// Fills in what `config` leaves open from the machine.
    pub fn resolve(config: &CapacityConfig) -> Result<Limits, String> {
        let memory_total_mb = if let Some(v) = config.memory_total_mb {
            v
        } else {
            let text = std::fs::read_to_string("/proc/meminfo")
                .map_err(|e| format!("cannot read /proc/meminfo to size guest memory: {e}"))?;
            meminfo_total_mb(&text).ok_or("/proc/meminfo has no readable MemTotal line")?
        };
        let vcpus = match config.vcpus {
            Some(v) => v,
            None => std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
        };
        Ok(Limits {
            memory_total_mb,
            memory_reserved_mb: config.memory_reserve_mb.unwrap_or_else(|| default_memory_reserve_mb(memory_total_mb)),
            vcpus: vcpus.max(1),
            disk_reserve_mb: config.disk_reserve_mb,
        })
    }

    /// Guest memory all sandboxes together may commit.
    pub fn for_sandboxes_mb(&self) -> u64 {
        self.memory_total_mb.saturating_sub(self.memory_reserved_mb)
    }
}

/// max(512 MiB, 10% of the machine).
pub fn default_memory_reserve_mb(total_mb: u64) -> u64 {
    (total_mb / 10).max(MIN_MEMORY_RESERVE_MB)
}

/// MemTotal of a /proc/meminfo text, in MiB (the kernel writes it in kB = KiB).
pub fn meminfo_total_mb(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut words = line.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(value / 1024),
        Some(_) => None,
    }
}

/// Free space for unprivileged writers on the filesystem holding `path`, in MiB.
pub fn free_disk_mb(path: &Path) -> std::io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: statvfs is plain old data; all-zero bytes are a valid value of it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated string alive for the call, and `st` is a valid,
    // writable statvfs the kernel fills in; neither pointer is kept.
    if unsafe { libc::statvfs(c_path.as_ptr(), &raw mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize) / MIB)
}

/// What admitted sandboxes hold.
#[derive(Default)]
struct Held {
    /// Creates admitted and not yet running (booting, publishing, storing).
    pending_memory_mb: u64,
    pending_vcpus: u64,
    /// Running sandboxes: id -> (vCPUs, MiB).
    running: HashMap<String, (u32, u32)>,
}

impl Held {
    fn committed(&self) -> (u64, u64) {
        self.running.values().fold((self.pending_vcpus, self.pending_memory_mb), |(c, m), (vc, mb)| {
            (c + u64::from(*vc), m + u64::from(*mb))
        })
    }
}

/// Committed amounts at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub memory_committed_mb: u64,
    pub memory_free_mb: u64,
    pub vcpus_committed: u64,
}

pub struct Capacity {
    limits: Limits,
    data_dir: PathBuf,
    held: Mutex<Held>,
}

/// Guest memory reserved for a create under way; handed back on drop unless `commit`ted.
#[must_use = "dropping a reservation releases it at once"]
pub struct Reservation<'a> {
    capacity: &'a Capacity,
    cpu_count: u32,
    memory_mb: u32,
    active: bool,
}

impl Reservation<'_> {
    /// The sandbox runs: from now on its share is held under its id until `Capacity::release`.
    pub fn commit(mut self, sandbox_id: &str) {
        let mut held = self.capacity.lock();
        held.pending_memory_mb = held.pending_memory_mb.saturating_sub(u64::from(self.memory_mb));
        held.pending_vcpus = held.pending_vcpus.saturating_sub(u64::from(self.cpu_count));
        held.running.insert(sandbox_id.to_string(), (self.cpu_count, self.memory_mb));
        self.active = false;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.active {
            let mut held = self.capacity.lock();
            held.pending_memory_mb = held.pending_memory_mb.saturating_sub(u64::from(self.memory_mb));
            held.pending_vcpus = held.pending_vcpus.saturating_sub(u64::from(self.cpu_count));
        }
    }
}

impl Capacity {
    /// `data_dir` is where sandbox disks and the store live (its free space is checked per create).
    pub fn new(limits: Limits, data_dir: &Path) -> Self {
        Self { limits, data_dir: data_dir.to_path_buf(), held: Mutex::new(Held::default()) }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        // The counters stay consistent whatever panicked while holding them (each update is
        // done before the guard is dropped), so a poisoned lock is still usable.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a sandbox of `cpu_count` vCPUs and `memory_mb` MiB or says why not: `400` when it
    /// could never fit this machine, `503` when it does not fit now (memory or disk).
    pub fn admit(&self, cpu_count: u32, memory_mb: u32) -> Result<Reservation<'_>, AppError> {
        let limits = self.limits;
        if cpu_count > limits.vcpus {
            return Err(AppError::bad_request(format!(
                "cpuCount must be at most {} on this appliance (it has {} vCPUs), got {cpu_count}",
                limits.vcpus, limits.vcpus
            )));
        }
        let for_sandboxes = limits.for_sandboxes_mb();
        if u64::from(memory_mb) > for_sandboxes {
            return Err(AppError::bad_request(format!(
                "memoryMB must be at most {for_sandboxes} on this appliance (its memory for sandboxes), got {memory_mb}"
            )));
        }
        // Outside the lock: a slow filesystem must not hold up releases.
        let disk_free = self.data_disk_free_mb()?;
        if disk_free < limits.disk_reserve_mb {
            return Err(AppError::unavailable(format!(
                "not enough space on the data disk for a new sandbox: {disk_free} MiB free, {} MiB are kept in reserve",
                limits.disk_reserve_mb
            )));
        }
        let mut held = self.lock();
        let free = for_sandboxes.saturating_sub(held.committed().1);
        if u64::from(memory_mb) > free {
            return Err(AppError::unavailable(format!(
                "not enough memory for a {memory_mb} MiB sandbox: {free} MiB free of {for_sandboxes} MiB for sandboxes"
            )));
        }
        held.pending_memory_mb += u64::from(memory_mb);
        held.pending_vcpus += u64::from(cpu_count);
        Ok(Reservation { capacity: self, cpu_count, memory_mb, active: true })
    }

    /// Free space on the data disk, or 503 saying it cannot be measured.
    fn data_disk_free_mb(&self) -> Result<u64, AppError> {
        free_disk_mb(&self.data_dir).map_err(|e| {
            AppError::unavailable(format!(
                "cannot measure free space on the data disk ({}): {e}",
                self.data_dir.display()
            ))
        })
    }

    /// Refuses (503) to write `size_mb` MiB to the data disk (a memory dump) unless it leaves the
    /// reserve free, so diagnostics cannot fill the disk the store lives on.
    pub fn check_disk_for(&self, size_mb: u64, what: &str) -> Result<(), AppError> {
        let free = self.data_disk_free_mb()?;
        let needed = size_mb.saturating_add(self.limits.disk_reserve_mb);
        if free < needed {
            return Err(AppError::unavailable(format!(
                "not enough space on the data disk for {what}: it needs {size_mb} MiB and {} MiB are kept in reserve, {free} MiB free",
                self.limits.disk_reserve_mb
            )));
        }
        Ok(())
    }

    /// Accounts a sandbox found running after a restart (it holds its memory whether or not it
    /// would be admitted now).
    pub fn adopt(&self, sandbox_id: &str, cpu_count: u32, memory_mb: u32) {
        self.lock().running.insert(sandbox_id.to_string(), (cpu_count, memory_mb));
    }

    /// Hands back what a sandbox held; true if it held anything (false on a second call).
    pub fn release(&self, sandbox_id: &str) -> bool {
        self.lock().running.remove(sandbox_id).is_some()
    }

    pub fn usage(&self) -> Usage {
        let (vcpus_committed, memory_committed_mb) = self.lock().committed();
        Usage {
            memory_committed_mb,
            memory_free_mb: self.limits.for_sandboxes_mb().saturating_sub(memory_committed_mb),
            vcpus_committed,
        }
    }

    /// The `capacity` object of `GET /api/system`.
    pub fn report(&self) -> Value {
        let usage = self.usage();
        let l = self.limits;
        json!({
            "memoryMB": {
                "total": l.memory_total_mb,
                "reserved": l.memory_reserved_mb,
                "forSandboxes": l.for_sandboxes_mb(),
                "committed": usage.memory_committed_mb,
                "free": usage.memory_free_mb,
            },
            "vcpus": {"total": l.vcpus, "committed": usage.vcpus_committed},
            "disk": {"freeMB": free_disk_mb(&self.data_dir).ok(), "reserveMB": l.disk_reserve_mb},
        })
    }

    /// Gauges for /metrics (metric name, help, value).
    pub fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        let usage = self.usage();
        let mut out = vec![
            (
                "appliance_sandbox_memory_capacity_bytes",
                "Guest memory all sandboxes together may commit (total minus the appliance's reserve).",
                self.limits.for_sandboxes_mb().saturating_mul(MIB),
            ),
            (
                "appliance_sandbox_memory_committed_bytes",
                "Guest memory committed to admitted sandboxes.",
                usage.memory_committed_mb.saturating_mul(MIB),
            ),
            (
                "appliance_sandbox_memory_free_bytes",
                "Guest memory still free for new sandboxes.",
                usage.memory_free_mb.saturating_mul(MIB),
            ),
            ("appliance_vcpus", "vCPUs of the machine (the most one sandbox may have).", u64::from(self.limits.vcpus)),
            (
                "appliance_sandbox_vcpus_committed",
                "vCPUs of admitted sandboxes (may exceed the machine's).",
                usage.vcpus_committed,
            ),
        ];
        if let Ok(free) = free_disk_mb(&self.data_dir) {
            out.push(("appliance_data_disk_free_bytes", "Free space on the data disk.", free.saturating_mul(MIB)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:        8029148 kB\nMemFree:          412340 kB\nMemAvailable:    5120000 kB\n";

    #[test]
    fn meminfo_parsing() {
        assert_eq!(meminfo_total_mb(MEMINFO), Some(7840));
        assert_eq!(meminfo_total_mb("MemFree: 1 kB\nMemTotal: 2048 kB\n"), Some(2));
        assert_eq!(meminfo_total_mb("MemTotal: 1048576\n"), Some(1024));
        assert_eq!(meminfo_total_mb("MemFree: 1 kB\n"), None);
        assert_eq!(meminfo_total_mb("MemTotal: lots kB\n"), None);
        assert_eq!(meminfo_total_mb("MemTotal: 12 MB\n"), None);
        assert_eq!(meminfo_total_mb(""), None);
    }

    #[test]
    fn reserve_is_at_least_512_mib_or_a_tenth() {
        assert_eq!(default_memory_reserve_mb(2048), 512);
        assert_eq!(default_memory_reserve_mb(65536), 6553);
        let l = Limits::resolve(&CapacityConfig { memory_total_mb: Some(8192), ..CapacityConfig::default() })
            .expect("resolve");
        assert_eq!((l.memory_reserved_mb, l.for_sandboxes_mb()), (819, 7373));
        assert!(l.vcpus >= 1);
        let small = Limits::resolve(&CapacityConfig {
            memory_total_mb: Some(256),
            memory_reserve_mb: None,
            vcpus: Some(0),
            disk_reserve_mb: 0,
        })
        .expect("resolve");
        assert_eq!((small.for_sandboxes_mb(), small.vcpus), (0, 1));
    }

    #[test]
    fn machine_limits_are_measured() {
        let l = Limits::resolve(&CapacityConfig::default()).expect("this machine has /proc/meminfo");
        assert!(l.memory_total_mb > 0 && l.vcpus >= 1);
        assert!(free_disk_mb(Path::new("/")).is_ok());
        assert!(free_disk_mb(Path::new("/nonexistent/appliance-capacity")).is_err());
    }

    fn capacity(for_sandboxes: u64, vcpus: u32) -> Capacity {
        let limits =
            Limits { memory_total_mb: for_sandboxes + 512, memory_reserved_mb: 512, vcpus, disk_reserve_mb: 0 };
        Capacity::new(limits, &std::env::temp_dir())
    }

    #[test]
    fn admit_commit_release() {
        let cap = capacity(2048, 2);
        let a = cap.admit(2, 1024).expect("fits");
        let b = cap.admit(2, 1024).expect("fits, vCPUs overcommit");
        let err = cap.admit(1, 64).err().expect("memory full");
        assert_eq!(err.status, 503);
        assert_eq!(err.message, "not enough memory for a 64 MiB sandbox: 0 MiB free of 2048 MiB for sandboxes");
        drop(b);
        assert_eq!(cap.usage(), Usage { memory_committed_mb: 1024, memory_free_mb: 1024, vcpus_committed: 2 });
        a.commit("sbx-a");
        assert_eq!(cap.usage().memory_committed_mb, 1024);
        assert!(cap.release("sbx-a"));
        assert!(!cap.release("sbx-a"), "a second release gives back nothing");
        assert_eq!(cap.usage(), Usage { memory_committed_mb: 0, memory_free_mb: 2048, vcpus_committed: 0 });
    }

    #[test]
    fn limits_of_one_sandbox_are_400() {
        let cap = capacity(2048, 2);
        let err = cap.admit(3, 512).err().expect("too many vCPUs");
        assert_eq!(err.status, 400);
        assert!(err.message.contains("at most 2"), "{}", err.message);
        let err = cap.admit(1, 4096).err().expect("more than the machine");
        assert_eq!(err.status, 400);
        assert!(err.message.contains("at most 2048"), "{}", err.message);
        assert_eq!(cap.usage().memory_committed_mb, 0);
    }

    #[test]
    fn disk_reserve_refuses() {
        let limits = Limits { memory_total_mb: 4096, memory_reserved_mb: 512, vcpus: 2, disk_reserve_mb: u64::MAX };
        let cap = Capacity::new(limits, &std::env::temp_dir());
        let err = cap.admit(1, 512).err().expect("disk below reserve");
        assert_eq!(err.status, 503);
        assert!(err.message.starts_with("not enough space on the data disk"), "{}", err.message);
        assert_eq!(cap.usage().memory_committed_mb, 0);
    }

    #[test]
    fn adopted_sandboxes_count() {
        let cap = capacity(1024, 2);
        cap.adopt("old", 1, 1024);
        assert_eq!(cap.admit(1, 64).err().map(|e| e.status), Some(503));
        assert!(cap.release("old"));
        assert!(cap.admit(1, 1024).is_ok());
    }
}

//! From the sandbox initramfs to the sandbox's root disk. Every sandbox boots our PID 1 from the
//! appliance's own initramfs (image/src/sandbox_initrd.rs: `/oc-init` and a few mount points),
//! never from its disk, so the template (or an imported archive) cannot bring or replace the
//! init and the agent. PID 1 mounts the root disk on `/newroot`, moves it over `/` (as
//! switch_root(8) does: chdir, `mount(".", "/", MS_MOVE)`, chroot) and carries on there; the
//! agent is started from `/proc/self/exe`, which still reaches this binary in the old root.
//!
//! The initramfs is not emptied after the switch: the only file in it of any size is this
//! binary, which PID 1 and the agent run from for the sandbox's whole life, so its pages stay in
//! memory whether or not its name is removed (ramfs pages cannot be dropped while they are
//! mapped). Nothing else is left there: the mounts made on the way are undone.

use crate::sys::mount::{self, Mount};
use crate::sys::{check, cstr};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// Where the root disk is mounted before it is moved over `/` (the initramfs has it).
const NEW_ROOT: &str = "/newroot";
/// The root disk when the kernel command line names none: the VMM's first disk (it also
/// appends `root=/dev/vda` for it).
const DEFAULT_ROOT: &str = "/dev/vda";
/// Virtio devices are probed before PID 1 runs; this covers a device node that comes late.
const DEVICE_WAIT: Duration = Duration::from_secs(5);
const DEVICE_POLL: Duration = Duration::from_millis(10);
/// statfs `f_type` of ramfs (linux/magic.h; the libc crate does not have it).
const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;

/// If PID 1 runs from the initramfs, mounts the root disk (the kernel command line's `root=`,
/// else `/dev/vda`) read-write and makes it `/`; returns the device. Returns None when `/` is
/// already a disk (a kernel booted without the initramfs): there is nothing to switch.
pub fn from_initramfs() -> io::Result<Option<String>> {
    if !is_initramfs(root_fs_type()?) {
        return Ok(None);
    }
    let device = root_device(&read_cmdline()?)?;
    mount::mount(&Mount { source: "devtmpfs", target: "/dev", fstype: "devtmpfs", flags: libc::MS_NOSUID, data: "" })?;
    let mounted = mount_root(&device);
    // The device node was needed for mount(2) only; the new root gets its own /dev.
    if let Err(e) = mount::umount("/dev", true) {
        crate::log!("{e}");
    }
    mounted?;
    move_to_new_root()?;
    Ok(Some(device))
}

/// The filesystem type (statfs `f_type`) of `/`.
fn root_fs_type() -> io::Result<libc::c_long> {
    let root = cstr("/")?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `root` is a live CString and `st` a writable statfs on this stack frame; statfs(2)
    // only reads the one and writes the other during the call.
    let ret = unsafe { libc::statfs(root.as_ptr(), &raw mut st) };
    check(ret, || "statfs /".into())?;
    Ok(st.f_type)
}

/// Whether a filesystem of type `f_type` is the kernel's rootfs, which holds an unpacked
/// initramfs: ramfs, or tmpfs when the kernel mounts its rootfs as one.
fn is_initramfs(f_type: libc::c_long) -> bool {
    f_type == RAMFS_MAGIC || f_type == libc::TMPFS_MAGIC
}

/// The kernel command line, read through a procfs mounted for that and unmounted again (the
/// new root gets its own /proc).
fn read_cmdline() -> io::Result<String> {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount::mount(&Mount { source: "proc", target: "/proc", fstype: "proc", flags: nosuid_nodev_noexec, data: "" })?;
    let cmdline = crate::sys::fs::read_trimmed("/proc/cmdline");
    if let Err(e) = mount::umount("/proc", true) {
        crate::log!("{e}");
    }
    cmdline.map_err(|e| io::Error::new(e.kind(), format!("read /proc/cmdline: {e}")))
}

/// The root device the command line names (`root=`, a /dev path), else `DEFAULT_ROOT`.
fn root_device(cmdline: &str) -> io::Result<String> {
    let device = crate::sys::fs::cmdline_value(cmdline, "root").unwrap_or(DEFAULT_ROOT);
    let name = device.strip_prefix("/dev/").unwrap_or_default();
    if name.is_empty() || name.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("root={device} is not a device under /dev (only device paths are supported)"),
        ));
    }
    Ok(device.to_string())
}

/// Mounts `device` (ext4, read-write: the disk is this sandbox's own clone) on `NEW_ROOT`,
/// waiting up to `DEVICE_WAIT` for its node to appear.
fn mount_root(device: &str) -> io::Result<()> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        let tried = if Path::new(device).exists() {
            mount::mount(&Mount { source: device, target: NEW_ROOT, fstype: "ext4", flags: 0, data: "" })
        } else {
            Err(io::Error::new(io::ErrorKind::NotFound, format!("{device} does not exist")))
        };
        match tried {
            Ok(()) => return Ok(()),
            // A device that is not there (yet) is waited for; anything else will not change.
            Err(e) if device_missing(&e) && Instant::now() < deadline => std::thread::sleep(DEVICE_POLL),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot mount the root disk {device} on {NEW_ROOT}: {e}"),
                ));
            }
        }
    }
}

fn device_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENXIO)
}

/// Makes `NEW_ROOT` the root: chdir into it, move its mount over `/`, chroot to it, chdir to `/`.
fn move_to_new_root() -> io::Result<()> {
    std::env::set_current_dir(NEW_ROOT).map_err(|e| io::Error::new(e.kind(), format!("chdir {NEW_ROOT}: {e}")))?;
    let here = cstr(".")?;
    let root = cstr("/")?;
    // SAFETY: `here` and `root` are live CStrings that mount(2) only reads during the call; the
    // null fstype and data are allowed with MS_MOVE.
    let ret = unsafe { libc::mount(here.as_ptr(), root.as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) };
    check(ret, || format!("move the mount {NEW_ROOT} over /"))?;
    // SAFETY: `here` is a live CString that chroot(2) only reads during the call.
    let ret = unsafe { libc::chroot(here.as_ptr()) };
    check(ret, || format!("chroot into {NEW_ROOT}"))?;
    std::env::set_current_dir("/").map_err(|e| io::Error::new(e.kind(), format!("chdir / in the new root: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_device_is_the_command_lines_or_the_first_disk() {
        let vmm = "console=ttyS0 quiet rdinit=/oc-init root=/dev/vda rw virtio_mmio.device=4K@0xd0000000:5 -- sandbox";
        assert_eq!(root_device(vmm).expect("root"), "/dev/vda");
        assert_eq!(root_device("root=/dev/vdb root=/dev/vdc").expect("root"), "/dev/vdc", "the last one wins");
        assert_eq!(root_device("console=ttyS0").expect("default"), DEFAULT_ROOT);
        assert_eq!(root_device("root=/dev/disk/by-label/x").expect("nested"), "/dev/disk/by-label/x");
        for bad in ["root=LABEL=base", "root=/dev/", "root=/dev/../etc/passwd", "root=/newroot", "root=/dev//vda"] {
            let err = root_device(bad).expect_err(bad);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}: {err}");
        }
    }

    #[test]
    fn only_the_kernels_rootfs_counts_as_the_initramfs() {
        assert!(is_initramfs(RAMFS_MAGIC));
        assert!(is_initramfs(libc::TMPFS_MAGIC));
        assert!(!is_initramfs(libc::EXT4_SUPER_MAGIC));
        assert!(!is_initramfs(libc::OVERLAYFS_SUPER_MAGIC));
        // Whatever this host's / is, it can be asked.
        assert!(root_fs_type().is_ok());
    }

    #[test]
    fn a_missing_device_is_waited_for_and_other_errors_are_not() {
        assert!(device_missing(&io::Error::new(io::ErrorKind::NotFound, "x")));
        assert!(device_missing(&io::Error::from_raw_os_error(libc::ENXIO)));
        assert!(!device_missing(&io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(!device_missing(&io::Error::from_raw_os_error(libc::EACCES)));
    }
}

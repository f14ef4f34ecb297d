//! mount(2) and umount2(2).

use super::{check, cstr};
use std::io;
use std::path::Path;

/// One filesystem to mount.
pub struct Mount<'a> {
    pub source: &'a str,
    pub target: &'a str,
    pub fstype: &'a str,
    pub flags: libc::c_ulong,
    pub data: &'a str,
}

/// Mounts, creating the mount point first. An already-mounted target (EBUSY) is not an error,
/// so the early mounts are idempotent if the kernel or an initramfs did some of them.
pub fn mount(m: &Mount) -> io::Result<()> {
    std::fs::create_dir_all(m.target).map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", m.target)))?;
    let source = cstr(m.source)?;
    let target = cstr(m.target)?;
    let fstype = cstr(m.fstype)?;
    let data = cstr(m.data)?;
    let data_ptr = if m.data.is_empty() { std::ptr::null() } else { data.as_ptr() };
    // SAFETY: all pointers come from live CStrings (or null for empty data), which mount(2)
    // only reads during the call.
    let ret = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), m.flags, data_ptr.cast()) };
    match check(ret, || format!("mount {} on {} ({})", m.source, m.target, m.fstype)) {
        Err(e) if e.kind() == io::ErrorKind::ResourceBusy && is_mounted(m.target) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Unmounts `target`; with `lazy` a busy filesystem is detached instead of failing.
pub fn umount(target: &str, lazy: bool) -> io::Result<()> {
    let path = cstr(target)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `path` is a live CString; umount2 only reads it.
    let ret = unsafe { libc::umount2(path.as_ptr(), flags) };
    check(ret, || format!("umount {target}")).map(|_| ())
}

/// Remounts `target` read-only, the fallback when a filesystem stays busy at shutdown.
pub fn remount_readonly(target: &str) -> io::Result<()> {
    let path = cstr(target)?;
    // SAFETY: `path` is a live CString; the null source/fstype/data are allowed for MS_REMOUNT.
    let ret = unsafe {
        libc::mount(
            std::ptr::null(),
            path.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    check(ret, || format!("remount {target} read-only")).map(|_| ())
}

/// Whether `target` appears as a mount point in /proc/self/mounts.
pub fn is_mounted(target: &str) -> bool {
    let target = Path::new(target);
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).any(|mp| Path::new(mp) == target)
    })
}

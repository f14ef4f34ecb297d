//! Least privilege for the VMM process, applied once every file it needs is open:
//! a private mount namespace whose root is an empty read-only tmpfs (so no path on the
//! host resolves any more), no capabilities, and no way to gain privileges again.
//!
//! A PID namespace is not used: it only applies to children, and the kernel refuses new
//! threads (our vCPUs) in a process whose children would live in another PID namespace.
//! Other processes stay unreachable anyway: /proc is gone, and the seccomp filters do not
//! allow kill, ptrace or process_vm_* calls.

use std::ffi::CStr;

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Capabilities are numbered below 64 on every kernel we can meet.
const CAP_LIMIT: libc::c_ulong = 64;

fn check(what: &str, r: libc::c_long) -> Result<libc::c_long, String> {
    if r < 0 {
        Err(format!("{what} failed: {}", std::io::Error::last_os_error()))
    } else {
        Ok(r)
    }
}

/// Confines the calling process. Must run before any other thread exists: namespaces,
/// the root directory and capabilities set here are inherited by threads created later.
pub fn enter() -> Result<(), String> {
    // SAFETY: plain syscalls with constant flags or pointers to NUL-terminated literals.
    unsafe {
        check(
            "unshare(mount, IPC, UTS namespaces)",
            libc::c_long::from(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS)),
        )
        .map_err(|e| format!("{e} (the VMM must start as root to confine itself)"))?;
        // Nothing we do to mounts may propagate back to the host.
        check(
            "making mounts private",
            libc::c_long::from(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )),
        )?;
    }
    chroot_into_empty_tmpfs()?;
    drop_privileges()
}

fn chroot_into_empty_tmpfs() -> Result<(), String> {
    let string_opt = |fs: libc::c_long, key: &CStr, value: &CStr| {
        // SAFETY: fsconfig reads two NUL-terminated strings that outlive the call.
        let r = unsafe { libc::syscall(libc::SYS_fsconfig, fs, FSCONFIG_SET_STRING, key.as_ptr(), value.as_ptr(), 0) };
        check("fsconfig", r)
    };
    // SAFETY: fsopen takes a NUL-terminated filesystem name; it returns a new fd or -1.
    let fs = check("fsopen(tmpfs)", unsafe { libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), FSOPEN_CLOEXEC) })?;
    let result = (|| {
        string_opt(fs, c"size", c"4k")?;
        string_opt(fs, c"mode", c"0555")?;
        // SAFETY: CMD_CREATE takes no key or value pointers.
        check("fsconfig(create)", unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs,
                FSCONFIG_CMD_CREATE,
                std::ptr::null::<u8>(),
                std::ptr::null::<u8>(),
                0,
            )
        })?;
        let attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
        // SAFETY: fsmount turns the configured context `fs` into a detached mount fd.
        let mnt = check("fsmount", unsafe { libc::syscall(libc::SYS_fsmount, fs, FSMOUNT_CLOEXEC, attrs) })?;
        // SAFETY: fchdir on the fd we just got, then chroot/chdir on literal paths.
        let r = unsafe {
            check("fchdir(new root)", libc::c_long::from(libc::fchdir(mnt as libc::c_int)))
                .and_then(|_| check("chroot", libc::c_long::from(libc::chroot(c".".as_ptr()))))
                .and_then(|_| check("chdir(/)", libc::c_long::from(libc::chdir(c"/".as_ptr()))))
        };
        // SAFETY: closing an fd we own; the mount stays alive as our root.
        unsafe { libc::close(mnt as libc::c_int) };
        r.map(|_| ())
    })();
    // SAFETY: closing the fs context fd we own.
    unsafe { libc::close(fs as libc::c_int) };
    result
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn drop_privileges() -> Result<(), String> {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        check("PR_SET_NO_NEW_PRIVS", libc::c_long::from(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)))?;
        for cap in 0..CAP_LIMIT {
            // EINVAL marks the first capability this kernel doesn't know: we're done.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(format!(
                    "dropping capability {cap} from the bounding set failed: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        check(
            "clearing ambient capabilities",
            libc::c_long::from(libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )),
        )?;
    }
    let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads one header and two data structs (version 3), both valid here.
    check("capset", unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD_ENV: &str = "VMM_JAIL_TEST_CHILD";

    /// Runs in a child copy of the test binary (the jail is irreversible).
    #[test]
    fn jailed_process_sees_an_empty_root_and_has_no_capabilities() {
        if std::env::var_os(CHILD_ENV).is_some() {
            let kept = std::fs::File::open("/proc/self/status").unwrap();
            if let Err(e) = enter() {
                // Root without CAP_SYS_ADMIN (an unprivileged container): the error must say why.
                assert!(e.contains("Operation not permitted") && e.contains("root"), "{e}");
                return;
            }
            assert!(std::fs::read_dir("/").unwrap().next().is_none(), "root must be empty");
            assert!(std::fs::metadata("/proc").is_err());
            assert!(std::fs::File::create("/x").is_err(), "root is read-only");
            // Files opened before the jail keep working.
            let mut status = String::new();
            std::io::Read::read_to_string(&mut &kept, &mut status).unwrap();
            assert!(status.contains("Name:"));
            let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
            let mut data = [CapData::default(); 2];
            // SAFETY: capget fills two data structs.
            let r = unsafe { libc::syscall(libc::SYS_capget, &raw const header, data.as_mut_ptr()) };
            assert_eq!(r, 0);
            assert!(data.iter().all(|d| d.effective == 0 && d.permitted == 0 && d.inheritable == 0));
            // SAFETY: prctl queries with integer arguments.
            let (nnp, sys_admin) = unsafe {
                (libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0), libc::prctl(libc::PR_CAPBSET_READ, 21, 0, 0, 0))
            };
            assert_eq!(nnp, 1);
            assert_eq!(sys_admin, 0, "CAP_SYS_ADMIN left the bounding set");
            // Escaping needs CAP_SYS_CHROOT, which is gone.
            // SAFETY: chroot reads a NUL-terminated literal.
            assert!(unsafe { libc::chroot(c"/".as_ptr()) } < 0);
            return;
        }
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            // Without root, entering must fail with a message that says why.
            assert!(enter().unwrap_err().contains("root"));
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "jail::tests::jailed_process_sees_an_empty_root_and_has_no_capabilities",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stdout));
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
    }
}

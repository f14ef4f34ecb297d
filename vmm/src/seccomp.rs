//! Per-thread seccomp allowlists, as classic BPF written here (no filter compiler).
//!
//! Each thread installs the filter for its role just before it starts its real work; the
//! kernel then stops anything else it tries. A blocked call raises SIGSYS, whose handler
//! prints the syscall number and ends the VMM with the error status, so a missing entry
//! shows up as a clear message instead of a silent kill. A foreign architecture (x32 or
//! i386 entry) kills the process outright.

use crate::devices::virtio::vhost;
use crate::exit::STATUS_VMM_ERROR;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;
/// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG1_LOW: u32 = 16 + 8;
/// KVM_RUN = _IO(KVMIO, 0x80).
const KVM_RUN: u64 = 0xae80;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Runs KVM_RUN and device register emulation (which may start or stop vhost).
    Vcpu,
    /// Runs the event loop: block I/O, memory dumps, exit handling.
    Main,
}

/// Calls every thread makes: memory management by the allocator, locks, writing to the
/// console log, stderr and eventfds, and leaving.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_restart_syscall,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

const MAIN_ONLY: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_lseek,
];

fn syscalls(role: Role) -> Vec<libc::c_long> {
    let mut v = COMMON.to_vec();
    if role == Role::Main {
        v.extend_from_slice(MAIN_ONLY);
    }
    v
}

fn ioctls(role: Role) -> Vec<u64> {
    match role {
        Role::Vcpu => {
            let mut v = vec![KVM_RUN];
            v.extend_from_slice(&vhost::RUNTIME_IOCTLS);
            v
        }
        Role::Main => Vec::new(),
    }
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: BPF_JEQ_K, jt, jf, k }
}

/// The filter program for `role`.
pub fn program(role: Role) -> Vec<libc::sock_filter> {
    let mut p = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, OFF_NR),
    ];
    for nr in syscalls(role) {
        p.push(jeq(nr as u32, 0, 1));
        p.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
    }
    let requests = ioctls(role);
    if !requests.is_empty() {
        // Only the listed ioctl requests; the kernel compares the low 32 bits (cmd is an int).
        let block_len = 1 + 2 * requests.len() + 1;
        p.push(jeq(libc::SYS_ioctl as u32, 0, block_len as u8));
        p.push(stmt(BPF_LD_W_ABS, OFF_ARG1_LOW));
        for r in requests {
            p.push(jeq(r as u32, 0, 1));
            p.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
        }
        p.push(stmt(BPF_RET_K, SECCOMP_RET_TRAP));
    }
    p.push(stmt(BPF_RET_K, SECCOMP_RET_TRAP));
    p
}

/// Installs the filter for `role` on the calling thread only.
pub fn install(role: Role) -> Result<(), String> {
    let prog = program(role);
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut libc::sock_filter };
    // SAFETY: prctl with integers; seccomp reads `fprog` and the program it points to,
    // both alive for the call (the kernel copies the program).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            return Err(format!("PR_SET_NO_NEW_PRIVS failed: {}", std::io::Error::last_os_error()));
        }
        if libc::syscall(libc::SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fprog as *const libc::sock_fprog) < 0 {
            return Err(format!("installing the {role:?} seccomp filter failed: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// SIGSYS handler: async-signal-safe, formats the number by hand.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGSYS the
    // syscall number is the int at byte 24 (`si_syscall` in `_sigsys`).
    let nr = unsafe { *((info as *const u8).add(24) as *const i32) };
    let mut msg = *b"vmm: error: blocked by seccomp: syscall 0000000000\n";
    let mut n = nr.unsigned_abs();
    let digits_end = msg.len() - 1;
    for i in (digits_end - 10..digits_end).rev() {
        msg[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid.
    unsafe {
        libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
        libc::_exit(STATUS_VMM_ERROR as libc::c_int);
    }
}

/// Installs the SIGSYS reporter for the whole process (threads share handlers).
pub fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: a zeroed sigaction is valid; we then set a handler with the SA_SIGINFO
    // signature and an empty mask.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) < 0 {
            return Err(format!("cannot install the SIGSYS handler: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic-BPF interpreter for the three instruction kinds we emit.
    fn run(prog: &[libc::sock_filter], arch: u32, nr: i64, arg1: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[24..32].copy_from_slice(&arg1.to_le_bytes());
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            match i.code {
                BPF_LD_W_ABS => acc = u32::from_le_bytes(data[i.k as usize..i.k as usize + 4].try_into().unwrap()),
                BPF_JEQ_K => {
                    pc += if acc == i.k { i.jt as usize } else { i.jf as usize };
                }
                BPF_RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn vcpu_threads_may_run_kvm_but_not_open_files() {
        let p = program(Role::Vcpu);
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, KVM_RUN), SECCOMP_RET_ALLOW);
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, vhost::VSOCK_SET_RUNNING), SECCOMP_RET_ALLOW);
        // KVM_CREATE_VCPU, and a high-bits variant of KVM_RUN are still KVM_RUN for the kernel.
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, 0xae41), SECCOMP_RET_TRAP);
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_write, 0), SECCOMP_RET_ALLOW);
        for nr in
            [libc::SYS_openat, libc::SYS_execve, libc::SYS_socket, libc::SYS_kill, libc::SYS_ptrace, libc::SYS_pread64]
        {
            assert_eq!(run(&p, AUDIT_ARCH_X86_64, nr, 0), SECCOMP_RET_TRAP, "syscall {nr}");
        }
    }

    #[test]
    fn main_thread_does_block_io_but_no_ioctl() {
        let p = program(Role::Main);
        for nr in
            [libc::SYS_pread64, libc::SYS_pwrite64, libc::SYS_fdatasync, libc::SYS_epoll_wait, libc::SYS_exit_group]
        {
            assert_eq!(run(&p, AUDIT_ARCH_X86_64, nr, 0), SECCOMP_RET_ALLOW, "syscall {nr}");
        }
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, KVM_RUN), SECCOMP_RET_TRAP);
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_clone, 0), SECCOMP_RET_TRAP);
    }

    #[test]
    fn other_architectures_are_killed() {
        let p = program(Role::Main);
        const AUDIT_ARCH_I386: u32 = 0x4000_0003;
        assert_eq!(run(&p, AUDIT_ARCH_I386, libc::SYS_write, 0), SECCOMP_RET_KILL_PROCESS);
        // x32 syscall numbers have bit 30 set and match nothing.
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_write | 0x4000_0000, 0), SECCOMP_RET_TRAP);
    }

    #[test]
    fn filter_fits_classic_bpf_limits() {
        for role in [Role::Vcpu, Role::Main] {
            let p = program(role);
            assert!(p.len() < 4096);
            assert!(p.iter().all(|i| i.code != BPF_JEQ_K || (i.jt as usize) < p.len()));
        }
    }

    #[test]
    fn installed_filter_blocks_a_call_on_this_thread_only() {
        // Use a child process: a SIGSYS here would end the test runner.
        const CHILD_ENV: &str = "VMM_SECCOMP_TEST_CHILD";
        if std::env::var_os(CHILD_ENV).is_some() {
            install_sigsys_handler().unwrap();
            std::thread::spawn(|| {
                install(Role::Main).unwrap();
                // getpid is not on any list: the handler reports it and exits with status 1.
                // SAFETY: a plain syscall.
                unsafe { libc::getpid() };
            })
            .join()
            .unwrap();
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "seccomp::tests::installed_filter_blocks_a_call_on_this_thread_only",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(STATUS_VMM_ERROR as i32));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("syscall {:010}", libc::SYS_getpid)), "stderr: {stderr}");
    }
}

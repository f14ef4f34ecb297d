//! Per-thread seccomp allowlists, compiled to classic BPF by `seccompiler` from the rules below.
//!
//! Each thread installs the filter for its role just before it starts its real work; the
//! kernel then stops anything else it tries. A blocked call raises SIGSYS, whose handler
//! prints the syscall number and ends the VMM with the error status, so a missing entry
//! shows up as a clear message instead of a silent kill. A foreign architecture (x32 or
//! i386 entry) kills the process outright (seccompiler's architecture check).

use std::collections::BTreeMap;
use std::os::raw::c_ulong;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

use crate::devices::virtio::vhost;
use crate::exit::STATUS_VMM_ERROR;

// What a vCPU thread issues once running (<linux/kvm.h>): KVM_RUN, and for a snapshot the
// reads of its own state.
ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
// What the main thread issues for a snapshot: the VM-wide state.
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

fn vcpu_state_ioctls() -> [c_ulong; 9] {
    [
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_LAPIC(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
    ]
}

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
    // A checkpoint's disk copy, and the disk's size for it (on an open descriptor: no path
    // resolves inside the jail).
    libc::SYS_copy_file_range,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
];

fn syscalls(role: Role) -> Vec<libc::c_long> {
    let mut v = COMMON.to_vec();
    if role == Role::Main {
        v.extend_from_slice(MAIN_ONLY);
    }
    v
}

/// The ioctl requests `role` may issue; no other ioctl passes.
fn ioctls(role: Role) -> Vec<c_ulong> {
    match role {
        Role::Vcpu => {
            let mut v = vec![KVM_RUN()];
            v.extend_from_slice(&vcpu_state_ioctls());
            v.extend_from_slice(&vhost::runtime_ioctls());
            v
        }
        Role::Main => {
            let mut v = vec![KVM_GET_IRQCHIP(), KVM_GET_CLOCK(), KVM_GET_PIT2()];
            v.extend_from_slice(&vhost::snapshot_ioctls());
            v
        }
    }
}

/// The rules for `role`: listed syscalls pass whatever their arguments, ioctl only with a
/// listed request, anything else traps (SIGSYS).
fn filter(role: Role) -> Result<SeccompFilter, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = syscalls(role).into_iter().map(|nr| (nr, Vec::new())).collect();
    if role == Role::Main {
        // Kicking vCPU threads out of KVM_RUN for a snapshot: signals to this process only.
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() } as u64;
        let own = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid)?;
        rules.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![own])?]);
    }
    let requests = ioctls(role);
    if !requests.is_empty() {
        // The request is an int to the kernel: comparing the low 32 bits (Dword) is what it sees.
        let per_request = requests
            .into_iter()
            .map(|r| SeccompRule::new(vec![SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, r)?]))
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, per_request);
    }
    SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
}

/// The filter program for `role`.
pub fn program(role: Role) -> Result<BpfProgram, String> {
    filter(role).and_then(BpfProgram::try_from).map_err(|e| format!("cannot build the {role:?} seccomp filter: {e}"))
}

/// Installs the filter for `role` on the calling thread only (with no_new_privs, which
/// seccompiler sets first).
pub fn install(role: Role) -> Result<(), String> {
    let prog = program(role)?;
    seccompiler::apply_filter(&prog).map_err(|e| format!("installing the {role:?} seccomp filter failed: {e}"))
}

/// SIGSYS handler: async-signal-safe, formats the number by hand.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGSYS the
    // syscall number is the int at byte 24 (`si_syscall` in `_sigsys`), inside that struct.
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    let mut msg = *b"vmm: error: blocked by seccomp: syscall 0000000000\n";
    let mut n = nr.unsigned_abs();
    let digits_end = msg.len() - 1;
    for i in (digits_end - 10..digits_end).rev() {
        msg[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid.
    unsafe {
        libc::write(2, msg.as_ptr().cast::<libc::c_void>(), msg.len());
        libc::_exit(libc::c_int::from(STATUS_VMM_ERROR));
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
        libc::sigemptyset(&raw mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &raw const sa, std::ptr::null_mut()) < 0 {
            return Err(format!("cannot install the SIGSYS handler: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
    const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

    /// A classic-BPF interpreter for the instructions a seccomp filter may use (loads from
    /// `struct seccomp_data`, ALU and jumps with constants, returns), so the tests check
    /// what the compiled program decides rather than how it is laid out.
    fn run(prog: &[seccompiler::sock_filter], arch: u32, nr: i64, arg1: u64) -> u32 {
        run_with(prog, arch, nr, 0, arg1)
    }

    fn run_with(prog: &[seccompiler::sock_filter], arch: u32, nr: i64, arg0: u64, arg1: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[16..24].copy_from_slice(&arg0.to_le_bytes());
        data[24..32].copy_from_slice(&arg1.to_le_bytes());
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = &prog[pc];
            let (class, op) = (i.code & 0x07, i.code & 0xf0);
            pc += 1;
            match (class, op) {
                (0x00, 0x20) => acc = u32::from_le_bytes(data[i.k as usize..i.k as usize + 4].try_into().unwrap()),
                (0x04, 0x50) => acc &= i.k,
                (0x05, 0x00) => pc += i.k as usize,
                (0x05, _) => {
                    let taken = match op {
                        0x10 => acc == i.k,
                        0x20 => acc > i.k,
                        0x30 => acc >= i.k,
                        0x40 => acc & i.k != 0,
                        other => panic!("unexpected jump {other:#x}"),
                    };
                    pc += if taken { i.jt as usize } else { i.jf as usize };
                }
                (0x06, _) => return i.k,
                _ => panic!("unexpected opcode {:#x}", i.code),
            }
        }
    }

    #[test]
    fn vcpu_threads_may_run_kvm_but_not_open_files() {
        let p = program(Role::Vcpu).unwrap();
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, KVM_RUN()), SECCOMP_RET_ALLOW);
        assert_eq!(KVM_RUN(), 0xae80);
        for r in vhost::runtime_ioctls() {
            assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, r), SECCOMP_RET_ALLOW, "ioctl {r:#x}");
        }
        // A high-bits variant of KVM_RUN is still KVM_RUN for the kernel.
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, 0xdead_0000_0000_ae80), SECCOMP_RET_ALLOW);
        // KVM_CREATE_VCPU, and the vhost set-up calls that only happen before the jail.
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, 0xae41), SECCOMP_RET_TRAP);
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, vhost::VHOST_SET_OWNER()), SECCOMP_RET_TRAP);
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, vhost::VHOST_VSOCK_SET_GUEST_CID()), SECCOMP_RET_TRAP);
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_write, 0), SECCOMP_RET_ALLOW);
        for nr in
            [libc::SYS_openat, libc::SYS_execve, libc::SYS_socket, libc::SYS_kill, libc::SYS_ptrace, libc::SYS_pread64]
        {
            assert_eq!(run(&p, AUDIT_ARCH_X86_64, nr, 0), SECCOMP_RET_TRAP, "syscall {nr}");
        }
    }

    #[test]
    fn main_thread_does_block_io_and_snapshot_reads_only() {
        let p = program(Role::Main).unwrap();
        for nr in
            [libc::SYS_pread64, libc::SYS_pwrite64, libc::SYS_fdatasync, libc::SYS_epoll_wait, libc::SYS_exit_group]
        {
            assert_eq!(run(&p, AUDIT_ARCH_X86_64, nr, 0), SECCOMP_RET_ALLOW, "syscall {nr}");
        }
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, KVM_RUN()), SECCOMP_RET_TRAP);
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_clone, 0), SECCOMP_RET_TRAP);
        for r in [KVM_GET_IRQCHIP(), KVM_GET_CLOCK(), KVM_GET_PIT2()].into_iter().chain(vhost::snapshot_ioctls()) {
            assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, r), SECCOMP_RET_ALLOW, "ioctl {r:#x}");
        }
        // Restoring state happens before the filter: no KVM_SET_* once running.
        const KVM_SET_REGS: u64 = 0x4090_ae82;
        const KVM_SET_CLOCK: u64 = 0x4030_ae7b;
        for r in [KVM_SET_REGS, KVM_SET_CLOCK, vhost::VHOST_SET_OWNER()] {
            assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, r), SECCOMP_RET_TRAP, "ioctl {r:#x}");
        }
        // Signals only to this process's own threads.
        let pid = u64::from(std::process::id());
        assert_eq!(run_with(&p, AUDIT_ARCH_X86_64, libc::SYS_tgkill, pid, 7), SECCOMP_RET_ALLOW);
        assert_eq!(run_with(&p, AUDIT_ARCH_X86_64, libc::SYS_tgkill, 1, 7), SECCOMP_RET_TRAP);
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_kill, 0), SECCOMP_RET_TRAP);
    }

    #[test]
    fn snapshot_ioctl_numbers_match_linux() {
        assert_eq!(
            vcpu_state_ioctls(),
            [
                0x8090_ae81,
                0x8138_ae83,
                0xc008_ae88,
                0x8400_ae8e,
                0x8004_ae98,
                0x8040_ae9f,
                0x8080_aea1,
                0x9000_aea4,
                0x8188_aea6
            ]
        );
        assert_eq!([KVM_GET_IRQCHIP(), KVM_GET_CLOCK(), KVM_GET_PIT2()], [0xc208_ae62, 0x8030_ae7c, 0x8070_ae9f]);
        let p = program(Role::Vcpu).unwrap();
        for r in vcpu_state_ioctls() {
            assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_ioctl, r), SECCOMP_RET_ALLOW, "ioctl {r:#x}");
        }
    }

    #[test]
    fn each_role_allows_exactly_its_list() {
        // Every syscall number up to well past the table's end: allowed iff listed.
        for role in [Role::Vcpu, Role::Main] {
            let p = program(role).unwrap();
            let listed = syscalls(role);
            for nr in 0..1024 {
                let verdict = run(&p, AUDIT_ARCH_X86_64, nr, 0);
                let expected = if listed.contains(&nr) { SECCOMP_RET_ALLOW } else { SECCOMP_RET_TRAP };
                assert_eq!(verdict, expected, "{role:?} syscall {nr}");
            }
        }
    }

    #[test]
    fn other_architectures_are_killed() {
        let p = program(Role::Main).unwrap();
        const AUDIT_ARCH_I386: u32 = 0x4000_0003;
        assert_eq!(run(&p, AUDIT_ARCH_I386, libc::SYS_write, 0), SECCOMP_RET_KILL_PROCESS);
        // x32 syscall numbers have bit 30 set and match nothing.
        assert_eq!(run(&p, AUDIT_ARCH_X86_64, libc::SYS_write | 0x4000_0000, 0), SECCOMP_RET_TRAP);
    }

    #[test]
    fn filter_fits_classic_bpf_limits() {
        for role in [Role::Vcpu, Role::Main] {
            let p = program(role).unwrap();
            assert!(p.len() < 4096);
            // Every jump lands inside the program.
            for (at, i) in p.iter().enumerate() {
                if i.code & 0x07 == 0x05 {
                    let far = if i.code & 0xf0 == 0 { i.k as usize } else { i.jt.max(i.jf) as usize };
                    assert!(at + 1 + far < p.len(), "{role:?} jump at {at}");
                }
            }
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
        assert_eq!(out.status.code(), Some(i32::from(STATUS_VMM_ERROR)));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("syscall {:010}", libc::SYS_getpid)), "stderr: {stderr}");
    }
}

//! Signals as a file descriptor (signalfd), child reaping and process-group kills.

use super::check;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The signals PID 1 handles, blocked for normal delivery and read from a signalfd so that
/// they arrive in the main loop, in order, with no async-signal-safety concerns.
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    pub fn new(signals: &[libc::c_int]) -> io::Result<SignalFd> {
        // SAFETY: an all-zero sigset_t is a valid value to pass to sigemptyset, which initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame; sigemptyset/sigaddset only write it.
        unsafe {
            libc::sigemptyset(&raw mut set);
            for &sig in signals {
                libc::sigaddset(&raw mut set, sig);
            }
        }
        // SAFETY: `set` is initialised; the old mask is not requested (null).
        let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
        // SAFETY: -1 asks for a new signalfd; `set` is initialised and only read.
        let fd = unsafe { libc::signalfd(-1, &raw const set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        let fd = check(fd, || "signalfd".into())?;
        // SAFETY: signalfd returned a fresh descriptor that nothing else owns.
        Ok(SignalFd { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// The next pending signal number, or None when none is pending.
    pub fn next(&self) -> Option<libc::c_int> {
        // SAFETY: signalfd_siginfo is plain old data; all-zero is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: the buffer is a live, writable signalfd_siginfo of exactly `size` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut info).cast(), size) };
        (n == size as isize).then_some(info.ssi_signo as libc::c_int)
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(sig) => write!(f, "killed by signal {sig}"),
        }
    }
}

/// Collects every child that has ended, ours or re-parented orphans alike, so none stays a zombie.
pub fn reap_all() -> Vec<(libc::pid_t, ExitStatus)> {
    let mut reaped = Vec::new();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable int; WNOHANG makes the call non-blocking.
        let pid = unsafe { libc::waitpid(-1, &raw mut status, libc::WNOHANG) };
        if pid <= 0 {
            return reaped;
        }
        let how = if libc::WIFEXITED(status) {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        } else {
            ExitStatus::Signal(libc::WTERMSIG(status))
        };
        reaped.push((pid, how));
    }
}

/// Sends `signal` to a whole process group.
pub fn kill_group(pgid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers; a negative pid addresses the process group.
    let ret = unsafe { libc::kill(-pgid, signal) };
    check(ret, || format!("kill(-{pgid}, {signal})")).map(|_| ())
}

/// Sends `signal` to every process of session `sid` (a terminal's shell and all its jobs, in
/// whatever process groups they run); returns how many were signalled. The caller keeps the
/// session leader unreaped, so no unrelated session can have this id meanwhile.
pub fn kill_session(sid: libc::pid_t, signal: libc::c_int) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<libc::pid_t>().ok())
        // SAFETY: getsid and kill take plain integers.
        .filter(|&pid| unsafe { libc::getsid(pid) } == sid && unsafe { libc::kill(pid, signal) } == 0)
        .count()
}

/// Sends `signal` to every process except PID 1 itself (kill(-1, ...)).
pub fn kill_everything(signal: libc::c_int) {
    // SAFETY: kill(2) with plain integers; -1 means all processes we may signal except init.
    unsafe { libc::kill(-1, signal) };
}

/// Whether any process other than PID 1 (and kernel threads) is still alive.
pub fn user_processes_remain() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else { return false };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else { return false };
        // Zombies are reaped by the caller's loop. Not the command line: a killed process loses
        // it before the kernel has torn its memory down and closed its files.
        pid != 1 && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !is_kernel_thread(&stat))
    })
}

/// PF_KTHREAD in the flags of /proc/<pid>/stat.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Whether a /proc/<pid>/stat line is a kernel thread's. Its fields after the command name (in
/// parentheses, which may itself hold spaces and parentheses): state, ppid, pgrp, session,
/// tty_nr, tpgid, flags.
fn is_kernel_thread(stat: &str) -> bool {
    let after_comm = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    after_comm
        .split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// Waits until `fd` is readable or `timeout_ms` passes (-1: forever). Returns the ready fds.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<RawFd>> {
    let mut pollfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: `pollfds` is a live array of exactly `len` pollfd structs that poll may write.
    let ret = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, timeout_ms) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(Vec::new());
        }
        return Err(err);
    }
    Ok(pollfds
        .iter()
        .filter(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .map(|p| p.fd)
        .collect())
}

/// Puts a descriptor in non-blocking mode, so draining a pipe never stalls PID 1.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    check(flags, || "fcntl(F_GETFL)".into())?;
    // SAFETY: as above.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    check(ret, || "fcntl(F_SETFL)".into()).map(|_| ())
}

/// Clears the calling thread's signal mask. std's Command keeps the parent's mask, and PID 1
/// blocks the signals it reads from its signalfd, so every child it starts calls this first.
pub fn unblock_all_signals() -> io::Result<()> {
    // SAFETY: an all-zero sigset_t is valid input for sigemptyset, which initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t that sigemptyset writes and pthread_sigmask only reads.
    let ret = unsafe {
        libc::sigemptyset(&raw mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &raw const set, std::ptr::null_mut())
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_threads_are_told_by_their_flags() {
        // kthreadd's flags (0x208040) hold PF_KTHREAD; a VMM's (0x400100) do not.
        assert!(is_kernel_thread("2 (kthreadd) S 0 0 0 0 -1 2129984 0 0"));
        assert!(!is_kernel_thread("812 (vmm (a) b) R 1 812 812 0 -1 4194560 100 0"));
        assert!(!is_kernel_thread("garbage"));
    }
}

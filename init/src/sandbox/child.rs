//! Starting one command in its own process group (with pipes, or on a pseudo-terminal) and
//! following it: its output is read as it comes, and its exit is seen through a pidfd, so one
//! poll loop waits for both without a helper thread and without touching any other child of
//! the agent.

use super::error::OpError;
use super::pty;
use super::users::Identity;
use crate::sys::process::kill_group;
use agent_protocol::{Command, ExitStatus, OutputStream, WindowSize};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Once the main process has exited, pipes are drained for at most this long: background
/// processes it left behind may hold them open and keep writing.
const DRAIN_LIMIT: Duration = Duration::from_millis(500);
const READ_CHUNK: usize = 64 * 1024;

/// A running command.
pub struct Spawned {
    pub child: Child,
    /// The command's input: a pipe, or the terminal's master side.
    pub stdin: Option<File>,
    /// The terminal's master side (for resizing), when the command runs on one.
    pub terminal: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    pidfd: OwnedFd,
}

/// How following the output ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    Exited,
    DeadlinePassed,
}

/// A display form of a command for listings and logs, at most 200 characters.
pub fn describe(command: &Command) -> String {
    let full = match command {
        Command::Shell(line) => line.clone(),
        Command::Argv(argv) => argv.join(" "),
    };
    match full.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &full[..cut]),
        None => full,
    }
}

/// Starts `command` in a new process group with exactly `env`, in `cwd`, as `user` (None: root).
pub fn spawn(
    command: &Command,
    env: &[(String, String)],
    cwd: &Path,
    with_stdin: bool,
    user: Option<&Identity>,
) -> Result<Spawned, OpError> {
    let mut cmd = prepare(command, env, cwd, user)?;
    // SAFETY: the hook runs in the child between fork and exec and only calls sigemptyset and
    // pthread_sigmask on a local set, both async-signal-safe.
    unsafe { cmd.pre_exec(crate::sys::process::unblock_all_signals) };
    cmd.process_group(0)
        .stdin(if with_stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, pidfd) = start(cmd, command)?;
    let stdout = child.stdout.take().map(|p| File::from(OwnedFd::from(p)));
    let stderr = child.stderr.take().map(|p| File::from(OwnedFd::from(p)));
    for pipe in stdout.iter().chain(stderr.iter()) {
        if let Err(e) = crate::sys::process::set_nonblocking(pipe.as_raw_fd()) {
            abandon(&mut child);
            return Err(OpError::io("output pipe", &e));
        }
    }
    let stdin = child.stdin.take().map(|p| File::from(OwnedFd::from(p)));
    Ok(Spawned { child, stdin, terminal: None, stdout, stderr, pidfd })
}

/// Starts `command` on a new pseudo-terminal of `size`: it leads a new session with the
/// terminal as its controlling terminal, stdin, stdout and stderr. Everything the terminal
/// prints arrives as stdout; `stdin` and `terminal` are the master side.
pub fn spawn_terminal(
    command: &Command,
    env: &[(String, String)],
    cwd: &Path,
    size: WindowSize,
    user: Option<&Identity>,
) -> Result<Spawned, OpError> {
    let mut cmd = prepare(command, env, cwd, user)?;
    let pty::Terminal { master, slave } =
        pty::open(size).map_err(|e| OpError::io("cannot open a pseudo-terminal", &e))?;
    let copies = slave.try_clone().and_then(|a| Ok((a, slave.try_clone()?)));
    let (stdin, stdout) = copies.map_err(|e| OpError::io("terminal slave", &e))?;
    cmd.stdin(Stdio::from(stdin)).stdout(Stdio::from(stdout)).stderr(Stdio::from(slave));
    // SAFETY: the hook runs in the child between fork and exec (after std has put the slave on
    // fds 0-2) and only makes async-signal-safe calls: sigemptyset, pthread_sigmask, setsid,
    // ioctl.
    unsafe {
        cmd.pre_exec(|| {
            crate::sys::process::unblock_all_signals()?;
            pty::take_as_controlling_terminal()
        })
    };
    // `start` drops `cmd` and with it the agent's copies of the slave, so reading the master
    // ends once the command and whatever it started have closed theirs.
    let (mut child, pidfd) = start(cmd, command)?;
    let halves = crate::sys::process::set_nonblocking(master.as_raw_fd())
        .and_then(|()| Ok((master.try_clone()?, master.try_clone()?)));
    let (output, input) = match halves {
        Ok(halves) => halves,
        Err(e) => {
            abandon(&mut child);
            return Err(OpError::io("terminal master", &e));
        }
    };
    Ok(Spawned { child, stdin: Some(input), terminal: Some(master), stdout: Some(output), stderr: None, pidfd })
}

/// The command with its program checked for NUL bytes, `cwd` checked to be a directory, exactly
/// `env`, and `user`'s ids (std drops root's supplementary groups with them); stdio and the
/// child-side hook are the caller's.
fn prepare(
    command: &Command,
    env: &[(String, String)],
    cwd: &Path,
    user: Option<&Identity>,
) -> Result<std::process::Command, OpError> {
    let mut cmd = match command {
        Command::Shell(line) => {
            if line.contains('\0') {
                return Err(OpError::bad_request("command line contains a NUL byte"));
            }
            let mut cmd = std::process::Command::new("/bin/sh");
            cmd.arg("-c").arg(line);
            cmd
        }
        Command::Argv(argv) => {
            let Some(program) = argv.first().filter(|p| !p.is_empty()) else {
                return Err(OpError::bad_request("empty argv"));
            };
            if argv.iter().any(|a| a.contains('\0')) {
                return Err(OpError::bad_request("argument contains a NUL byte"));
            }
            let mut cmd = std::process::Command::new(program);
            cmd.args(&argv[1..]);
            cmd
        }
    };
    match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(OpError::new(
                agent_protocol::ErrorCode::NotADirectory,
                format!("working directory {} is not a directory", cwd.display()),
            ))
        }
        Err(e) => return Err(OpError::io(format!("working directory {}", cwd.display()), &e)),
    }
    // std keeps the caller's signal mask across exec; a command must not start with signals
    // blocked (PID 1 blocks the ones it reads from a signalfd, and the mask is inherited), so
    // every caller's pre_exec hook unblocks them.
    cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v))).current_dir(cwd);
    if let Some(user) = user {
        cmd.uid(user.uid).gid(user.gid);
    }
    Ok(cmd)
}

/// Spawns `cmd` (dropping it, and with it the parent's copies of the child's stdio) and opens
/// a pidfd for the child.
fn start(mut cmd: std::process::Command, command: &Command) -> Result<(Child, OwnedFd), OpError> {
    let spawned = cmd.spawn();
    drop(cmd);
    let mut child = spawned.map_err(|e| {
        let program = match command {
            Command::Shell(_) => "/bin/sh",
            Command::Argv(argv) => argv[0].as_str(),
        };
        OpError::io(format!("cannot start {program}"), &e)
    })?;
    match pidfd_open(child.id()) {
        Ok(fd) => Ok((child, fd)),
        Err(e) => {
            abandon(&mut child);
            Err(OpError::io("pidfd_open", &e))
        }
    }
}

/// Kills a child that cannot be followed, and reaps it.
fn abandon(child: &mut Child) {
    let _ = kill_group(child.id() as libc::pid_t, libc::SIGKILL);
    let _ = child.wait();
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and has no memory arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a fresh (close-on-exec) descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Hands output to `sink` as it arrives until the main process exits or `deadline` passes.
    /// A sink error (the client went away) stops the loop and is returned.
    pub fn follow(
        &mut self,
        deadline: Option<Instant>,
        sink: &mut dyn FnMut(OutputStream, &[u8]) -> io::Result<()>,
    ) -> io::Result<Waited> {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let mut fds = vec![libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            for pipe in [
                self.stdout.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
                self.stderr.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
            ]
            .into_iter()
            .flatten()
            {
                fds.push(libc::pollfd { fd: pipe, events: libc::POLLIN, revents: 0 });
            }
            let timeout_ms = match deadline {
                None => -1,
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(Waited::DeadlinePassed);
                    }
                    // Round up so the loop never spins on a sub-millisecond remainder.
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
                }
            };
            // SAFETY: `fds` is a live array of exactly `fds.len()` pollfd structs.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if ready < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let readable = |fd: RawFd| {
                fds.iter().any(|p| p.fd == fd && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
            };
            let exited = readable(self.pidfd.as_raw_fd());
            if self.stdout.as_ref().is_some_and(|p| readable(p.as_raw_fd())) {
                read_once(&mut self.stdout, OutputStream::Stdout, &mut buf, sink)?;
            }
            if self.stderr.as_ref().is_some_and(|p| readable(p.as_raw_fd())) {
                read_once(&mut self.stderr, OutputStream::Stderr, &mut buf, sink)?;
            }
            if exited {
                return Ok(Waited::Exited);
            }
        }
    }

    /// After the main process ended: passes on what is left in the pipes (bounded in time),
    /// then closes them.
    pub fn drain(&mut self, sink: &mut dyn FnMut(OutputStream, &[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut buf = vec![0u8; READ_CHUNK];
        let until = Instant::now() + DRAIN_LIMIT;
        while (self.stdout.is_some() || self.stderr.is_some()) && Instant::now() < until {
            let got_out = read_once(&mut self.stdout, OutputStream::Stdout, &mut buf, sink)?;
            let got_err = read_once(&mut self.stderr, OutputStream::Stderr, &mut buf, sink)?;
            if !got_out && !got_err {
                break;
            }
        }
        self.stdout = None;
        self.stderr = None;
        Ok(())
    }

    /// Signals the whole process group.
    pub fn signal_group(&self, signal: libc::c_int) -> io::Result<()> {
        kill_group(self.child.id() as libc::pid_t, signal)
    }

    /// Reaps the main process (call once it has exited or been killed).
    pub fn reap(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait()?;
        Ok(match (status.code(), status.signal()) {
            (Some(code), _) => ExitStatus::Code(code),
            (None, Some(sig)) => ExitStatus::Signal(sig),
            (None, None) => ExitStatus::Code(-1),
        })
    }

    /// Kills the process group and reaps the main process: the path for every abandoned command.
    pub fn kill_and_reap(&mut self) -> io::Result<ExitStatus> {
        // ESRCH (everything already gone) is fine.
        let _ = self.signal_group(libc::SIGKILL);
        self.reap()
    }
}

/// One non-blocking read from `pipe`; returns whether it produced data. EOF or a read error
/// closes the pipe.
fn read_once(
    pipe: &mut Option<impl Read>,
    stream: OutputStream,
    buf: &mut [u8],
    sink: &mut dyn FnMut(OutputStream, &[u8]) -> io::Result<()>,
) -> io::Result<bool> {
    let Some(reader) = pipe.as_mut() else { return Ok(false) };
    match reader.read(buf) {
        Ok(0) => {
            *pipe = None;
            Ok(false)
        }
        Ok(n) => {
            sink(stream, &buf[..n])?;
            Ok(true)
        }
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => Ok(false),
        Err(_) => {
            *pipe = None;
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![("PATH".into(), "/usr/bin:/bin".into())]
    }

    fn collect(sp: &mut Spawned, deadline: Option<Instant>) -> (Waited, Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut sink = |s: OutputStream, d: &[u8]| -> io::Result<()> {
            match s {
                OutputStream::Stdout => out.extend_from_slice(d),
                OutputStream::Stderr => err.extend_from_slice(d),
            }
            Ok(())
        };
        let waited = sp.follow(deadline, &mut sink).unwrap();
        sp.drain(&mut sink).unwrap();
        (waited, out, err)
    }

    #[test]
    fn output_and_exit_are_seen() {
        let mut sp =
            spawn(&Command::Shell("echo out; echo err >&2; exit 3".into()), &env(), Path::new("/"), false, None)
                .unwrap();
        let (waited, out, err) = collect(&mut sp, None);
        assert_eq!(waited, Waited::Exited);
        assert_eq!((out.as_slice(), err.as_slice()), (&b"out\n"[..], &b"err\n"[..]));
        assert_eq!(sp.reap().unwrap(), ExitStatus::Code(3));
    }

    #[test]
    fn the_deadline_stops_following() {
        let mut sp =
            spawn(&Command::Argv(vec!["sleep".into(), "5".into()]), &env(), Path::new("/"), false, None).unwrap();
        let started = Instant::now();
        let (waited, _, _) = collect(&mut sp, Some(Instant::now() + Duration::from_millis(100)));
        assert_eq!(waited, Waited::DeadlinePassed);
        assert_eq!(sp.kill_and_reap().unwrap(), ExitStatus::Signal(libc::SIGKILL));
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn bad_commands_are_refused_with_clear_errors() {
        let e = spawn(&Command::Argv(vec![]), &env(), Path::new("/"), false, None).err().unwrap();
        assert_eq!(e.code, agent_protocol::ErrorCode::BadRequest);
        let e =
            spawn(&Command::Argv(vec!["/no/such/program".into()]), &env(), Path::new("/"), false, None).err().unwrap();
        assert_eq!(e.code, agent_protocol::ErrorCode::NotFound);
        assert!(e.message.contains("/no/such/program"), "{}", e.message);
        let e = spawn(&Command::Shell("true".into()), &env(), Path::new("/no/such/dir"), false, None).err().unwrap();
        assert_eq!(e.code, agent_protocol::ErrorCode::NotFound);
        assert!(e.message.contains("working directory"), "{}", e.message);
    }

    #[test]
    fn commands_start_with_no_signals_blocked_even_if_the_caller_blocks_some() {
        // PID 1 blocks the signals it reads from a signalfd; commands must not inherit that
        // mask (std keeps it across exec, so `spawn` clears it).
        // SAFETY: an all-zero sigset_t is valid input for sigemptyset, which initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a live sigset_t; these calls only write it and this thread's mask.
        unsafe {
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, libc::SIGTERM);
            libc::sigaddset(&raw mut set, libc::SIGINT);
            assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()), 0);
        }
        let argv = ["grep", "SigBlk", "/proc/self/status"].map(String::from).to_vec();
        let mut sp = spawn(&Command::Argv(argv), &env(), Path::new("/"), false, None).unwrap();
        let (_, out, _) = collect(&mut sp, None);
        // SAFETY: as above; restores this test thread's mask.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &raw const set, std::ptr::null_mut()) };
        assert_eq!(String::from_utf8(out).unwrap().trim(), "SigBlk:\t0000000000000000");
    }

    #[test]
    fn commands_do_not_inherit_an_ignored_sigpipe() {
        // The Rust runtime ignores SIGPIPE in the agent; `yes | head` must still end normally.
        let argv = ["grep", "SigIgn", "/proc/self/status"].map(String::from).to_vec();
        let mut sp = spawn(&Command::Argv(argv), &env(), Path::new("/"), false, None).unwrap();
        let (_, out, _) = collect(&mut sp, None);
        let text = String::from_utf8(out).unwrap();
        let mask = u64::from_str_radix(text.trim().trim_start_matches("SigIgn:").trim(), 16).unwrap();
        assert_eq!(mask & (1 << (libc::SIGPIPE - 1)), 0, "{text}");
    }

    #[test]
    fn a_command_runs_as_the_user_it_is_given() {
        // SAFETY: geteuid only reads this process's credentials.
        if unsafe { libc::geteuid() } != 0 {
            println!("skipped: changing user needs root");
            return;
        }
        let nobody = Identity { uid: 65534, gid: 65533, home: "/".into() };
        let argv = ["sh", "-c", "id -u; id -g; id -G"].map(String::from).to_vec();
        let mut sp = spawn(&Command::Argv(argv), &env(), Path::new("/"), false, Some(&nobody)).unwrap();
        let (_, out, _) = collect(&mut sp, None);
        // Root's supplementary groups are dropped with the change.
        assert_eq!(String::from_utf8(out).unwrap(), "65534\n65533\n65533\n");
    }

    #[test]
    fn long_commands_are_shortened_for_display() {
        assert_eq!(describe(&Command::Argv(vec!["ls".into(), "-l".into()])), "ls -l");
        let long = describe(&Command::Shell("é".repeat(300)));
        assert!(long.ends_with("...") && long.chars().count() == 203);
    }
}

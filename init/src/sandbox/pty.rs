//! Pseudo-terminals for interactive sessions: opening a master/slave pair, making the slave the
//! controlling terminal of a child, and setting the window size (which sends SIGWINCH).

use agent_protocol::{Command, WindowSize};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The `TERM` a terminal session gets unless its request sets one.
pub const TERM: &str = "xterm-256color";

/// A freshly opened pseudo-terminal. The master stays with the agent; the slave becomes the
/// child's stdin, stdout and stderr, and the agent's copy must be dropped once the child runs
/// (reading the master reports the end only when no slave descriptor is left open).
pub struct Terminal {
    pub master: File,
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal of `size`. Both descriptors are close-on-exec from the start (the
/// agent starts commands from many threads, and no other command may inherit them) and
/// `O_NOCTTY` (the agent never takes a terminal as its own).
pub fn open(size: WindowSize) -> io::Result<Terminal> {
    let master = OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open("/dev/ptmx")?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer, which is live for the call.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &raw const unlock) })?;
    let slave = open_peer(&master)?;
    set_size(&master, size)?;
    Ok(Terminal { master, slave })
}

/// The slave side of `master`: TIOCGPTPEER opens it without a path lookup (Linux 4.13+);
/// older kernels fall back to `/dev/pts/N`.
fn open_peer(master: &File) -> io::Result<OwnedFd> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes its flags by value and returns a new descriptor or -1.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd >= 0 {
        // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY)) {
        return Err(err);
    }
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int through the pointer, which is live and writable.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &raw mut number) })?;
    let slave =
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(format!("/dev/pts/{number}"))?;
    Ok(slave.into())
}

/// Sets the terminal's size; the foreground process group of the terminal gets SIGWINCH.
pub fn set_size(master: &File, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is live for the call.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &raw const ws) })
}

/// For the child, between fork and exec, once the slave is its fd 0: a new session (so it is
/// the session leader and its own process group), with the slave as its controlling terminal.
/// Only async-signal-safe calls (setsid, ioctl).
pub fn take_as_controlling_terminal() -> io::Result<()> {
    // SAFETY: setsid takes no arguments.
    check(unsafe { libc::setsid() })?;
    // SAFETY: TIOCSCTTY takes an int by value (0: do not steal it from another session).
    check(unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 0 as libc::c_int) })
}

/// What a terminal runs when the request names no command: a login shell, bash where the
/// template has it.
pub fn login_shell() -> Command {
    let shell = if Path::new("/bin/bash").exists() { "/bin/bash" } else { "/bin/sh" };
    Command::Argv(vec![shell.into(), "-l".into()])
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of(fd: RawFd) -> (u16, u16) {
        // SAFETY: an all-zero winsize is a valid value.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which is live and writable.
        assert_eq!(unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &raw mut ws) }, 0);
        (ws.ws_col, ws.ws_row)
    }

    #[test]
    fn a_terminal_opens_with_its_size_and_is_resized() {
        let terminal = open(WindowSize { cols: 80, rows: 24 }).unwrap();
        assert_eq!(size_of(terminal.slave.as_raw_fd()), (80, 24));
        set_size(&terminal.master, WindowSize { cols: 120, rows: 40 }).unwrap();
        assert_eq!(size_of(terminal.slave.as_raw_fd()), (120, 40));
        // SAFETY: isatty takes a descriptor by value.
        assert_eq!(unsafe { libc::isatty(terminal.slave.as_raw_fd()) }, 1);
    }

    #[test]
    fn both_sides_are_close_on_exec() {
        let terminal = open(WindowSize { cols: 10, rows: 10 }).unwrap();
        for fd in [terminal.master.as_raw_fd(), terminal.slave.as_raw_fd()] {
            // SAFETY: F_GETFD on a descriptor this test owns.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
    }
}

//! The messages of the agent protocol: requests (appliance to agent), replies (agent to
//! appliance) and the values they carry, each with its frame kind and field encoding.
//! PROTOCOL.md in this folder is the human-readable form of this file; keep them in step.

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::frame;
use std::fmt;

/// What to execute: a shell line run by `/bin/sh -c`, or an argv executed directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Shell(String),
    Argv(Vec<String>),
}

/// Environment variables. Values may be sealed tokens: `Debug` shows names only, so a request
/// printed in a log line never carries them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EnvVars(pub Vec<(String, String)>);

impl fmt::Debug for EnvVars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(name, _)| format!("{name}=<redacted>"))).finish()
    }
}

/// A foreground command: runs to completion, its output streamed back, bounded per stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    pub command: Command,
    pub env: EnvVars,
    /// Working directory; None means the agent's home directory.
    pub cwd: Option<String>,
    /// 0 means no limit.
    pub timeout_ms: u64,
    /// Bytes of stdout and of stderr (each) sent back; the rest is read and discarded.
    pub max_output: u64,
    /// Who runs it (`name`, `uid`, `name:group` or `uid:gid`, as an image's `User`); None: root.
    pub user: Option<String>,
}

/// A background session: runs independently of any connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpec {
    pub command: Command,
    pub env: EnvVars,
    pub cwd: Option<String>,
    pub user: Option<String>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub cols: u16,
    pub rows: u16,
}

/// The largest side of a terminal either end accepts; 0 is never valid.
pub const MAX_WINDOW_SIDE: u16 = 1000;

impl WindowSize {
    /// Both sides within 1..=`MAX_WINDOW_SIDE`.
    pub fn is_valid(self) -> bool {
        (1..=MAX_WINDOW_SIDE).contains(&self.cols) && (1..=MAX_WINDOW_SIDE).contains(&self.rows)
    }
}

/// An interactive session: a session whose process runs on a pseudo-terminal instead of pipes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtySpec {
    /// None: the agent's login shell (`/bin/bash -l`, or `/bin/sh -l` without bash).
    pub command: Option<Command>,
    pub env: EnvVars,
    /// None: the agent's home directory.
    pub cwd: Option<String>,
    pub size: WindowSize,
    pub user: Option<String>,
}

/// An atomic file replacement: the data follows in `Data` frames after the agent's `Ok`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSpec {
    pub path: String,
    /// Permission bits for a new file; an existing file keeps its own. None: 0644.
    pub mode: Option<u32>,
    pub create_parents: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention: the exit code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(sig) => 128 + sig,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunExit {
    pub status: ExitStatus,
    pub timed_out: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: u32,
    pub pid: u32,
    /// A display form of the command, shortened if long.
    pub command: String,
    /// None while the session runs.
    pub exit: Option<ExitStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub is_dir: bool,
    pub path: String,
    /// Bytes for files, 0 for directories.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStat {
    pub path: String,
    pub name: String,
    pub is_dir: bool,
    pub is_symlink: bool,
    pub size: u64,
    /// Permission bits (st_mode & 0o7777).
    pub mode: u32,
    /// Modification time, milliseconds since the Unix epoch.
    pub modified_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Off,
    Reboot,
}

/// Why the agent refused or failed a request. Unknown codes from a newer agent are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The bytes were not a frame (bad magic); the agent closes the connection.
    BadFrame,
    /// Payload length beyond the limit; the agent closes the connection.
    FrameTooLarge,
    UnsupportedVersion,
    /// A well-framed payload that is not a valid request, or a request out of place.
    BadRequest,
    NotFound,
    PermissionDenied,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    DirectoryNotEmpty,
    /// A size limit given by the request was exceeded.
    TooLarge,
    /// The agent is at its connection or session limit.
    Busy,
    /// A frame was started but not completed in time; the agent closes the connection.
    Timeout,
    /// The target is in a state that forbids the request (e.g. the session has exited).
    Conflict,
    /// Any other operating-system failure; the message says which.
    Io,
    /// The file system (or the user's quota) is full: a write could not be completed.
    NoSpace,
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::BadFrame => 1,
            ErrorCode::FrameTooLarge => 2,
            ErrorCode::UnsupportedVersion => 3,
            ErrorCode::BadRequest => 4,
            ErrorCode::NotFound => 5,
            ErrorCode::PermissionDenied => 6,
            ErrorCode::AlreadyExists => 7,
            ErrorCode::NotADirectory => 8,
            ErrorCode::IsADirectory => 9,
            ErrorCode::DirectoryNotEmpty => 10,
            ErrorCode::TooLarge => 11,
            ErrorCode::Busy => 12,
            ErrorCode::Timeout => 13,
            ErrorCode::Conflict => 14,
            ErrorCode::Io => 15,
            ErrorCode::NoSpace => 16,
            ErrorCode::Other(n) => n,
        }
    }

    pub fn from_u16(n: u16) -> ErrorCode {
        match n {
            1 => ErrorCode::BadFrame,
            2 => ErrorCode::FrameTooLarge,
            3 => ErrorCode::UnsupportedVersion,
            4 => ErrorCode::BadRequest,
            5 => ErrorCode::NotFound,
            6 => ErrorCode::PermissionDenied,
            7 => ErrorCode::AlreadyExists,
            8 => ErrorCode::NotADirectory,
            9 => ErrorCode::IsADirectory,
            10 => ErrorCode::DirectoryNotEmpty,
            11 => ErrorCode::TooLarge,
            12 => ErrorCode::Busy,
            13 => ErrorCode::Timeout,
            14 => ErrorCode::Conflict,
            15 => ErrorCode::Io,
            16 => ErrorCode::NoSpace,
            other => ErrorCode::Other(other),
        }
    }
}

/// Frames sent by the appliance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
    Run(RunSpec),
    SessionStart(SessionSpec),
    SessionList,
    SessionKill {
        id: u32,
        signal: i32,
    },
    /// Takes over the connection: output streams back until the session ends.
    SessionAttach {
        id: u32,
    },
    SessionStdin {
        id: u32,
        data: Vec<u8>,
    },
    /// Starts a session on a pseudo-terminal; answered like `SessionStart`.
    PtyStart(PtySpec),
    /// Sets the terminal size of a session started with `PtyStart`.
    SessionResize {
        id: u32,
        size: WindowSize,
    },
    /// `limit` 0 means no limit.
    FileRead {
        path: String,
        limit: u64,
    },
    FileWrite(WriteSpec),
    FileList {
        path: String,
    },
    FileStat {
        path: String,
    },
    Mkdir {
        path: String,
    },
    Remove {
        path: String,
        recursive: bool,
    },
    /// The sandbox was resumed from a snapshot: set the wall clock (nanoseconds since the Unix
    /// epoch, the appliance's clock) and mix `entropy` into the kernel's random pool, so that two
    /// sandboxes resumed from one snapshot do not share random output.
    Resumed {
        wall_clock_ns: u64,
        entropy: Vec<u8>,
    },
    /// The sandbox's hostname (a guest resumed from another sandbox's snapshot still has that
    /// one's). A request of its own, so an agent that predates it answers "unknown request".
    SetHostname {
        name: String,
    },
    /// Writes every dirty page of the guest's file systems to its disks (sync(2)), answered once
    /// done: the root disk then holds every file written before it, for a copy of the disk.
    SyncDisks,
    /// Moves a file or directory (rename(2): within one file system, replacing a file at `to`).
    Rename {
        from: String,
        to: String,
    },
    SetEnv {
        set: EnvVars,
        unset: Vec<String>,
    },
    InstallCa {
        pem: Vec<u8>,
    },
    Power(Power),
    /// A chunk of a file write.
    Data(Vec<u8>),
    /// The end of a file write.
    DataEnd,
    /// Input for the attached session.
    Stdin(Vec<u8>),
    /// Closes the attached session's stdin.
    StdinClose,
}

/// Frames sent by the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Error {
        code: ErrorCode,
        message: String,
    },
    Pong {
        protocol: u8,
        agent_version: String,
    },
    Output {
        stream: OutputStream,
        data: Vec<u8>,
    },
    Exited(RunExit),
    SessionStarted {
        id: u32,
        pid: u32,
    },
    Sessions(Vec<SessionInfo>),
    SessionEnded(ExitStatus),
    Data(Vec<u8>),
    DataEnd {
        size: u64,
    },
    DirEntries {
        entries: Vec<DirEntry>,
        more: bool,
    },
    Stat(FileStat),
    CaInstalled {
        bundle_path: String,
    },
    Written {
        size: u64,
    },
    /// After an attach's replay of earlier output: what follows is live.
    ReplayEnd,
}

mod kind {
    pub const PING: u8 = 0x01;
    pub const RUN: u8 = 0x02;
    pub const SESSION_START: u8 = 0x03;
    pub const SESSION_LIST: u8 = 0x04;
    pub const SESSION_KILL: u8 = 0x05;
    pub const SESSION_ATTACH: u8 = 0x06;
    pub const SESSION_STDIN: u8 = 0x07;
    pub const FILE_READ: u8 = 0x08;
    pub const FILE_WRITE: u8 = 0x09;
    pub const FILE_LIST: u8 = 0x0A;
    pub const FILE_STAT: u8 = 0x0B;
    pub const MKDIR: u8 = 0x0C;
    pub const REMOVE: u8 = 0x0D;
    pub const SET_ENV: u8 = 0x0E;
    pub const INSTALL_CA: u8 = 0x0F;
    pub const POWER: u8 = 0x10;
    pub const PTY_START: u8 = 0x11;
    pub const SESSION_RESIZE: u8 = 0x12;
    pub const RESUMED: u8 = 0x13;
    pub const SET_HOSTNAME: u8 = 0x14;
    pub const SYNC_DISKS: u8 = 0x15;
    pub const RENAME: u8 = 0x1F;
    pub const DATA: u8 = 0x20;
    pub const DATA_END: u8 = 0x21;
    pub const STDIN: u8 = 0x22;
    pub const STDIN_CLOSE: u8 = 0x23;

    pub const OK: u8 = 0x80;
    pub const ERROR: u8 = 0x81;
    pub const PONG: u8 = 0x82;
    pub const OUTPUT: u8 = 0x83;
    pub const EXITED: u8 = 0x84;
    pub const SESSION_STARTED: u8 = 0x85;
    pub const SESSIONS: u8 = 0x86;
    pub const SESSION_ENDED: u8 = 0x87;
    pub const R_DATA: u8 = 0x88;
    pub const R_DATA_END: u8 = 0x89;
    pub const DIR_ENTRIES: u8 = 0x8A;
    pub const STAT: u8 = 0x8B;
    pub const CA_INSTALLED: u8 = 0x8C;
    pub const WRITTEN: u8 = 0x8D;
    pub const REPLAY_END: u8 = 0x8E;
}

impl Request {
    pub fn kind(&self) -> u8 {
        match self {
            Request::Ping => kind::PING,
            Request::Run(_) => kind::RUN,
            Request::SessionStart(_) => kind::SESSION_START,
            Request::SessionList => kind::SESSION_LIST,
            Request::SessionKill { .. } => kind::SESSION_KILL,
            Request::SessionAttach { .. } => kind::SESSION_ATTACH,
            Request::SessionStdin { .. } => kind::SESSION_STDIN,
            Request::PtyStart(_) => kind::PTY_START,
            Request::SessionResize { .. } => kind::SESSION_RESIZE,
            Request::FileRead { .. } => kind::FILE_READ,
            Request::FileWrite(_) => kind::FILE_WRITE,
            Request::FileList { .. } => kind::FILE_LIST,
            Request::FileStat { .. } => kind::FILE_STAT,
            Request::Mkdir { .. } => kind::MKDIR,
            Request::Remove { .. } => kind::REMOVE,
            Request::Resumed { .. } => kind::RESUMED,
            Request::SetHostname { .. } => kind::SET_HOSTNAME,
            Request::SyncDisks => kind::SYNC_DISKS,
            Request::Rename { .. } => kind::RENAME,
            Request::SetEnv { .. } => kind::SET_ENV,
            Request::InstallCa { .. } => kind::INSTALL_CA,
            Request::Power(_) => kind::POWER,
            Request::Data(_) => kind::DATA,
            Request::DataEnd => kind::DATA_END,
            Request::Stdin(_) => kind::STDIN,
            Request::StdinClose => kind::STDIN_CLOSE,
        }
    }

    /// A short name for log lines (never the content).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Run(_) => "run",
            Request::SessionStart(_) => "session-start",
            Request::SessionList => "session-list",
            Request::SessionKill { .. } => "session-kill",
            Request::SessionAttach { .. } => "session-attach",
            Request::SessionStdin { .. } => "session-stdin",
            Request::PtyStart(_) => "pty-start",
            Request::SessionResize { .. } => "session-resize",
            Request::FileRead { .. } => "file-read",
            Request::FileWrite(_) => "file-write",
            Request::FileList { .. } => "file-list",
            Request::FileStat { .. } => "file-stat",
            Request::Mkdir { .. } => "mkdir",
            Request::Remove { .. } => "remove",
            Request::Resumed { .. } => "resumed",
            Request::SetHostname { .. } => "set-hostname",
            Request::SyncDisks => "sync-disks",
            Request::Rename { .. } => "rename",
            Request::SetEnv { .. } => "set-env",
            Request::InstallCa { .. } => "install-ca",
            Request::Power(_) => "power",
            Request::Data(_) => "data",
            Request::DataEnd => "data-end",
            Request::Stdin(_) => "stdin",
            Request::StdinClose => "stdin-close",
        }
    }

    /// The complete frame (header and payload); fails if the payload exceeds the frame limit.
    pub fn to_frame(&self) -> Result<Vec<u8>, frame::FrameError> {
        let mut e = Encoder::with_reserved(frame::HEADER_LEN);
        match self {
            Request::Ping | Request::SessionList | Request::SyncDisks | Request::DataEnd | Request::StdinClose => {}
            Request::Run(spec) => {
                encode_command(&mut e, &spec.command);
                e.pairs(&spec.env.0);
                e.opt_str(spec.cwd.as_deref());
                e.u64(spec.timeout_ms);
                e.u64(spec.max_output);
                encode_user(&mut e, spec.user.as_deref());
            }
            Request::SessionStart(spec) => {
                encode_command(&mut e, &spec.command);
                e.pairs(&spec.env.0);
                e.opt_str(spec.cwd.as_deref());
                encode_user(&mut e, spec.user.as_deref());
            }
            Request::SessionKill { id, signal } => {
                e.u32(*id);
                e.i32(*signal);
            }
            Request::SessionAttach { id } => e.u32(*id),
            Request::SessionStdin { id, data } => {
                e.u32(*id);
                e.bytes(data);
            }
            Request::PtyStart(spec) => {
                match &spec.command {
                    None => e.u8(0),
                    Some(command) => encode_command(&mut e, command),
                }
                e.pairs(&spec.env.0);
                e.opt_str(spec.cwd.as_deref());
                encode_size(&mut e, spec.size);
                encode_user(&mut e, spec.user.as_deref());
            }
            Request::SessionResize { id, size } => {
                e.u32(*id);
                encode_size(&mut e, *size);
            }
            Request::FileRead { path, limit } => {
                e.str(path);
                e.u64(*limit);
            }
            Request::FileWrite(spec) => {
                e.str(&spec.path);
                match spec.mode {
                    None => e.u8(0),
                    Some(mode) => {
                        e.u8(1);
                        e.u32(mode);
                    }
                }
                e.bool(spec.create_parents);
            }
            Request::FileList { path } | Request::FileStat { path } | Request::Mkdir { path } => e.str(path),
            Request::Remove { path, recursive } => {
                e.str(path);
                e.bool(*recursive);
            }
            Request::Resumed { wall_clock_ns, entropy } => {
                e.u64(*wall_clock_ns);
                e.bytes(entropy);
            }
            Request::SetHostname { name } => e.str(name),
            Request::Rename { from, to } => {
                e.str(from);
                e.str(to);
            }
            Request::SetEnv { set, unset } => {
                e.pairs(&set.0);
                e.strings(unset);
            }
            Request::InstallCa { pem } => e.bytes(pem),
            Request::Power(action) => e.u8(match action {
                Power::Off => 1,
                Power::Reboot => 2,
            }),
            Request::Data(data) | Request::Stdin(data) => e.bytes(data),
        }
        frame::seal(e.into_inner(), self.kind())
    }

    pub fn decode(kind: u8, payload: &[u8]) -> Result<Request, DecodeError> {
        let mut d = Decoder::new(payload);
        let request = match kind {
            kind::PING => Request::Ping,
            kind::RUN => Request::Run(RunSpec {
                command: decode_command(&mut d)?,
                env: EnvVars(d.pairs()?),
                cwd: d.opt_string()?,
                timeout_ms: d.u64()?,
                max_output: d.u64()?,
                user: decode_user(&mut d)?,
            }),
            kind::SESSION_START => Request::SessionStart(SessionSpec {
                command: decode_command(&mut d)?,
                env: EnvVars(d.pairs()?),
                cwd: d.opt_string()?,
                user: decode_user(&mut d)?,
            }),
            kind::SESSION_LIST => Request::SessionList,
            kind::SESSION_KILL => Request::SessionKill { id: d.u32()?, signal: d.i32()? },
            kind::SESSION_ATTACH => Request::SessionAttach { id: d.u32()? },
            kind::SESSION_STDIN => Request::SessionStdin { id: d.u32()?, data: d.bytes()? },
            kind::PTY_START => Request::PtyStart(PtySpec {
                // Tag 0 is "absent"; 1 and 2 are the command tags themselves.
                command: match d.u8()? {
                    0 => None,
                    tag => Some(decode_command_body(&mut d, tag)?),
                },
                env: EnvVars(d.pairs()?),
                cwd: d.opt_string()?,
                size: decode_size(&mut d)?,
                user: decode_user(&mut d)?,
            }),
            kind::SESSION_RESIZE => Request::SessionResize { id: d.u32()?, size: decode_size(&mut d)? },
            kind::FILE_READ => Request::FileRead { path: d.string()?, limit: d.u64()? },
            kind::FILE_WRITE => {
                let path = d.string()?;
                let mode = match d.u8()? {
                    0 => None,
                    1 => Some(d.u32()?),
                    other => return Err(DecodeError(format!("invalid mode tag {other}"))),
                };
                Request::FileWrite(WriteSpec { path, mode, create_parents: d.bool()? })
            }
            kind::FILE_LIST => Request::FileList { path: d.string()? },
            kind::FILE_STAT => Request::FileStat { path: d.string()? },
            kind::MKDIR => Request::Mkdir { path: d.string()? },
            kind::REMOVE => Request::Remove { path: d.string()?, recursive: d.bool()? },
            kind::RESUMED => Request::Resumed { wall_clock_ns: d.u64()?, entropy: d.bytes()? },
            kind::SET_HOSTNAME => Request::SetHostname { name: d.string()? },
            kind::SYNC_DISKS => Request::SyncDisks,
            kind::RENAME => Request::Rename { from: d.string()?, to: d.string()? },
            kind::SET_ENV => Request::SetEnv { set: EnvVars(d.pairs()?), unset: d.strings()? },
            kind::INSTALL_CA => Request::InstallCa { pem: d.bytes()? },
            kind::POWER => Request::Power(match d.u8()? {
                1 => Power::Off,
                2 => Power::Reboot,
                other => return Err(DecodeError(format!("invalid power action {other}"))),
            }),
            kind::DATA => Request::Data(d.bytes()?),
            kind::DATA_END => Request::DataEnd,
            kind::STDIN => Request::Stdin(d.bytes()?),
            kind::STDIN_CLOSE => Request::StdinClose,
            other => return Err(DecodeError(format!("unknown request kind 0x{other:02x}"))),
        };
        d.finish()?;
        Ok(request)
    }
}

impl Reply {
    pub fn kind(&self) -> u8 {
        match self {
            Reply::Ok => kind::OK,
            Reply::Error { .. } => kind::ERROR,
            Reply::Pong { .. } => kind::PONG,
            Reply::Output { .. } => kind::OUTPUT,
            Reply::Exited(_) => kind::EXITED,
            Reply::SessionStarted { .. } => kind::SESSION_STARTED,
            Reply::Sessions(_) => kind::SESSIONS,
            Reply::SessionEnded(_) => kind::SESSION_ENDED,
            Reply::Data(_) => kind::R_DATA,
            Reply::DataEnd { .. } => kind::R_DATA_END,
            Reply::DirEntries { .. } => kind::DIR_ENTRIES,
            Reply::Stat(_) => kind::STAT,
            Reply::CaInstalled { .. } => kind::CA_INSTALLED,
            Reply::Written { .. } => kind::WRITTEN,
            Reply::ReplayEnd => kind::REPLAY_END,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::Error { code, message: message.into() }
    }

    pub fn to_frame(&self) -> Result<Vec<u8>, frame::FrameError> {
        let mut e = Encoder::with_reserved(frame::HEADER_LEN);
        match self {
            Reply::Ok | Reply::ReplayEnd => {}
            Reply::Error { code, message } => {
                e.u16(code.to_u16());
                e.str(message);
            }
            Reply::Pong { protocol, agent_version } => {
                e.u8(*protocol);
                e.str(agent_version);
            }
            Reply::Output { stream, data } => {
                e.u8(match stream {
                    OutputStream::Stdout => 1,
                    OutputStream::Stderr => 2,
                });
                e.bytes(data);
            }
            Reply::Exited(exit) => {
                encode_status(&mut e, exit.status);
                e.bool(exit.timed_out);
                e.bool(exit.stdout_truncated);
                e.bool(exit.stderr_truncated);
                e.u64(exit.duration_ms);
            }
            Reply::SessionStarted { id, pid } => {
                e.u32(*id);
                e.u32(*pid);
            }
            Reply::Sessions(list) => {
                e.count(list.len());
                for s in list {
                    e.u32(s.id);
                    e.u32(s.pid);
                    e.str(&s.command);
                    match s.exit {
                        None => e.u8(0),
                        Some(status) => {
                            e.u8(1);
                            encode_status(&mut e, status);
                        }
                    }
                }
            }
            Reply::SessionEnded(status) => encode_status(&mut e, *status),
            Reply::Data(data) => e.bytes(data),
            Reply::DataEnd { size } | Reply::Written { size } => e.u64(*size),
            Reply::DirEntries { entries, more } => {
                e.count(entries.len());
                for entry in entries {
                    e.str(&entry.name);
                    e.bool(entry.is_dir);
                    e.str(&entry.path);
                    e.u64(entry.size);
                }
                e.bool(*more);
            }
            Reply::Stat(st) => {
                e.str(&st.path);
                e.str(&st.name);
                e.bool(st.is_dir);
                e.bool(st.is_symlink);
                e.u64(st.size);
                e.u32(st.mode);
                e.i64(st.modified_ms);
            }
            Reply::CaInstalled { bundle_path } => e.str(bundle_path),
        }
        frame::seal(e.into_inner(), self.kind())
    }

    pub fn decode(kind: u8, payload: &[u8]) -> Result<Reply, DecodeError> {
        let mut d = Decoder::new(payload);
        let reply = match kind {
            kind::OK => Reply::Ok,
            kind::ERROR => Reply::Error { code: ErrorCode::from_u16(d.u16()?), message: d.string()? },
            kind::PONG => Reply::Pong { protocol: d.u8()?, agent_version: d.string()? },
            kind::OUTPUT => {
                let stream = match d.u8()? {
                    1 => OutputStream::Stdout,
                    2 => OutputStream::Stderr,
                    other => return Err(DecodeError(format!("invalid output stream {other}"))),
                };
                Reply::Output { stream, data: d.bytes()? }
            }
            kind::EXITED => Reply::Exited(RunExit {
                status: decode_status(&mut d)?,
                timed_out: d.bool()?,
                stdout_truncated: d.bool()?,
                stderr_truncated: d.bool()?,
                duration_ms: d.u64()?,
            }),
            kind::SESSION_STARTED => Reply::SessionStarted { id: d.u32()?, pid: d.u32()? },
            kind::SESSIONS => {
                let n = d.count(13)?;
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = d.u32()?;
                    let pid = d.u32()?;
                    let command = d.string()?;
                    let exit = match d.u8()? {
                        0 => None,
                        1 => Some(decode_status(&mut d)?),
                        other => return Err(DecodeError(format!("invalid exit tag {other}"))),
                    };
                    list.push(SessionInfo { id, pid, command, exit });
                }
                Reply::Sessions(list)
            }
            kind::SESSION_ENDED => Reply::SessionEnded(decode_status(&mut d)?),
            kind::R_DATA => Reply::Data(d.bytes()?),
            kind::R_DATA_END => Reply::DataEnd { size: d.u64()? },
            kind::DIR_ENTRIES => {
                let n = d.count(17)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(DirEntry { name: d.string()?, is_dir: d.bool()?, path: d.string()?, size: d.u64()? });
                }
                Reply::DirEntries { entries, more: d.bool()? }
            }
            kind::STAT => Reply::Stat(FileStat {
                path: d.string()?,
                name: d.string()?,
                is_dir: d.bool()?,
                is_symlink: d.bool()?,
                size: d.u64()?,
                mode: d.u32()?,
                modified_ms: d.i64()?,
            }),
            kind::CA_INSTALLED => Reply::CaInstalled { bundle_path: d.string()? },
            kind::WRITTEN => Reply::Written { size: d.u64()? },
            kind::REPLAY_END => Reply::ReplayEnd,
            other => return Err(DecodeError(format!("unknown reply kind 0x{other:02x}"))),
        };
        d.finish()?;
        Ok(reply)
    }
}

fn encode_command(e: &mut Encoder, command: &Command) {
    match command {
        Command::Shell(line) => {
            e.u8(1);
            e.str(line);
        }
        Command::Argv(argv) => {
            e.u8(2);
            e.strings(argv);
        }
    }
}

fn decode_command(d: &mut Decoder) -> Result<Command, DecodeError> {
    let tag = d.u8()?;
    decode_command_body(d, tag)
}

fn decode_command_body(d: &mut Decoder, tag: u8) -> Result<Command, DecodeError> {
    match tag {
        1 => Ok(Command::Shell(d.string()?)),
        2 => Ok(Command::Argv(d.strings()?)),
        other => Err(DecodeError(format!("invalid command tag {other}"))),
    }
}

/// Columns then rows. Any value decodes; the agent checks the range.
/// The user of a command, the last field of its message and only when there is one, so that an
/// agent that predates it still reads every command run as root.
fn encode_user(e: &mut Encoder, user: Option<&str>) {
    if let Some(user) = user {
        e.str(user);
    }
}

fn decode_user(d: &mut Decoder) -> Result<Option<String>, DecodeError> {
    if d.at_end() {
        Ok(None)
    } else {
        d.string().map(Some)
    }
}

fn encode_size(e: &mut Encoder, size: WindowSize) {
    e.u16(size.cols);
    e.u16(size.rows);
}

fn decode_size(d: &mut Decoder) -> Result<WindowSize, DecodeError> {
    Ok(WindowSize { cols: d.u16()?, rows: d.u16()? })
}

fn encode_status(e: &mut Encoder, status: ExitStatus) {
    match status {
        ExitStatus::Code(code) => {
            e.u8(1);
            e.i32(code);
        }
        ExitStatus::Signal(sig) => {
            e.u8(2);
            e.i32(sig);
        }
    }
}

fn decode_status(d: &mut Decoder) -> Result<ExitStatus, DecodeError> {
    match d.u8()? {
        1 => Ok(ExitStatus::Code(d.i32()?)),
        2 => Ok(ExitStatus::Signal(d.i32()?)),
        other => Err(DecodeError(format!("invalid exit status tag {other}"))),
    }
}

// The error codes are message types; the frame layer only says which one fits its failure.
impl frame::FrameError {
    /// The code of the error frame a receiver sends before closing, or None when there is no
    /// peer left to tell (closed, idle or broken connection).
    pub fn reply_code(&self) -> Option<ErrorCode> {
        match self {
            frame::FrameError::Closed | frame::FrameError::Idle | frame::FrameError::Io(_) => None,
            frame::FrameError::Truncated { .. } => Some(ErrorCode::BadFrame),
            frame::FrameError::Stalled { .. } => Some(ErrorCode::Timeout),
            frame::FrameError::BadMagic(_) => Some(ErrorCode::BadFrame),
            frame::FrameError::UnsupportedVersion(_) => Some(ErrorCode::UnsupportedVersion),
            frame::FrameError::TooLarge(_) => Some(ErrorCode::FrameTooLarge),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_requests() -> Vec<Request> {
        let env = EnvVars(vec![("A".into(), "osb_sealed_0123".into()), ("B".into(), String::new())]);
        vec![
            Request::Ping,
            Request::Run(RunSpec {
                command: Command::Shell("echo hi | tr a-z A-Z".into()),
                env: env.clone(),
                cwd: Some("/tmp".into()),
                timeout_ms: 1500,
                max_output: 1 << 20,
                user: Some("app:staff".into()),
            }),
            Request::Run(RunSpec {
                command: Command::Argv(vec!["ls".into(), "-l".into(), String::new()]),
                env: EnvVars::default(),
                cwd: None,
                timeout_ms: 0,
                max_output: 0,
                user: None,
            }),
            Request::SessionStart(SessionSpec { command: Command::Shell("cat".into()), env, cwd: None, user: None }),
            Request::SessionStart(SessionSpec {
                command: Command::Shell("id".into()),
                env: EnvVars::default(),
                cwd: None,
                user: Some("1000".into()),
            }),
            Request::SessionList,
            Request::SessionKill { id: 3, signal: 15 },
            Request::SessionAttach { id: u32::MAX },
            Request::SessionStdin { id: 1, data: vec![0, 1, 2] },
            Request::PtyStart(PtySpec {
                command: None,
                env: EnvVars(vec![("TERM".into(), "vt100".into())]),
                cwd: Some("/srv".into()),
                size: WindowSize { cols: 80, rows: 24 },
                user: Some("nobody".into()),
            }),
            Request::PtyStart(PtySpec {
                command: Some(Command::Argv(vec!["/bin/zsh".into()])),
                env: EnvVars::default(),
                cwd: None,
                size: WindowSize { cols: 1000, rows: 1 },
                user: None,
            }),
            Request::PtyStart(PtySpec {
                command: Some(Command::Shell("top".into())),
                env: EnvVars::default(),
                cwd: None,
                size: WindowSize { cols: 0, rows: u16::MAX },
                user: None,
            }),
            Request::SessionResize { id: 7, size: WindowSize { cols: 120, rows: 40 } },
            Request::FileRead { path: "/etc/hostname".into(), limit: 99 },
            Request::FileWrite(WriteSpec { path: "a/b".into(), mode: Some(0o755), create_parents: true }),
            Request::FileWrite(WriteSpec { path: "x".into(), mode: None, create_parents: false }),
            Request::FileList { path: "/".into() },
            Request::FileStat { path: "/x".into() },
            Request::Mkdir { path: "/a/b/c".into() },
            Request::Remove { path: "/a".into(), recursive: true },
            Request::Rename { from: "/a/b".into(), to: "c d".into() },
            Request::Resumed { wall_clock_ns: 1_800_000_000_123_456_789, entropy: vec![7; 64] },
            Request::SetHostname { name: "sandbox-0123abcd".into() },
            Request::SyncDisks,
            Request::SetEnv { set: EnvVars(vec![("K".into(), "v".into())]), unset: vec!["OLD".into()] },
            Request::InstallCa { pem: b"-----BEGIN CERTIFICATE-----".to_vec() },
            Request::Power(Power::Off),
            Request::Power(Power::Reboot),
            Request::Data(vec![255; 300]),
            Request::DataEnd,
            Request::Stdin(b"input\n".to_vec()),
            Request::StdinClose,
        ]
    }

    fn sample_replies() -> Vec<Reply> {
        vec![
            Reply::Ok,
            Reply::error(ErrorCode::NotFound, "no such file: /x"),
            Reply::Error { code: ErrorCode::Other(999), message: String::new() },
            Reply::Pong { protocol: 1, agent_version: "0.1.0".into() },
            Reply::Output { stream: OutputStream::Stderr, data: vec![0; 10] },
            Reply::Exited(RunExit {
                status: ExitStatus::Signal(9),
                timed_out: true,
                stdout_truncated: false,
                stderr_truncated: true,
                duration_ms: 1234,
            }),
            Reply::SessionStarted { id: 1, pid: 4242 },
            Reply::Sessions(vec![
                SessionInfo { id: 1, pid: 2, command: "sleep 9".into(), exit: None },
                SessionInfo { id: 2, pid: 3, command: "true".into(), exit: Some(ExitStatus::Code(0)) },
            ]),
            Reply::SessionEnded(ExitStatus::Code(-1)),
            Reply::Data(vec![7; 64]),
            Reply::DataEnd { size: 64 },
            Reply::DirEntries {
                entries: vec![DirEntry { name: "a".into(), is_dir: true, path: "/a".into(), size: 0 }],
                more: false,
            },
            Reply::Stat(FileStat {
                path: "/a".into(),
                name: "a".into(),
                is_dir: false,
                is_symlink: true,
                size: 5,
                mode: 0o644,
                modified_ms: -1,
            }),
            Reply::CaInstalled { bundle_path: "/etc/ssl/x.crt".into() },
            Reply::Written { size: 10 },
            Reply::ReplayEnd,
        ]
    }

    #[test]
    fn every_request_round_trips() {
        for request in sample_requests() {
            let bytes = request.to_frame().unwrap();
            let (kind, len) = frame::parse_header(&bytes[..frame::HEADER_LEN]).unwrap();
            assert_eq!(len as usize, bytes.len() - frame::HEADER_LEN);
            let back = Request::decode(kind, &bytes[frame::HEADER_LEN..]).unwrap();
            assert_eq!(back, request);
        }
    }

    #[test]
    fn every_reply_round_trips() {
        for reply in sample_replies() {
            let bytes = reply.to_frame().unwrap();
            let (kind, _) = frame::parse_header(&bytes[..frame::HEADER_LEN]).unwrap();
            assert_eq!(Reply::decode(kind, &bytes[frame::HEADER_LEN..]).unwrap(), reply);
        }
    }

    fn user_of(request: &Request) -> Option<&str> {
        match request {
            Request::Run(spec) => spec.user.as_deref(),
            Request::SessionStart(spec) => spec.user.as_deref(),
            Request::PtyStart(spec) => spec.user.as_deref(),
            _ => None,
        }
    }

    #[test]
    fn every_truncation_of_every_message_is_an_error() {
        for request in sample_requests() {
            let bytes = request.to_frame().unwrap();
            let payload = &bytes[frame::HEADER_LEN..];
            // A command's user is an optional last field: cut off whole, what is left is the
            // same command as an older appliance sends it (to run as root).
            let without_user = user_of(&request).map(|user| payload.len() - 4 - user.len());
            for cut in (0..payload.len()).filter(|&cut| Some(cut) != without_user) {
                assert!(Request::decode(request.kind(), &payload[..cut]).is_err(), "{request:?} cut at {cut}");
            }
        }
        for reply in sample_replies() {
            let bytes = reply.to_frame().unwrap();
            let payload = &bytes[frame::HEADER_LEN..];
            for cut in 0..payload.len() {
                assert!(Reply::decode(reply.kind(), &payload[..cut]).is_err(), "{reply:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn unknown_kinds_and_direction_mixups_are_errors() {
        assert!(Request::decode(0x7F, &[]).is_err());
        assert!(Reply::decode(0x01, &[]).is_err());
        assert!(Request::decode(kind::OK, &[]).is_err());
    }

    #[test]
    fn terminal_requests_with_bad_tags_or_trailing_bytes_are_errors() {
        let start = Request::PtyStart(PtySpec {
            command: None,
            env: EnvVars::default(),
            cwd: None,
            size: WindowSize { cols: 80, rows: 24 },
            user: None,
        });
        let bytes = start.to_frame().unwrap();
        let mut payload = bytes[frame::HEADER_LEN..].to_vec();
        // Layout: command tag (0 = login shell), env count, cwd tag, cols, rows.
        assert_eq!(payload, [0, 0, 0, 0, 0, 0, 0, 0x50, 0, 0x18]);
        payload[0] = 3;
        let err = Request::decode(kind::PTY_START, &payload).unwrap_err();
        assert!(err.0.contains("command tag"), "{err}");
        payload[0] = 0;
        payload.push(0);
        assert!(Request::decode(kind::PTY_START, &payload).is_err(), "trailing byte");

        let resize = Request::SessionResize { id: 1, size: WindowSize { cols: 120, rows: 40 } };
        let mut payload = resize.to_frame().unwrap()[frame::HEADER_LEN..].to_vec();
        assert_eq!(payload, [0, 0, 0, 1, 0, 120, 0, 40]);
        payload.push(9);
        assert!(Request::decode(kind::SESSION_RESIZE, &payload).is_err(), "trailing byte");
    }

    #[test]
    fn a_command_without_a_user_is_encoded_as_before_users_existed() {
        let spec = RunSpec { user: None, ..RunSpec::shell("true") };
        let without = Request::Run(spec.clone()).to_frame().unwrap();
        let with = Request::Run(RunSpec { user: Some("app".into()), ..spec }).to_frame().unwrap();
        // An older agent reads `without` exactly; the user is appended only when there is one.
        assert_eq!(with.len(), without.len() + 4 + 3);
        assert_eq!(with[frame::HEADER_LEN..without.len()], without[frame::HEADER_LEN..]);
    }

    #[test]
    fn window_sizes_are_valid_only_within_the_limit() {
        assert!(WindowSize { cols: 80, rows: 24 }.is_valid());
        assert!(WindowSize { cols: MAX_WINDOW_SIDE, rows: 1 }.is_valid());
        assert!(!WindowSize { cols: 0, rows: 24 }.is_valid());
        assert!(!WindowSize { cols: 80, rows: 0 }.is_valid());
        assert!(!WindowSize { cols: MAX_WINDOW_SIDE + 1, rows: 24 }.is_valid());
    }

    /// Garbage of every length for every kind: decoding fails or succeeds, never panics, and
    /// whatever decodes encodes back to the same payload.
    #[test]
    fn garbage_payloads_never_panic_and_what_decodes_round_trips() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for kind in 0..=u8::MAX {
            for len in 0..48 {
                // Small values make valid tags, counts and lengths likely enough to go deep.
                let payload: Vec<u8> = (0..len).map(|_| (next() % 5) as u8).collect();
                if let Ok(request) = Request::decode(kind, &payload) {
                    assert_eq!(&request.to_frame().unwrap()[frame::HEADER_LEN..], &payload[..], "{request:?}");
                }
                if let Ok(reply) = Reply::decode(kind, &payload) {
                    assert_eq!(&reply.to_frame().unwrap()[frame::HEADER_LEN..], &payload[..], "{reply:?}");
                }
            }
        }
    }

    #[test]
    fn env_values_never_appear_in_debug_output() {
        let request = Request::SetEnv {
            set: EnvVars(vec![("GITHUB_TOKEN".into(), "osb_sealed_deadbeef".into())]),
            unset: vec![],
        };
        let shown = format!("{request:?}");
        assert!(shown.contains("GITHUB_TOKEN"));
        assert!(!shown.contains("osb_sealed_deadbeef"), "{shown}");
    }

    #[test]
    fn error_codes_round_trip_including_unknown_ones() {
        for n in 0..40u16 {
            assert_eq!(ErrorCode::from_u16(n).to_u16(), n);
        }
    }
}

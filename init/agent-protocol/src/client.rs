//! The blocking client the appliance uses to drive one sandbox's agent. One request runs at a
//! time per connection; open several connections for concurrent work. Every wait is bounded
//! by a timeout, and anything the agent sends that does not fit the protocol is an error.
//!
//! The agent may be hostile (code in a sandbox is root and may replace it), so a misbehaving
//! agent must cost only its own call: every call has an overall deadline however many frames
//! the agent keeps sending, and everything a reply accumulates is capped. When either is
//! exceeded the connection is shut down and the call fails with what the agent did.

use crate::frame::{self, FrameError};
use crate::message::{
    Command, DirEntry, EnvVars, ErrorCode, ExitStatus, FileStat, OutputStream, Power, PtySpec, Reply, Request, RunExit,
    RunSpec, SessionInfo, SessionSpec, WindowSize, WriteSpec,
};
use crate::transport::Connection;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};
use vsock::VsockStream;

/// Data is sent in chunks of this size, well under the frame limit.
const CHUNK: usize = 256 * 1024;

/// The most entries a directory listing may hold; a longer listing fails rather than make the
/// appliance hold whatever a guest sends. A batch without entries counts as one, so a flood of
/// empty batches ends here too.
pub const MAX_DIR_ENTRIES: usize = 100_000;
/// The most bytes of names and paths a directory listing may hold (64 MiB, far beyond what
/// `MAX_DIR_ENTRIES` honest entries take).
pub const MAX_DIR_LIST_BYTES: usize = 64 << 20;
/// The overall deadline of a run without a timeout (`timeout_ms` 0), which the agent never ends
/// itself: this stops such a run from holding its caller forever. A day is generous for a
/// foreground command; the appliance always passes a timeout, whose deadline is the timeout
/// plus the reply margin instead.
pub const UNTIMED_RUN_DEADLINE: Duration = Duration::from_secs(24 * 60 * 60);
/// File data earns its call more time at this pace: each byte moved extends the deadline by
/// 1 s / `MIN_FILE_PACE`. vsock moves hundreds of MiB/s, so an honest transfer stays well
/// ahead; a guest that trickles data (or sends empty frames, which earn nothing) falls behind.
pub const MIN_FILE_PACE: u64 = 1 << 20;
/// The most time file data can earn (1 h, about 3.5 GiB at `MIN_FILE_PACE`): bounds reads
/// without a size limit, which could otherwise go on forever at a steady trickle.
pub const MAX_FILE_DATA_TIME: Duration = Duration::from_secs(60 * 60);

#[derive(Debug)]
pub enum AgentError {
    /// The connection failed: connect, read, write, or a timeout.
    Io(io::Error),
    /// The agent broke the protocol (malformed or oversized frame, reply out of place). The
    /// connection is closed and unusable afterwards.
    Protocol(String),
    /// The agent refused or failed the request; the connection stays usable.
    Remote { code: ErrorCode, message: String },
    /// The request cannot be sent as given (e.g. larger than a frame).
    InvalidRequest(String),
    /// The agent kept a call going past its overall deadline (e.g. frames that never end the
    /// reply). The connection is closed and unusable afterwards.
    Deadline(String),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Io(e) => write!(f, "agent connection: {e}"),
            AgentError::Protocol(m) => write!(f, "agent protocol violation: {m}"),
            AgentError::Remote { code, message } => write!(f, "agent error ({code:?}): {message}"),
            AgentError::InvalidRequest(m) => write!(f, "invalid agent request: {m}"),
            AgentError::Deadline(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for AgentError {}

/// Bounds on how long the client waits.
#[derive(Debug, Clone, Copy)]
pub struct ClientTimeouts {
    /// For a reply to a quick request (files, env, ping), and added to a command's own timeout.
    pub reply: Duration,
    /// For a frame, once begun, to arrive completely; also bounds each write.
    pub frame: Duration,
    /// For the first data of a file read. Longer than `reply`: right after a large write the
    /// guest's disk may still be busy writing back (a 2 GiB upload then download waited 30.4 s
    /// for the first chunk under nested emulation), and the appliance's download pipe allows
    /// this long anyway (`STALL_LIMIT`).
    pub file_start: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            reply: Duration::from_secs(30),
            frame: Duration::from_secs(30),
            file_start: Duration::from_secs(120),
        }
    }
}

/// Facts the agent reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub protocol: u8,
    pub agent_version: String,
}

/// The complete result of a foreground command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: RunExit,
}

/// What an attached session sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachEvent {
    Output {
        stream: OutputStream,
        data: Vec<u8>,
    },
    /// A problem delivering stdin (e.g. the process closed it); the attachment continues.
    Notice {
        code: ErrorCode,
        message: String,
    },
    /// The replay of output from before the attachment is over; what follows is live.
    ReplayEnd,
    /// The session ended; nothing follows.
    Ended(ExitStatus),
}

pub struct AgentClient<C: Connection> {
    conn: C,
    timeouts: ClientTimeouts,
    /// Set once the connection is out of step with the agent; every later call fails with it.
    broken: Option<String>,
}

impl AgentClient<VsockStream> {
    /// Connects to the agent of the sandbox with guest CID `cid`.
    pub fn connect_vsock(cid: u32, port: u32, timeout: Duration) -> Result<Self, AgentError> {
        let conn = VsockStream::connect(cid, port, Some(timeout)).map_err(AgentError::Io)?;
        AgentClient::new(conn, ClientTimeouts::default())
    }

    /// Keeps connecting and pinging until the agent answers (a sandbox that is still booting
    /// refuses or resets connections), `total` has passed, or `give_up` says there is no point
    /// any more (e.g. the VM ended); the error is then the last attempt's.
    pub fn wait_for_agent(
        cid: u32,
        port: u32,
        total: Duration,
        give_up: &dyn Fn() -> bool,
    ) -> Result<(Self, AgentInfo), AgentError> {
        let deadline = Instant::now() + total;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt =
                AgentClient::connect_vsock(cid, port, left.clamp(Duration::from_millis(1), Duration::from_secs(1)))
                    .and_then(|mut client| client.ping().map(|info| (client, info)));
            match attempt {
                Ok(ready) => return Ok(ready),
                Err(e) if give_up() || Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl<C: Connection> AgentClient<C> {
    pub fn new(conn: C, timeouts: ClientTimeouts) -> Result<Self, AgentError> {
        conn.set_write_timeout(Some(timeouts.frame)).map_err(AgentError::Io)?;
        Ok(AgentClient { conn, timeouts, broken: None })
    }

    pub fn ping(&mut self) -> Result<AgentInfo, AgentError> {
        let mut call = self.quick_call("ping");
        self.send(&Request::Ping)?;
        match self.recv(&mut call, None)? {
            Reply::Pong { protocol, agent_version } => Ok(AgentInfo { protocol, agent_version }),
            other => Err(self.unexpected(other, "ping")),
        }
    }

    /// Runs a command to completion and collects its output.
    pub fn run(&mut self, spec: &RunSpec) -> Result<RunOutput, AgentError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let exit = self.run_streaming(spec, |stream, data| match stream {
            OutputStream::Stdout => stdout.extend_from_slice(data),
            OutputStream::Stderr => stderr.extend_from_slice(data),
        })?;
        Ok(RunOutput { stdout, stderr, exit })
    }

    /// Runs a command, handing each piece of output to `on_output` as it arrives. The agent
    /// kills the command at its timeout, so the whole reply must be over by then plus the reply
    /// margin (`UNTIMED_RUN_DEADLINE` without a timeout); time spent in `on_output` is not
    /// held against the agent.
    pub fn run_streaming(
        &mut self,
        spec: &RunSpec,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<RunExit, AgentError> {
        let allowed = if spec.timeout_ms == 0 {
            UNTIMED_RUN_DEADLINE
        } else {
            Duration::from_millis(spec.timeout_ms).saturating_add(self.timeouts.reply)
        };
        let mut call = Deadline::new("run", allowed);
        self.send(&Request::Run(spec.clone()))?;
        let (mut stdout_len, mut stderr_len) = (0u64, 0u64);
        loop {
            match self.recv(&mut call, None)? {
                Reply::Output { stream, data } => {
                    let total = match stream {
                        OutputStream::Stdout => &mut stdout_len,
                        OutputStream::Stderr => &mut stderr_len,
                    };
                    *total += data.len() as u64;
                    if *total > spec.max_output {
                        return Err(self
                            .fail(format!("agent sent more than the {} bytes of output asked for", spec.max_output)));
                    }
                    // Frames without data earn nothing: the deadline alone bounds a flood of them.
                    if !data.is_empty() {
                        call.data_bytes += data.len() as u64;
                        let handed = Instant::now();
                        on_output(stream, &data);
                        call.excuse(handed.elapsed());
                    }
                }
                Reply::Exited(exit) => return Ok(exit),
                other => return Err(self.unexpected(other, "run")),
            }
        }
    }

    /// Starts a background session; returns (session id, pid).
    pub fn session_start(&mut self, spec: &SessionSpec) -> Result<(u32, u32), AgentError> {
        let mut call = self.quick_call("session start");
        self.send(&Request::SessionStart(spec.clone()))?;
        match self.recv(&mut call, None)? {
            Reply::SessionStarted { id, pid } => Ok((id, pid)),
            other => Err(self.unexpected(other, "session start")),
        }
    }

    /// Starts a session on a pseudo-terminal; returns (session id, pid). It is listed, attached
    /// to, written to and killed like any session.
    pub fn pty_start(&mut self, spec: &PtySpec) -> Result<(u32, u32), AgentError> {
        let mut call = self.quick_call("terminal start");
        self.send(&Request::PtyStart(spec.clone()))?;
        match self.recv(&mut call, None)? {
            Reply::SessionStarted { id, pid } => Ok((id, pid)),
            other => Err(self.unexpected(other, "terminal start")),
        }
    }

    /// Sets the terminal size of a session started with `pty_start`.
    pub fn session_resize(&mut self, id: u32, size: WindowSize) -> Result<(), AgentError> {
        self.simple(&Request::SessionResize { id, size }, "session resize")
    }

    /// The agent's sessions; one frame, so at most `frame::MAX_PAYLOAD` bytes of them.
    pub fn session_list(&mut self) -> Result<Vec<SessionInfo>, AgentError> {
        let mut call = self.quick_call("session list");
        self.send(&Request::SessionList)?;
        match self.recv(&mut call, None)? {
            Reply::Sessions(list) => Ok(list),
            other => Err(self.unexpected(other, "session list")),
        }
    }

    /// Sends `signal` to the session's whole process group.
    pub fn session_kill(&mut self, id: u32, signal: i32) -> Result<(), AgentError> {
        self.simple(&Request::SessionKill { id, signal }, "session kill")
    }

    /// Writes to a session's stdin without attaching.
    pub fn session_stdin(&mut self, id: u32, data: &[u8]) -> Result<(), AgentError> {
        self.simple(&Request::SessionStdin { id, data: data.to_vec() }, "session stdin")
    }

    /// Attaches to a session: the agent replays the output kept so far, then streams new output
    /// until the session ends. The connection is dedicated to the attachment from then on.
    pub fn attach(mut self, id: u32) -> Result<(AttachWriter<C>, AttachReader<C>), AgentError> {
        self.simple(&Request::SessionAttach { id }, "session attach")?;
        let writer = self.conn.try_clone().map_err(AgentError::Io)?;
        Ok((AttachWriter { conn: writer }, AttachReader { client: self, ended: false }))
    }

    /// Reads a whole file; `limit` (0: none) makes larger files an error instead. With limit 0
    /// nothing bounds the memory this takes but the deadline: pass a limit for untrusted files.
    pub fn read_file(&mut self, path: &str, limit: u64) -> Result<Vec<u8>, AgentError> {
        let mut out = Vec::new();
        self.read_file_to(path, limit, &mut out)?;
        Ok(out)
    }

    /// Streams a file into `sink`; returns its size. The agent has the file-start timeout to
    /// start, the reply timeout to go quiet between frames, and the data must keep up
    /// `MIN_FILE_PACE` on average (see `Deadline::earn`); time spent writing to `sink` is not
    /// held against it.
    pub fn read_file_to(&mut self, path: &str, limit: u64, sink: &mut dyn Write) -> Result<u64, AgentError> {
        let start = self.timeouts.file_start.max(self.timeouts.reply);
        let mut call = Deadline::new("file read", start);
        self.send(&Request::FileRead { path: path.to_string(), limit })?;
        let mut total = 0u64;
        loop {
            let idle = if call.frames == 0 { start } else { self.timeouts.reply };
            match self.recv(&mut call, Some(idle))? {
                Reply::Data(data) => {
                    total += data.len() as u64;
                    if limit > 0 && total > limit {
                        return Err(self.fail(format!("agent sent more than the {limit}-byte limit")));
                    }
                    call.earn(data.len() as u64);
                    let written = Instant::now();
                    if let Err(e) = sink.write_all(&data) {
                        // The rest of the file is still on its way: this connection is out of step.
                        self.broken = Some(format!("local write failed during a file read: {e}"));
                        let _ = self.conn.shutdown(Shutdown::Both);
                        return Err(AgentError::Io(e));
                    }
                    call.excuse(written.elapsed());
                }
                Reply::DataEnd { size } if size == total => return Ok(total),
                Reply::DataEnd { size } => {
                    return Err(self.fail(format!("agent announced {size} bytes but sent {total}")))
                }
                other => return Err(self.unexpected(other, "file read")),
            }
        }
    }

    /// Replaces a file atomically with `data`; returns the bytes written.
    pub fn write_file(&mut self, spec: &WriteSpec, data: &[u8]) -> Result<u64, AgentError> {
        self.write_file_from(spec, &mut &data[..])
    }

    /// Replaces a file atomically with everything `source` yields. The agent must take the data
    /// at `MIN_FILE_PACE` on average (time spent reading `source` is not held against it) and
    /// confirm the file within the reply timeout after the last chunk.
    pub fn write_file_from(&mut self, spec: &WriteSpec, source: &mut dyn Read) -> Result<u64, AgentError> {
        self.simple(&Request::FileWrite(spec.clone()), "file write")?;
        let mut call = self.quick_call("file write");
        let mut buf = vec![0u8; CHUNK];
        loop {
            let reading = Instant::now();
            let n = match source.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // There is no way to abort a write in band: closing the connection makes the
                    // agent discard the partial file.
                    self.broken = Some(format!("local read failed during a file write: {e}"));
                    let _ = self.conn.shutdown(Shutdown::Both);
                    return Err(AgentError::Io(e));
                }
            };
            call.excuse(reading.elapsed());
            if n == 0 {
                break;
            }
            self.send_by(&Request::Data(buf[..n].to_vec()), &call)?;
            call.earn(n as u64);
        }
        self.send_by(&Request::DataEnd, &call)?;
        // Committing the file (fsync, rename) is quick work again.
        let mut commit = self.quick_call("file write");
        match self.recv(&mut commit, None)? {
            Reply::Written { size } => Ok(size),
            other => Err(self.unexpected(other, "file write")),
        }
    }

    /// Lists a directory: at most `MAX_DIR_ENTRIES` entries and `MAX_DIR_LIST_BYTES` of names
    /// and paths, all within the reply timeout (the agent reads the whole directory before it
    /// sends the first batch, so the batches themselves are quick).
    pub fn list_dir(&mut self, path: &str) -> Result<Vec<DirEntry>, AgentError> {
        let mut call = self.quick_call("file list");
        self.send(&Request::FileList { path: path.to_string() })?;
        let mut all = Vec::new();
        // Entries counted against the cap: a batch without entries counts as one.
        let mut counted = 0usize;
        let mut text_bytes = 0usize;
        loop {
            match self.recv(&mut call, None)? {
                Reply::DirEntries { entries, more } => {
                    counted = counted.saturating_add(entries.len().max(1));
                    if counted > MAX_DIR_ENTRIES {
                        return Err(self.fail(format!(
                            "agent listed more than {MAX_DIR_ENTRIES} entries (MAX_DIR_ENTRIES, counting each \
                             empty batch as one)"
                        )));
                    }
                    text_bytes =
                        entries.iter().fold(text_bytes, |sum, e| sum.saturating_add(e.name.len() + e.path.len()));
                    if text_bytes > MAX_DIR_LIST_BYTES {
                        return Err(self.fail(format!(
                            "agent listed more than {MAX_DIR_LIST_BYTES} bytes of names and paths \
                             (MAX_DIR_LIST_BYTES)"
                        )));
                    }
                    all.extend(entries);
                    if !more {
                        return Ok(all);
                    }
                }
                other => return Err(self.unexpected(other, "file list")),
            }
        }
    }

    pub fn stat(&mut self, path: &str) -> Result<FileStat, AgentError> {
        let mut call = self.quick_call("stat");
        self.send(&Request::FileStat { path: path.to_string() })?;
        match self.recv(&mut call, None)? {
            Reply::Stat(stat) => Ok(stat),
            other => Err(self.unexpected(other, "stat")),
        }
    }

    /// Creates a directory and its missing parents.
    pub fn mkdir(&mut self, path: &str) -> Result<(), AgentError> {
        self.simple(&Request::Mkdir { path: path.to_string() }, "mkdir")
    }

    pub fn remove(&mut self, path: &str, recursive: bool) -> Result<(), AgentError> {
        self.simple(&Request::Remove { path: path.to_string(), recursive }, "remove")
    }

    /// Moves a file or directory within the sandbox (rename(2)).
    pub fn rename(&mut self, from: &str, to: &str) -> Result<(), AgentError> {
        self.simple(&Request::Rename { from: from.to_string(), to: to.to_string() }, "rename")
    }

    /// Tells the agent the sandbox was resumed from a snapshot: it sets the wall clock to
    /// `wall_clock_ns` and mixes `entropy` into the kernel's random pool.
    pub fn resumed(&mut self, wall_clock_ns: u64, entropy: &[u8]) -> Result<(), AgentError> {
        self.simple(&Request::Resumed { wall_clock_ns, entropy: entropy.to_vec() }, "resumed")
    }

    /// Sets the guest's hostname.
    pub fn set_hostname(&mut self, name: &str) -> Result<(), AgentError> {
        self.simple(&Request::SetHostname { name: name.to_string() }, "set hostname")
    }

    /// Flushes the guest's file systems to its disks; answers once they are written.
    pub fn sync_disks(&mut self) -> Result<(), AgentError> {
        self.simple(&Request::SyncDisks, "sync disks")
    }

    /// Sets and unsets variables for every later command and session.
    pub fn set_env(&mut self, set: &[(String, String)], unset: &[String]) -> Result<(), AgentError> {
        self.simple(&Request::SetEnv { set: EnvVars(set.to_vec()), unset: unset.to_vec() }, "set env")
    }

    /// Installs the appliance CA; returns the path of the combined trust bundle.
    pub fn install_ca(&mut self, pem: &[u8]) -> Result<String, AgentError> {
        let mut call = self.quick_call("install CA");
        self.send(&Request::InstallCa { pem: pem.to_vec() })?;
        match self.recv(&mut call, None)? {
            Reply::CaInstalled { bundle_path } => Ok(bundle_path),
            other => Err(self.unexpected(other, "install CA")),
        }
    }

    /// Asks the sandbox to power off or reboot; the agent acknowledges before acting.
    pub fn power(&mut self, action: Power) -> Result<(), AgentError> {
        self.simple(&Request::Power(action), "power")
    }

    /// A request answered by `Ok`.
    fn simple(&mut self, request: &Request, what: &'static str) -> Result<(), AgentError> {
        let mut call = self.quick_call(what);
        self.send(request)?;
        match self.recv(&mut call, None)? {
            Reply::Ok => Ok(()),
            other => Err(self.unexpected(other, what)),
        }
    }

    /// The deadline of a request answered at once: the whole reply within the reply timeout.
    fn quick_call(&self, what: &'static str) -> Deadline {
        Deadline::new(what, self.timeouts.reply)
    }

    fn send(&mut self, request: &Request) -> Result<(), AgentError> {
        self.check_usable()?;
        let bytes =
            request.to_frame().map_err(|e| AgentError::InvalidRequest(format!("{} request: {e}", request.name())))?;
        self.conn.write_all(&bytes).and_then(|()| self.conn.flush()).map_err(|e| {
            self.broken = Some(format!("write failed: {e}"));
            AgentError::Io(e)
        })
    }

    /// Sends within the call's deadline: an agent that stops taking data cannot hold the call
    /// longer than a reply would.
    fn send_by(&mut self, request: &Request, call: &Deadline) -> Result<(), AgentError> {
        self.check_usable()?;
        let left = call.left();
        if left.is_zero() {
            return Err(self.overran(call));
        }
        let within = self.timeouts.frame.min(left);
        self.conn.set_write_timeout(Some(at_least_1ms(within))).map_err(AgentError::Io)?;
        let sent = self.send(request);
        let restored = self.conn.set_write_timeout(Some(self.timeouts.frame));
        match sent {
            // The timeout that ran out was the deadline's, not the frame timeout's.
            Err(AgentError::Io(e)) if frame::is_timeout(&e) && within == left => Err(self.overran(call)),
            Err(e) => Err(e),
            Ok(()) => restored.map_err(|e| {
                self.broken = Some(format!("cannot reset the write timeout: {e}"));
                AgentError::Io(e)
            }),
        }
    }

    /// The next reply of a call: within the call's deadline, and after at most `idle` of
    /// silence (None: the deadline alone bounds the silence).
    fn recv(&mut self, call: &mut Deadline, idle: Option<Duration>) -> Result<Reply, AgentError> {
        self.check_usable()?;
        let left = call.left();
        if left.is_zero() {
            return Err(self.overran(call));
        }
        let wait = idle.map_or(left, |idle| idle.min(left));
        // A frame that begins just before the deadline must also end by it.
        let within = self.timeouts.frame.min(left);
        match frame::read_frame(&mut self.conn, Some(wait), within) {
            Ok(frame) => {
                call.frames += 1;
                Reply::decode(frame.kind, &frame.payload).map_err(|e| self.fail(format!("malformed reply: {e}")))
            }
            // Frames came, but the reply did not end in time (the wait that ran out was the
            // deadline's, not the idle or frame timeout's).
            Err(FrameError::Idle) if call.frames > 0 && wait == left => Err(self.overran(call)),
            Err(FrameError::Stalled { .. }) if call.frames > 0 && within == left => Err(self.overran(call)),
            Err(FrameError::Idle) => {
                let said = if call.frames == 0 {
                    format!("agent did not reply to the {} within {}", call.what, seconds(wait))
                } else {
                    format!("agent went silent for {} during the {}", seconds(wait), call.what)
                };
                Err(self.lost(io::Error::new(io::ErrorKind::TimedOut, said)))
            }
            Err(e) => Err(self.frame_failed(e)),
        }
    }

    /// The next frame of an attachment, which has no overall deadline (a session may run for
    /// as long as it likes); `idle` bounds the wait (None: as long as the session is quiet).
    fn recv_open_ended(&mut self, idle: Option<Duration>) -> Result<Reply, AgentError> {
        self.check_usable()?;
        match frame::read_frame(&mut self.conn, idle, self.timeouts.frame) {
            Ok(frame) => {
                Reply::decode(frame.kind, &frame.payload).map_err(|e| self.fail(format!("malformed reply: {e}")))
            }
            Err(FrameError::Idle) => {
                let said = format!("agent sent nothing within {}", seconds(idle.unwrap_or_default()));
                Err(self.lost(io::Error::new(io::ErrorKind::TimedOut, said)))
            }
            Err(e) => Err(self.frame_failed(e)),
        }
    }

    fn check_usable(&self) -> Result<(), AgentError> {
        match &self.broken {
            Some(why) => Err(AgentError::Protocol(format!("connection unusable after an earlier failure ({why})"))),
            None => Ok(()),
        }
    }

    /// A frame could not be read: the connection is out of step and abandoned.
    fn frame_failed(&mut self, e: FrameError) -> AgentError {
        match e {
            FrameError::Io(io) => self.lost(io),
            FrameError::Closed => {
                self.lost(io::Error::new(io::ErrorKind::UnexpectedEof, "agent closed the connection"))
            }
            other => self.fail(other.to_string()),
        }
    }

    /// Abandons the connection after a failure of the connection itself (not of the protocol).
    fn lost(&mut self, error: io::Error) -> AgentError {
        self.broken = Some(error.to_string());
        let _ = self.conn.shutdown(Shutdown::Both);
        AgentError::Io(error)
    }

    /// The call's deadline passed: the connection is abandoned (the agent may still be sending).
    fn overran(&mut self, call: &Deadline) -> AgentError {
        let message = format!(
            "agent kept the {} going past its {} deadline ({} frames received, {} bytes of data moved)",
            call.what,
            seconds(call.allowed()),
            call.frames,
            call.data_bytes
        );
        self.broken = Some(message.clone());
        let _ = self.conn.shutdown(Shutdown::Both);
        AgentError::Deadline(message)
    }

    /// Turns an out-of-place reply into the matching error. A remote error is the request's
    /// answer; anything else means the two sides disagree and the connection is abandoned.
    fn unexpected(&mut self, reply: Reply, what: &str) -> AgentError {
        match reply {
            Reply::Error { code, message } => {
                if is_connection_error(code) {
                    // The agent closes the connection after these.
                    self.broken = Some(format!("agent reported {code:?}"));
                }
                AgentError::Remote { code, message }
            }
            other => self.fail(format!("unexpected reply kind 0x{:02x} to {what}", other.kind())),
        }
    }

    fn fail(&mut self, message: String) -> AgentError {
        self.broken = Some(message.clone());
        let _ = self.conn.shutdown(Shutdown::Both);
        AgentError::Protocol(message)
    }
}

/// How long one call may take in all, however many frames the agent sends.
struct Deadline {
    /// The call, as messages name it ("file list").
    what: &'static str,
    started: Instant,
    /// The allowance the call starts with.
    base: Duration,
    /// Time spent on this side (the caller's sink, source or callback), not held against the agent.
    excused: Duration,
    /// Time earned by file data moved (see `earn`), at most `MAX_FILE_DATA_TIME`.
    earned: Duration,
    /// Frames received and bytes of data moved, for the message when the deadline passes.
    frames: u64,
    data_bytes: u64,
}

impl Deadline {
    fn new(what: &'static str, base: Duration) -> Deadline {
        Deadline {
            what,
            started: Instant::now(),
            base,
            excused: Duration::ZERO,
            earned: Duration::ZERO,
            frames: 0,
            data_bytes: 0,
        }
    }

    fn allowed(&self) -> Duration {
        self.base.saturating_add(self.excused).saturating_add(self.earned)
    }

    /// Zero once the deadline has passed.
    fn left(&self) -> Duration {
        self.allowed().saturating_sub(self.started.elapsed())
    }

    fn excuse(&mut self, local: Duration) {
        self.excused = self.excused.saturating_add(local);
    }

    /// Extends the deadline by what `bytes` of file data take at `MIN_FILE_PACE`: a transfer
    /// of any allowed size gets the time it needs, while frames without data earn nothing.
    fn earn(&mut self, bytes: u64) {
        self.data_bytes = self.data_bytes.saturating_add(bytes);
        let micros = bytes.saturating_mul(1_000_000) / MIN_FILE_PACE;
        self.earned = self.earned.saturating_add(Duration::from_micros(micros)).min(MAX_FILE_DATA_TIME);
    }
}

/// A zero timeout means "block forever" to the socket layer, so round up.
fn at_least_1ms(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

/// A duration for messages: "30 s", "1.5 s".
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Codes the agent sends just before closing the connection.
fn is_connection_error(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::BadFrame | ErrorCode::FrameTooLarge | ErrorCode::UnsupportedVersion | ErrorCode::Timeout)
}

/// The sending half of an attachment: stdin for the session.
pub struct AttachWriter<C: Connection> {
    conn: C,
}

impl<C: Connection> AttachWriter<C> {
    pub fn stdin(&mut self, data: &[u8]) -> Result<(), AgentError> {
        for chunk in data.chunks(CHUNK) {
            self.send(&Request::Stdin(chunk.to_vec()))?;
        }
        Ok(())
    }

    pub fn close_stdin(&mut self) -> Result<(), AgentError> {
        self.send(&Request::StdinClose)
    }

    /// Ends the attachment; the session keeps running.
    pub fn detach(self) {
        let _ = self.conn.shutdown(Shutdown::Write);
    }

    /// Ends the attachment in both directions, so the reader's wait ends at once even if the
    /// agent ignores a detach; the session keeps running.
    pub fn close(self) {
        let _ = self.conn.shutdown(Shutdown::Both);
    }

    fn send(&mut self, request: &Request) -> Result<(), AgentError> {
        let bytes = request.to_frame().map_err(|e| AgentError::InvalidRequest(e.to_string()))?;
        self.conn.write_all(&bytes).map_err(AgentError::Io)
    }
}

/// The receiving half of an attachment.
pub struct AttachReader<C: Connection> {
    client: AgentClient<C>,
    ended: bool,
}

impl<C: Connection> AttachReader<C> {
    /// The next event; `idle` bounds the wait (None: as long as the session is quiet).
    pub fn next_event(&mut self, idle: Option<Duration>) -> Result<AttachEvent, AgentError> {
        if self.ended {
            return Err(AgentError::Protocol("the session already ended".into()));
        }
        match self.client.recv_open_ended(idle)? {
            Reply::Output { stream, data } => Ok(AttachEvent::Output { stream, data }),
            Reply::ReplayEnd => Ok(AttachEvent::ReplayEnd),
            Reply::SessionEnded(status) => {
                self.ended = true;
                Ok(AttachEvent::Ended(status))
            }
            // Errors about the connection itself end it; any other is about our stdin.
            Reply::Error { code, message } if !is_connection_error(code) => Ok(AttachEvent::Notice { code, message }),
            other => Err(self.client.unexpected(other, "session attach")),
        }
    }
}

impl RunSpec {
    /// A `sh -c` line with no extra environment, the home directory, a 60 s timeout and 16 MiB
    /// of output per stream.
    pub fn shell(line: impl Into<String>) -> RunSpec {
        RunSpec {
            command: Command::Shell(line.into()),
            env: EnvVars::default(),
            cwd: None,
            timeout_ms: 60_000,
            max_output: 16 << 20,
            user: None,
        }
    }
}

impl WriteSpec {
    /// Default mode, parents created.
    pub fn new(path: impl Into<String>) -> WriteSpec {
        WriteSpec { path: path.into(), mode: None, create_parents: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_data_earns_time_at_the_minimum_pace_up_to_the_ceiling() {
        let mut call = Deadline::new("file read", Duration::from_secs(30));
        call.earn(0);
        assert_eq!(call.allowed(), Duration::from_secs(30), "empty frames earn nothing");
        call.earn(MIN_FILE_PACE * 4);
        assert_eq!(call.allowed(), Duration::from_secs(34));
        call.earn(u64::MAX);
        assert_eq!(call.allowed(), Duration::from_secs(30) + MAX_FILE_DATA_TIME);
        assert_eq!(call.data_bytes, u64::MAX, "counts saturate instead of wrapping");
    }

    #[test]
    fn local_time_is_excused_and_a_passed_deadline_leaves_nothing() {
        let mut call = Deadline::new("run", Duration::ZERO);
        assert!(call.left().is_zero());
        call.excuse(Duration::from_secs(5));
        assert!(call.left() > Duration::from_secs(4));
        assert_eq!(seconds(Duration::from_secs(30)), "30 s");
        assert_eq!(seconds(Duration::from_millis(1500)), "1.5 s");
    }
}

//! The blocking client the appliance uses to drive one sandbox's agent. One request runs at a
//! time per connection; open several connections for concurrent work. Every wait is bounded
//! by a timeout, and anything the agent sends that does not fit the protocol is an error.

use crate::frame::{self, FrameError};
use crate::message::{
    Command, DirEntry, EnvVars, ErrorCode, ExitStatus, FileStat, OutputStream, Power, Reply, Request, RunExit, RunSpec,
    SessionInfo, SessionSpec, WriteSpec,
};
use crate::transport::Connection;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};
use vsock::VsockStream;

/// Data is sent in chunks of this size, well under the frame limit.
const CHUNK: usize = 256 * 1024;

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
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Io(e) => write!(f, "agent connection: {e}"),
            AgentError::Protocol(m) => write!(f, "agent protocol violation: {m}"),
            AgentError::Remote { code, message } => write!(f, "agent error ({code:?}): {message}"),
            AgentError::InvalidRequest(m) => write!(f, "invalid agent request: {m}"),
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
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts { reply: Duration::from_secs(30), frame: Duration::from_secs(30) }
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
        self.send(&Request::Ping)?;
        match self.recv(Some(self.timeouts.reply))? {
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

    /// Runs a command, handing each piece of output to `on_output` as it arrives.
    pub fn run_streaming(
        &mut self,
        spec: &RunSpec,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<RunExit, AgentError> {
        self.send(&Request::Run(spec.clone()))?;
        // The longest silence to accept: the command's whole timeout plus time to kill and report.
        let idle = (spec.timeout_ms > 0).then(|| Duration::from_millis(spec.timeout_ms) + self.timeouts.reply);
        let (mut stdout_len, mut stderr_len) = (0u64, 0u64);
        loop {
            match self.recv(idle)? {
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
                    on_output(stream, &data);
                }
                Reply::Exited(exit) => return Ok(exit),
                other => return Err(self.unexpected(other, "run")),
            }
        }
    }

    /// Starts a background session; returns (session id, pid).
    pub fn session_start(&mut self, spec: &SessionSpec) -> Result<(u32, u32), AgentError> {
        self.send(&Request::SessionStart(spec.clone()))?;
        match self.recv(Some(self.timeouts.reply))? {
            Reply::SessionStarted { id, pid } => Ok((id, pid)),
            other => Err(self.unexpected(other, "session start")),
        }
    }

    pub fn session_list(&mut self) -> Result<Vec<SessionInfo>, AgentError> {
        self.send(&Request::SessionList)?;
        match self.recv(Some(self.timeouts.reply))? {
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

    /// Reads a whole file; `limit` (0: none) makes larger files an error instead.
    pub fn read_file(&mut self, path: &str, limit: u64) -> Result<Vec<u8>, AgentError> {
        let mut out = Vec::new();
        self.read_file_to(path, limit, &mut out)?;
        Ok(out)
    }

    /// Streams a file into `sink`; returns its size.
    pub fn read_file_to(&mut self, path: &str, limit: u64, sink: &mut dyn Write) -> Result<u64, AgentError> {
        self.send(&Request::FileRead { path: path.to_string(), limit })?;
        let mut total = 0u64;
        loop {
            match self.recv(Some(self.timeouts.reply))? {
                Reply::Data(data) => {
                    total += data.len() as u64;
                    if limit > 0 && total > limit {
                        return Err(self.fail(format!("agent sent more than the {limit}-byte limit")));
                    }
                    if let Err(e) = sink.write_all(&data) {
                        // The rest of the file is still on its way: this connection is out of step.
                        self.broken = Some(format!("local write failed during a file read: {e}"));
                        let _ = self.conn.shutdown(Shutdown::Both);
                        return Err(AgentError::Io(e));
                    }
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

    /// Replaces a file atomically with everything `source` yields.
    pub fn write_file_from(&mut self, spec: &WriteSpec, source: &mut dyn Read) -> Result<u64, AgentError> {
        self.simple(&Request::FileWrite(spec.clone()), "file write")?;
        let mut buf = vec![0u8; CHUNK];
        loop {
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
            if n == 0 {
                break;
            }
            self.send(&Request::Data(buf[..n].to_vec()))?;
        }
        self.send(&Request::DataEnd)?;
        match self.recv(Some(self.timeouts.reply))? {
            Reply::Written { size } => Ok(size),
            other => Err(self.unexpected(other, "file write")),
        }
    }

    pub fn list_dir(&mut self, path: &str) -> Result<Vec<DirEntry>, AgentError> {
        self.send(&Request::FileList { path: path.to_string() })?;
        let mut all = Vec::new();
        loop {
            match self.recv(Some(self.timeouts.reply))? {
                Reply::DirEntries { entries, more } => {
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
        self.send(&Request::FileStat { path: path.to_string() })?;
        match self.recv(Some(self.timeouts.reply))? {
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

    /// Sets and unsets variables for every later command and session.
    pub fn set_env(&mut self, set: &[(String, String)], unset: &[String]) -> Result<(), AgentError> {
        self.simple(&Request::SetEnv { set: EnvVars(set.to_vec()), unset: unset.to_vec() }, "set env")
    }

    /// Installs the appliance CA; returns the path of the combined trust bundle.
    pub fn install_ca(&mut self, pem: &[u8]) -> Result<String, AgentError> {
        self.send(&Request::InstallCa { pem: pem.to_vec() })?;
        match self.recv(Some(self.timeouts.reply))? {
            Reply::CaInstalled { bundle_path } => Ok(bundle_path),
            other => Err(self.unexpected(other, "install CA")),
        }
    }

    /// Asks the sandbox to power off or reboot; the agent acknowledges before acting.
    pub fn power(&mut self, action: Power) -> Result<(), AgentError> {
        self.simple(&Request::Power(action), "power")
    }

    /// A request answered by `Ok`.
    fn simple(&mut self, request: &Request, what: &str) -> Result<(), AgentError> {
        self.send(request)?;
        match self.recv(Some(self.timeouts.reply))? {
            Reply::Ok => Ok(()),
            other => Err(self.unexpected(other, what)),
        }
    }

    fn send(&mut self, request: &Request) -> Result<(), AgentError> {
        if let Some(why) = &self.broken {
            return Err(AgentError::Protocol(format!("connection unusable after an earlier failure ({why})")));
        }
        let bytes =
            request.to_frame().map_err(|e| AgentError::InvalidRequest(format!("{} request: {e}", request.name())))?;
        self.conn.write_all(&bytes).and_then(|()| self.conn.flush()).map_err(|e| {
            self.broken = Some(format!("write failed: {e}"));
            AgentError::Io(e)
        })
    }

    fn recv(&mut self, idle: Option<Duration>) -> Result<Reply, AgentError> {
        if let Some(why) = &self.broken {
            return Err(AgentError::Protocol(format!("connection unusable after an earlier failure ({why})")));
        }
        let frame = match frame::read_frame(&mut self.conn, idle, self.timeouts.frame) {
            Ok(frame) => frame,
            Err(e) => {
                self.broken = Some(e.to_string());
                let _ = self.conn.shutdown(Shutdown::Both);
                return Err(match e {
                    FrameError::Io(io) => AgentError::Io(io),
                    FrameError::Closed => {
                        AgentError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "agent closed the connection"))
                    }
                    FrameError::Idle => AgentError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("agent did not reply within {:?}", idle.unwrap_or_default()),
                    )),
                    other => AgentError::Protocol(other.to_string()),
                });
            }
        };
        Reply::decode(frame.kind, &frame.payload).map_err(|e| self.fail(format!("malformed reply: {e}")))
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
        match self.client.recv(idle)? {
            Reply::Output { stream, data } => Ok(AttachEvent::Output { stream, data }),
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
        }
    }
}

impl WriteSpec {
    /// Default mode, parents created.
    pub fn new(path: impl Into<String>) -> WriteSpec {
        WriteSpec { path: path.into(), mode: None, create_parents: true }
    }
}

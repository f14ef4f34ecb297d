//! Talking to a sandbox's agent over vsock: one connection per request (vsock connects in
//! microseconds), and the agent's types translated into the runtime's.

use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

use agent_protocol::client::{AgentClient, AgentError, AttachEvent, AttachWriter};
use agent_protocol::message::{
    Command, EnvVars, ErrorCode, ExitStatus, OutputStream, PtySpec, RunSpec, SessionSpec, WindowSize,
};
use agent_protocol::AGENT_PORT;
use vsock::VsockStream;

use crate::runtime::{
    DirEntry, ExecAttachment, ExecEvent, ExecOutput, ExecRequest, ExecSessionInfo, PtyRequest, RuntimeError,
};

/// A command's stdout and stderr are each kept up to this size (the rest is counted, not kept).
pub const MAX_OUTPUT: u64 = 16 << 20;
/// The `timeout` convention for a command killed at its deadline.
const TIMED_OUT_EXIT: i32 = 124;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Output events an attachment queues for its consumer. When the consumer (a WebSocket client)
/// is slower than the guest, the reader thread blocks here and stops reading vsock, so a
/// flooding guest is held back instead of growing the appliance's memory.
const ATTACH_QUEUE: usize = 64;
/// Bytes of OS randomness a resumed guest mixes into its pool.
const RESUME_ENTROPY: usize = 64;

pub type Agent = AgentClient<VsockStream>;

pub fn connect(cid: u32) -> Result<Agent, RuntimeError> {
    AgentClient::connect_vsock(cid, AGENT_PORT, CONNECT_TIMEOUT).map_err(to_runtime)
}

/// Connects and pings until the agent answers, `limit` passes, or `vm_ended` says so.
pub fn wait_ready(cid: u32, limit: Duration, vm_ended: &dyn Fn() -> bool) -> Result<Agent, RuntimeError> {
    match AgentClient::wait_for_agent(cid, AGENT_PORT, limit, vm_ended) {
        Ok((client, _)) => Ok(client),
        Err(_) if vm_ended() => Err(RuntimeError::Failed("the VM ended before its agent answered".into())),
        Err(e) => Err(RuntimeError::Failed(format!("the agent did not answer within {}s: {e}", limit.as_secs()))),
    }
}

/// Tells a resumed guest's agent the current time and gives it 64 bytes of fresh entropy.
pub fn resumed(agent: &mut Agent) -> Result<(), RuntimeError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| RuntimeError::Failed(format!("the appliance's clock is before 1970: {e}")))?;
    let wall_clock_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
    let mut entropy = zeroize::Zeroizing::new([0u8; RESUME_ENTROPY]);
    crate::crypto::random_bytes(entropy.as_mut_slice())
        .map_err(|e| RuntimeError::Failed(format!("no entropy for the resumed guest: {e}")))?;
    agent.resumed(wall_clock_ns, entropy.as_slice()).map_err(to_runtime)
}

/// Translates an agent failure. The guest's own doing (a broken protocol, an overrun deadline
/// or cap, silence) becomes `Guest`, which the API answers with 502; the message says "the
/// sandbox's agent" because the sandbox id is not known here.
pub fn to_runtime(e: AgentError) -> RuntimeError {
    match e {
        AgentError::Remote { code: ErrorCode::NotFound, message } => RuntimeError::NotFound(message),
        AgentError::Remote { code: ErrorCode::Conflict, message } => RuntimeError::Conflict(message),
        AgentError::Remote { code: ErrorCode::NoSpace, message } => RuntimeError::NoSpace(message),
        AgentError::Remote {
            code:
                ErrorCode::BadRequest
                | ErrorCode::PermissionDenied
                | ErrorCode::AlreadyExists
                | ErrorCode::NotADirectory
                | ErrorCode::IsADirectory
                | ErrorCode::DirectoryNotEmpty
                | ErrorCode::TooLarge,
            message,
        } => RuntimeError::Invalid(message),
        AgentError::InvalidRequest(m) => RuntimeError::Invalid(m),
        AgentError::Protocol(_) | AgentError::Deadline(_) => {
            RuntimeError::Guest(format!("the sandbox's agent misbehaved: {e}"))
        }
        AgentError::Io(ref io) if io.kind() == std::io::ErrorKind::TimedOut => {
            RuntimeError::Guest(format!("the sandbox's agent stopped answering: {e}"))
        }
        other => RuntimeError::Failed(other.to_string()),
    }
}

fn env_of(request: &ExecRequest) -> EnvVars {
    EnvVars(request.envs.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

pub fn run(agent: &mut Agent, request: &ExecRequest) -> Result<ExecOutput, RuntimeError> {
    let spec = RunSpec {
        command: Command::Shell(request.command_line.clone()),
        env: env_of(request),
        cwd: request.cwd.clone(),
        timeout_ms: request.timeout_sec.saturating_mul(1000),
        max_output: MAX_OUTPUT,
        user: request.user.clone(),
    };
    let out = agent.run(&spec).map_err(to_runtime)?;
    let mut stderr = out.stderr;
    // The wire contract has no fields for these, so they are told where a person looks.
    if out.exit.stdout_truncated || out.exit.stderr_truncated {
        stderr.extend_from_slice(
            format!("\n[opencomputer: output beyond {} MiB per stream was dropped]\n", MAX_OUTPUT >> 20).as_bytes(),
        );
    }
    let exit_code = if out.exit.timed_out {
        stderr.extend_from_slice(
            format!("\n[opencomputer: command killed after its {}s timeout]\n", request.timeout_sec).as_bytes(),
        );
        TIMED_OUT_EXIT
    } else {
        out.exit.status.shell_code()
    };
    Ok(ExecOutput { exit_code, stdout: out.stdout, stderr })
}

pub fn session_start(agent: &mut Agent, request: &ExecRequest) -> Result<String, RuntimeError> {
    let spec = SessionSpec {
        command: Command::Shell(request.command_line.clone()),
        env: env_of(request),
        cwd: request.cwd.clone(),
        user: request.user.clone(),
    };
    agent.session_start(&spec).map(|(id, _pid)| id.to_string()).map_err(to_runtime)
}

/// A terminal: the guest's login shell, or `shell` (a program, run without arguments).
pub fn pty_start(agent: &mut Agent, request: &PtyRequest) -> Result<String, RuntimeError> {
    let spec = PtySpec {
        command: request.shell.as_ref().map(|program| Command::Argv(vec![program.clone()])),
        env: EnvVars::default(),
        cwd: request.cwd.clone(),
        size: WindowSize { cols: request.cols, rows: request.rows },
        user: request.user.clone(),
    };
    agent.pty_start(&spec).map(|(id, _pid)| id.to_string()).map_err(to_runtime)
}

pub fn session_list(agent: &mut Agent) -> Result<Vec<ExecSessionInfo>, RuntimeError> {
    let sessions = agent.session_list().map_err(to_runtime)?;
    Ok(sessions
        .into_iter()
        .map(|s| ExecSessionInfo {
            session_id: s.id.to_string(),
            command_line: s.command,
            running: s.exit.is_none(),
            exit_code: s.exit.map(ExitStatus::shell_code),
        })
        .collect())
}

pub fn session_id(text: &str) -> Result<u32, RuntimeError> {
    text.parse().map_err(|_| RuntimeError::NotFound(format!("no exec session {text:?}")))
}

/// Streams a session's output into a bounded channel from a reader thread; stdin goes straight
/// out. Dropping the attachment's stdin closes the attachment, which ends the reader thread.
pub fn attach(agent: Agent, session: u32) -> Result<ExecAttachment, RuntimeError> {
    let (writer, mut reader) = agent.attach(session).map_err(to_runtime)?;
    let (tx, rx) = mpsc::sync_channel(ATTACH_QUEUE);
    std::thread::Builder::new()
        .name(format!("attach-{session}"))
        .spawn(move || loop {
            let event = match reader.next_event(None) {
                Ok(AttachEvent::Output { stream: OutputStream::Stdout, data }) => ExecEvent::Stdout(data),
                Ok(AttachEvent::Output { stream: OutputStream::Stderr, data }) => ExecEvent::Stderr(data),
                Ok(AttachEvent::ReplayEnd) => ExecEvent::ReplayEnd,
                Ok(AttachEvent::Notice { .. }) => continue,
                Ok(AttachEvent::Ended(status)) => {
                    let _ = tx.send(ExecEvent::Exit(status.shell_code()));
                    return;
                }
                // The connection ended without an exit status: the sandbox went away.
                Err(_) => return,
            };
            if tx.send(event).is_err() {
                return;
            }
        })
        .map_err(|e| RuntimeError::Failed(format!("cannot start the attach thread: {e}")))?;
    Ok(ExecAttachment { events: rx, stdin: Box::new(StdinWriter(Some(writer))) })
}

/// The attachment's stdin; `None` only while being dropped.
struct StdinWriter(Option<AttachWriter<VsockStream>>);

impl Write for StdinWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let writer = self.0.as_mut().ok_or_else(|| std::io::Error::other("the attachment is closed"))?;
        writer.stdin(buf).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for StdinWriter {
    /// The consumer is gone: shutting the connection down ends the reader thread's wait even
    /// when the session is silent or the guest ignores a detach.
    fn drop(&mut self) {
        if let Some(writer) = self.0.take() {
            writer.close();
        }
    }
}

pub fn list_dir(agent: &mut Agent, path: &str) -> Result<Vec<DirEntry>, RuntimeError> {
    let entries = agent.list_dir(path).map_err(to_runtime)?;
    Ok(entries.into_iter().map(|e| DirEntry { name: e.name, path: e.path, is_dir: e.is_dir, size: e.size }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_map_to_http_meaningful_runtime_errors() {
        let remote = |code| AgentError::Remote { code, message: "m".into() };
        assert!(matches!(to_runtime(remote(ErrorCode::NotFound)), RuntimeError::NotFound(_)));
        assert!(matches!(to_runtime(remote(ErrorCode::IsADirectory)), RuntimeError::Invalid(_)));
        assert!(matches!(to_runtime(remote(ErrorCode::Conflict)), RuntimeError::Conflict(_)));
        assert!(matches!(to_runtime(remote(ErrorCode::NoSpace)), RuntimeError::NoSpace(_)));
        assert!(matches!(to_runtime(remote(ErrorCode::Busy)), RuntimeError::Failed(_)));
        let unanswered = AgentError::Io(std::io::Error::other("connection refused"));
        assert!(matches!(to_runtime(unanswered), RuntimeError::Failed(_)));
    }

    #[test]
    fn a_misbehaving_guest_is_a_bad_gateway_that_says_what_it_did() {
        let cases = [
            AgentError::Protocol("agent listed more than 100000 entries (MAX_DIR_ENTRIES)".into()),
            AgentError::Deadline("agent kept the file list going past its 30 s deadline".into()),
            AgentError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "agent did not reply to the stat")),
        ];
        for (error, said) in cases.into_iter().zip(["MAX_DIR_ENTRIES", "30 s deadline", "did not reply"]) {
            let runtime = to_runtime(error);
            assert!(matches!(runtime, RuntimeError::Guest(_)), "{runtime:?}");
            let answer = crate::lifecycle::runtime_error(runtime);
            assert_eq!(answer.status, 502);
            assert!(answer.message.contains("the sandbox's agent") && answer.message.contains(said), "{answer}");
        }
    }

    #[test]
    fn session_ids_are_numbers() {
        assert_eq!(session_id("12").expect("id"), 12);
        assert!(matches!(session_id("../x"), Err(RuntimeError::NotFound(_))));
    }
}

//! Running commands in a sandbox: one-shot (`exec/run`, `commands`) and background
//! sessions with a WebSocket stream (frames: 0x00 stdin, 0x01 stdout, 0x02 stderr,
//! 0x03 exit code as int32 BE, 0x04 the end of the replay of earlier output). Terminals
//! (`pty`) stream through the same WebSocket code with raw frames.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::{Header, Request, Response};

use crate::api::sandboxes::check_envs;
use crate::api::{exec_wait, validate};
use crate::app::App;
use crate::clock::{now_unix, rfc3339};
use crate::connsock::dup_connection;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{header, parse_json, read_body, MAX_JSON_BODY};
use crate::lifecycle::runtime_error;
use crate::runtime::{ExecEvent, ExecOutput, ExecRequest};
use crate::sandbox_ops::require_running;
use crate::store::records::SandboxRecord;
use crate::websocket::{self, Incoming, WsError};

/// Default limit of a one-shot command when the request gives none.
pub const DEFAULT_RUN_TIMEOUT_SEC: u64 = 60;

#[derive(Deserialize)]
struct ExecBody {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
    timeout: Option<u64>,
}

#[derive(Deserialize)]
struct KillBody {
    signal: Option<i32>,
}

/// Quotes one argument for `sh -c`: inside single quotes only `'` needs care.
fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

fn exec_request(body: ExecBody, default_timeout: u64) -> Result<ExecRequest, AppError> {
    if body.cmd.trim().is_empty() {
        return Err(AppError::bad_request("cmd must not be empty"));
    }
    if body.cmd.contains('\0') || body.args.iter().any(|a| a.contains('\0')) {
        return Err(AppError::bad_request("cmd and args must not contain NUL bytes"));
    }
    check_envs(&body.envs)?;
    let mut line = body.cmd;
    for arg in &body.args {
        line.push(' ');
        line.push_str(&shell_quote(arg));
    }
    let cwd = body.cwd.filter(|c| !c.is_empty());
    if let Some(c) = &cwd {
        validate::sandbox_path(Some(c.clone()))?;
    }
    let timeout_sec = match body.timeout {
        None | Some(0) => default_timeout,
        Some(t) => validate::timeout_sec("timeout", t)?,
    };
    Ok(ExecRequest { command_line: line, envs: body.envs, cwd, timeout_sec, user: None })
}

/// A command runs as its template's user (an image's `User`), and in its `WorkingDir` when it
/// names no working directory.
fn template_defaults(app: &App, sandbox: &SandboxRecord, exec: &mut ExecRequest) -> Result<(), AppError> {
    let defaults = crate::templates::defaults(app, &sandbox.template)?;
    if exec.cwd.is_none() {
        exec.cwd = defaults.working_dir;
    }
    exec.user = defaults.user;
    Ok(())
}

fn output_json(out: &ExecOutput) -> Value {
    json!({
        "exitCode": out.exit_code,
        "stdout": String::from_utf8_lossy(&out.stdout),
        "stderr": String::from_utf8_lossy(&out.stderr),
    })
}

/// `exec/run` and `commands` (same body; `commands` never takes args but accepts them the
/// same way). Answers `request` itself when the command runs long (`exec_wait`).
pub fn run(app: &App, raw_id: &str, mut request: Request) -> exec_wait::Answered {
    let prepared = (|| {
        let id = validate::uuid("sandbox", raw_id)?;
        let body: ExecBody = parse_json(&read_body(&mut request, MAX_JSON_BODY)?)?;
        let mut exec = exec_request(body, DEFAULT_RUN_TIMEOUT_SEC)?;
        let (backend, record) = require_running(app, &id)?;
        template_defaults(app, &record, &mut exec)?;
        Ok::<_, AppError>((id, exec, Arc::clone(&backend.runtime)))
    })();
    match prepared {
        Ok((id, exec, runtime)) => exec_wait::run(runtime, &id, exec, request, output_json),
        Err(e) => exec_wait::Answered::Reply(Reply::error(&e), Box::new(request)),
    }
}

/// `exec/run-async`: the result at once if the command ends within a moment, else its id.
pub fn run_async(app: &App, raw_id: &str, request: &mut Request) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let body: ExecBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    let mut exec = exec_request(body, DEFAULT_RUN_TIMEOUT_SEC)?;
    let (backend, record) = require_running(app, &id)?;
    template_defaults(app, &record, &mut exec)?;
    let (status, body) = app.async_execs.start(std::sync::Arc::clone(&backend.runtime), &id, exec)?;
    Ok(Reply::json(status, &body))
}

/// `exec/{execId}/result`.
pub fn async_result(app: &App, raw_id: &str, exec_id: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let exec_id = validate::uuid("exec", exec_id)?;
    Ok(Reply::json(200, &app.async_execs.result(&id, &exec_id)?))
}

pub fn start_session(app: &App, raw_id: &str, request: &mut Request) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let body: ExecBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    // 0: a session runs until it exits, is killed, or the sandbox stops.
    let mut exec = exec_request(body, 0)?;
    let (backend, record) = require_running(app, &id)?;
    template_defaults(app, &record, &mut exec)?;
    let session_id = backend.runtime.exec_start(&id, &exec).map_err(runtime_error)?;
    let now = now_unix();
    app.exec_sessions.started(&id, &session_id, now);
    Ok(Reply::json(
        201,
        &json!({
            "sessionID": session_id,
            "sandboxID": id,
            "command": exec.command_line,
            "args": [],
            "running": true,
            "startedAt": rfc3339(now),
            "attachedClients": 0,
        }),
    ))
}

pub fn list_sessions(app: &App, raw_id: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let (backend, _) = require_running(app, &id)?;
    let sessions = backend.runtime.exec_list(&id).map_err(runtime_error)?;
    let listed: Vec<&str> = sessions.iter().map(|s| s.session_id.as_str()).collect();
    let facts = app.exec_sessions.facts(&id, &listed, now_unix());
    // The fields the OpenComputer SDKs read (`command`; `exitCode` only once ended), and `cmd`,
    // which clients of earlier versions of this API read. The command line is one string here,
    // so `args` is empty. `startedAt` is null for a session started before a restart.
    let body: Vec<Value> = sessions
        .iter()
        .map(|s| {
            let known = facts.get(&s.session_id).copied().unwrap_or_default();
            let mut entry = json!({
                "sessionID": s.session_id,
                "sandboxID": id,
                "command": s.command_line,
                "cmd": s.command_line,
                "args": [],
                "running": s.running,
                "startedAt": known.started_at.map(rfc3339),
                "attachedClients": known.attached_clients,
            });
            if let (Some(code), Some(fields)) = (s.exit_code, entry.as_object_mut()) {
                fields.insert("exitCode".into(), json!(code));
            }
            entry
        })
        .collect();
    Ok(Reply::json(200, &body))
}

pub fn session_id(raw: &str) -> Result<String, AppError> {
    let ok =
        !raw.is_empty() && raw.len() <= 128 && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(raw.to_string())
    } else {
        Err(AppError::bad_request(format!("invalid session id {raw:?}")))
    }
}

pub fn kill_session(app: &App, raw_id: &str, raw_sid: &str, request: &mut Request) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let sid = session_id(raw_sid)?;
    let body = read_body(request, MAX_JSON_BODY)?;
    let signal = if body.iter().all(u8::is_ascii_whitespace) { None } else { parse_json::<KillBody>(&body)?.signal };
    let signal = signal.unwrap_or(libc::SIGKILL);
    if !(1..=64).contains(&signal) {
        return Err(AppError::bad_request(format!("signal must be between 1 and 64, got {signal}")));
    }
    let (backend, _) = require_running(app, &id)?;
    backend.runtime.exec_kill(&id, &sid, signal).map_err(runtime_error)?;
    Ok(Reply::no_content())
}

pub fn is_websocket_upgrade(request: &Request) -> bool {
    header(request, "Upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// How a session's bytes travel in WebSocket messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exec sessions: a stream byte before each payload (0x00 stdin; 0x01 stdout, 0x02
    /// stderr, 0x03 exit code as int32 BE), as the SDKs' exec attach reads them.
    Tagged,
    /// Terminals: raw bytes both ways (client text or binary messages are typed in as they
    /// are; output goes out as binary); the end of the session is the close itself.
    Raw,
}

impl Framing {
    /// The input a client message carries, if any (a tagged message without the stdin tag
    /// carries none).
    fn input(self, message: &[u8]) -> Option<&[u8]> {
        match self {
            Framing::Tagged => message.strip_prefix(&[0x00]),
            Framing::Raw => Some(message),
        }
    }

    /// The message carrying output of stream `tag` (0x01 stdout, 0x02 stderr).
    fn output(self, tag: u8, data: &[u8]) -> Vec<u8> {
        match self {
            Framing::Tagged => {
                let mut message = Vec::with_capacity(data.len() + 1);
                message.push(tag);
                message.extend_from_slice(data);
                message
            }
            Framing::Raw => data.to_vec(),
        }
    }

    /// The message saying the replay of earlier output is over, if this framing has one.
    fn replay_end(self) -> Option<Vec<u8>> {
        match self {
            Framing::Tagged => Some(vec![0x04]),
            Framing::Raw => None,
        }
    }

    /// The message announcing the exit code before the close, if this framing has one.
    fn exit(self, code: i32) -> Option<Vec<u8>> {
        match self {
            Framing::Tagged => Some(self.output(0x03, &code.to_be_bytes())),
            Framing::Raw => None,
        }
    }
}

/// Attaches a WebSocket to a session (an exec session, or a terminal with `Framing::Raw`).
/// Returns the HTTP status that was sent (101 when the stream ran, or the error status).
pub fn attach_websocket(
    app: &App,
    raw_id: &str,
    raw_sid: &str,
    request: Request,
    listen_port: u16,
    framing: Framing,
) -> u16 {
    let prepared = (|| {
        let id = validate::uuid("sandbox", raw_id)?;
        let sid = session_id(raw_sid)?;
        let key = header(&request, "Sec-WebSocket-Key")
            .ok_or_else(|| AppError::bad_request("missing Sec-WebSocket-Key header"))?
            .to_string();
        if header(&request, "Sec-WebSocket-Version").map(str::trim) != Some("13") {
            return Err(AppError::bad_request("unsupported WebSocket version (need 13)"));
        }
        let peer = *request.remote_addr().ok_or_else(|| AppError::internal("connection has no peer address"))?;
        let (backend, _) = require_running(app, &id)?;
        let attachment = backend.runtime.exec_attach(&id, &sid).map_err(runtime_error)?;
        Ok((key, peer, attachment, id, sid))
    })();
    let (key, peer, attachment, id, sid) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let status = e.status;
            let _ = request.respond(Reply::error(&e).into_response());
            return status;
        }
    };
    let Some(socket) = dup_connection(peer, listen_port) else {
        let e = AppError::internal("cannot take over the connection for the WebSocket stream");
        let _ = request.respond(Reply::error(&e).into_response());
        return 500;
    };
    let mut response = Response::empty(101);
    if let Ok(h) = Header::from_bytes(&b"Sec-WebSocket-Accept"[..], websocket::accept_key(&key).as_bytes()) {
        response.add_header(h);
    }
    // tiny_http writes the 101 and then leaves the socket to us until `_upgraded` drops.
    let _upgraded = request.upgrade("websocket", response);
    let _attached = app.exec_sessions.attach(&id, &sid);
    // Frames either way are activity on the sandbox: they renew its idle timeout.
    stream_session(socket, attachment, framing, &|| app.lifecycle.touch(raw_id, crate::clock::now_unix()));
    101
}

fn stream_session(
    socket: TcpStream,
    attachment: crate::runtime::ExecAttachment,
    framing: Framing,
    activity: &dyn Fn(),
) {
    let Ok(write_half) = socket.try_clone() else { return };
    let writer = Arc::new(Mutex::new(write_half));
    let client_gone = Arc::new(AtomicBool::new(false));
    // Set by the reader on every client frame, taken by the loop below.
    let client_spoke = Arc::new(AtomicBool::new(false));
    let reader = spawn_client_reader(
        socket,
        attachment.stdin,
        framing,
        Arc::clone(&writer),
        Arc::clone(&client_gone),
        Arc::clone(&client_spoke),
    );
    let send = |message: &[u8]| -> bool {
        match writer.lock() {
            Ok(mut w) => websocket::write_frame(&mut *w, websocket::OP_BINARY, message).is_ok(),
            Err(_) => false,
        }
    };
    // A hostile agent may announce the end of its replay more than once; clients get it once.
    let mut replay_ended = false;
    loop {
        if client_gone.load(Ordering::Relaxed) {
            break;
        }
        if client_spoke.swap(false, Ordering::Relaxed) {
            activity();
        }
        let event = attachment.events.recv_timeout(Duration::from_millis(200));
        if event.is_ok() {
            activity();
        }
        match event {
            Ok(ExecEvent::Stdout(d)) => {
                if !send(&framing.output(0x01, &d)) {
                    break;
                }
            }
            Ok(ExecEvent::Stderr(d)) => {
                if !send(&framing.output(0x02, &d)) {
                    break;
                }
            }
            Ok(ExecEvent::ReplayEnd) => {
                if let Some(message) = framing.replay_end().filter(|_| !replay_ended) {
                    if !send(&message) {
                        break;
                    }
                }
                replay_ended = true;
            }
            Ok(ExecEvent::Exit(code)) => {
                if let Some(message) = framing.exit(code) {
                    send(&message);
                }
                if let Ok(mut w) = writer.lock() {
                    let _ = websocket::write_close(&mut *w, 1000, "exited");
                }
                break;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if let Ok(mut w) = writer.lock() {
                    let _ = websocket::write_close(&mut *w, 1011, "session output ended");
                }
                break;
            }
        }
    }
    // Shutting the socket down ends the reader thread and tiny_http's connection.
    if let Ok(w) = writer.lock() {
        let _ = w.shutdown(Shutdown::Both);
    }
    if let Ok(handle) = reader {
        let _ = handle.join();
    }
}

/// Reads the client's frames on a thread of its own: input goes to the session, pings are
/// answered; sets `client_spoke` on each frame and `client_gone` when the client leaves.
fn spawn_client_reader(
    mut read_half: TcpStream,
    mut stdin: Box<dyn Write + Send>,
    framing: Framing,
    writer: Arc<Mutex<TcpStream>>,
    client_gone: Arc<AtomicBool>,
    client_spoke: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("ws-reader".into()).spawn(move || {
        loop {
            let message = websocket::read_message(&mut read_half);
            if matches!(message, Ok(Incoming::Data(_) | Incoming::Ping(_) | Incoming::Pong)) {
                client_spoke.store(true, Ordering::Relaxed);
            }
            match message {
                Ok(Incoming::Data(msg)) => {
                    // Only input travels client -> server; other messages are ignored.
                    let input = framing.input(&msg).filter(|data| !data.is_empty());
                    if input.is_some_and(|data| stdin.write_all(data).and_then(|()| stdin.flush()).is_err()) {
                        break;
                    }
                }
                Ok(Incoming::Ping(p)) => {
                    if let Ok(mut w) = writer.lock() {
                        let _ = websocket::write_frame(&mut *w, websocket::OP_PONG, &p);
                    }
                }
                Ok(Incoming::Pong) => {}
                Ok(Incoming::Close) => break,
                Err(WsError::Protocol(code, why)) => {
                    if let Ok(mut w) = writer.lock() {
                        let _ = websocket::write_close(&mut *w, code, why);
                    }
                    break;
                }
                Err(WsError::Io(_)) => break,
            }
        }
        client_gone.store(true, Ordering::Relaxed);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_frames_carry_a_stream_byte_and_raw_frames_only_the_bytes() {
        assert_eq!(Framing::Tagged.input(b"\x00ls\n"), Some(&b"ls\n"[..]));
        assert_eq!(Framing::Tagged.input(b"\x01ls\n"), None);
        assert_eq!(Framing::Raw.input(b"\x00ls\n"), Some(&b"\x00ls\n"[..]));
        assert_eq!(Framing::Tagged.output(0x02, b"e"), b"\x02e");
        assert_eq!(Framing::Raw.output(0x01, b"\x1b[2J"), b"\x1b[2J");
        assert_eq!(Framing::Tagged.exit(-1), Some(vec![0x03, 0xff, 0xff, 0xff, 0xff]));
        assert_eq!(Framing::Raw.exit(0), None);
    }

    #[test]
    fn args_are_quoted_for_sh() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let req = exec_request(
            ExecBody {
                cmd: "echo".into(),
                args: vec!["$HOME".into()],
                envs: BTreeMap::new(),
                cwd: None,
                timeout: None,
            },
            60,
        )
        .expect("valid");
        assert_eq!(req.command_line, "echo '$HOME'");
        assert_eq!(req.timeout_sec, 60);
    }
}

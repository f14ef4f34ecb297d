//! The agent server: accepts connections from any transport, reads request frames and answers
//! them, one thread per connection. Every malformed, oversized or stalled frame is answered with
//! an error frame (and, when framing is lost, the connection closed); nothing a client sends
//! can crash or wedge the agent.

use super::ca::{self, CaPaths};
use super::env::EnvStore;
use super::error::{Failure, OpError};
use super::sessions::{Event, Session, Sessions};
use super::{exec, files, paths, resume};
use agent_protocol::frame::{self, FrameError};
use agent_protocol::message::{Reply, Request};
use agent_protocol::transport::{Connection, Listener};
use agent_protocol::{ErrorCode, OutputStream, Power, RunSpec, WriteSpec};
use std::io;
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

/// Output frames carry at most this much (well under the frame limit).
const OUTPUT_CHUNK: usize = 64 * 1024;
/// Directory listings are sent in batches of about this many bytes.
const LIST_BATCH: usize = 256 * 1024;

/// What the agent does on a power request (in a sandbox: signal PID 1).
pub type PowerHandler = Arc<dyn Fn(Power) -> io::Result<()> + Send + Sync>;

pub struct AgentConfig {
    /// Default working directory, and the base of relative paths.
    pub home: PathBuf,
    pub ca: CaPaths,
    pub power: PowerHandler,
    /// How long a connection may sit between requests (None: indefinitely).
    pub idle_timeout: Option<Duration>,
    /// How long a frame, once begun, may take to arrive; also between the chunks of a write.
    pub frame_timeout: Duration,
    /// How long a write to a client may block before the client is dropped.
    pub write_timeout: Duration,
    pub max_connections: usize,
}

impl AgentConfig {
    pub fn new(home: impl Into<PathBuf>, ca: CaPaths, power: PowerHandler) -> AgentConfig {
        AgentConfig {
            home: home.into(),
            ca,
            power,
            idle_timeout: None,
            frame_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_connections: 512,
        }
    }
}

/// The agent: its configuration and the state shared by all connections.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

struct Shared {
    config: AgentConfig,
    env: EnvStore,
    sessions: Sessions,
    connections: AtomicUsize,
}

/// Whether a connection continues after a request.
enum Flow {
    Continue,
    Close,
}

impl Agent {
    pub fn new(config: AgentConfig) -> Agent {
        Agent {
            shared: Arc::new(Shared {
                config,
                env: EnvStore::default(),
                sessions: Sessions::default(),
                connections: AtomicUsize::new(0),
            }),
        }
    }

    /// Accepts connections forever, each served on its own thread.
    pub fn serve<L: Listener>(&self, listener: L) -> ! {
        loop {
            match listener.accept() {
                Ok(conn) => self.spawn_handler(conn),
                Err(e) => {
                    crate::sys::console::line("agent", &format!("accept failed: {e}"));
                    // Out of descriptors or memory: wait for some to be released.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn spawn_handler<C: Connection>(&self, mut conn: C) {
        let shared = Arc::clone(&self.shared);
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= shared.config.max_connections {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = send(&mut conn, &Reply::error(ErrorCode::Busy, "too many agent connections"));
            return;
        }
        let spawned = std::thread::Builder::new().name("agent-conn".into()).spawn(move || {
            handle_connection(&shared, conn);
            shared.connections.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            self.shared.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Serves one connection on the calling thread until it closes.
    pub fn handle<C: Connection>(&self, conn: C) {
        handle_connection(&self.shared, conn);
    }
}

fn send<C: Connection>(conn: &mut C, reply: &Reply) -> io::Result<()> {
    let bytes = reply.to_frame().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    conn.write_all(&bytes)
}

fn send_error<C: Connection>(conn: &mut C, e: &OpError) -> io::Result<()> {
    send(conn, &Reply::error(e.code, e.message.clone()))
}

/// Reports a framing failure (when there is a peer to tell) and closes.
fn close_after<C: Connection>(conn: &mut C, e: &FrameError) {
    if let Some(code) = e.reply_code() {
        let _ = send(conn, &Reply::error(code, e.to_string()));
    }
    let _ = conn.shutdown(Shutdown::Both);
}

fn handle_connection<C: Connection>(shared: &Shared, mut conn: C) {
    let config = &shared.config;
    if conn.set_write_timeout(Some(config.write_timeout)).is_err() {
        return;
    }
    loop {
        let frame = match frame::read_frame(&mut conn, config.idle_timeout, config.frame_timeout) {
            Ok(frame) => frame,
            Err(e) => return close_after(&mut conn, &e),
        };
        let flow = match Request::decode(frame.kind, &frame.payload) {
            Ok(request) => dispatch(shared, &mut conn, request),
            Err(e) => send(&mut conn, &Reply::error(ErrorCode::BadRequest, format!("malformed request: {e}")))
                .map(|()| Flow::Continue),
        };
        match flow {
            Ok(Flow::Continue) => {}
            Ok(Flow::Close) | Err(_) => {
                let _ = conn.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

fn dispatch<C: Connection>(shared: &Shared, conn: &mut C, request: Request) -> io::Result<Flow> {
    let home = shared.config.home.as_path();
    let reply = match request {
        Request::Ping => Ok(Reply::Pong { protocol: frame::VERSION, agent_version: env!("CARGO_PKG_VERSION").into() }),
        Request::Run(spec) => return run(shared, conn, &spec),
        Request::SessionStart(spec) => {
            shared.sessions.start(&spec, &shared.env, home).map(|(id, pid)| Reply::SessionStarted { id, pid })
        }
        Request::PtyStart(spec) => {
            shared.sessions.start_terminal(&spec, &shared.env, home).map(|(id, pid)| Reply::SessionStarted { id, pid })
        }
        Request::SessionResize { id, size } => shared.sessions.resize(id, size).map(|()| Reply::Ok),
        Request::SessionList => Ok(Reply::Sessions(shared.sessions.list())),
        Request::SessionKill { id, signal } => shared.sessions.kill(id, signal).map(|()| Reply::Ok),
        Request::SessionStdin { id, data } => shared.sessions.write_stdin(id, &data).map(|()| Reply::Ok),
        Request::SessionAttach { id } => return attach(shared, conn, id),
        Request::FileRead { path, limit } => return read_file(shared, conn, &path, limit),
        Request::FileWrite(spec) => return write_file(shared, conn, &spec),
        Request::FileList { path } => return list_dir(shared, conn, &path),
        Request::FileStat { path } => paths::resolve(&path, home).and_then(|p| files::stat(&p)).map(Reply::Stat),
        Request::Mkdir { path } => paths::resolve(&path, home).and_then(|p| files::mkdir(&p)).map(|()| Reply::Ok),
        Request::Remove { path, recursive } => {
            paths::resolve(&path, home).and_then(|p| files::remove(&p, recursive)).map(|()| Reply::Ok)
        }
        Request::Rename { from, to } => paths::resolve(&from, home)
            .and_then(|f| paths::resolve(&to, home).and_then(|t| files::rename(&f, &t)))
            .map(|()| Reply::Ok),
        Request::SetEnv { set, unset } => shared.env.update(&set.0, &unset).map(|()| Reply::Ok),
        Request::InstallCa { pem } => install_ca(shared, &pem),
        Request::Resumed { wall_clock_ns, entropy } => resume::apply(wall_clock_ns, &entropy).map(|()| {
            crate::sys::console::line("agent", "resumed from a snapshot: clock set, entropy added");
            Reply::Ok
        }),
        Request::SetHostname { name } => crate::sys::hostname::set(&name)
            .map(|()| Reply::Ok)
            .map_err(|e| OpError::bad_request(format!("hostname {name:?}: {e}"))),
        Request::SyncDisks => {
            crate::sys::fs::sync_all();
            Ok(Reply::Ok)
        }
        Request::Power(action) => return power(shared, conn, action),
        Request::Data(_) | Request::DataEnd => Err(OpError::bad_request("data frame outside a file write")),
        Request::Stdin(_) | Request::StdinClose => {
            Err(OpError::bad_request("stdin frame outside a session attachment"))
        }
    };
    match reply {
        Ok(reply) => send(conn, &reply)?,
        Err(e) => send_error(conn, &e)?,
    }
    Ok(Flow::Continue)
}

fn run<C: Connection>(shared: &Shared, conn: &mut C, spec: &RunSpec) -> io::Result<Flow> {
    let mut send_output = |stream: OutputStream, data: &[u8]| -> io::Result<()> {
        for piece in data.chunks(OUTPUT_CHUNK) {
            send(conn, &Reply::Output { stream, data: piece.to_vec() })?;
        }
        Ok(())
    };
    match exec::run(spec, &shared.env, &shared.config.home, &mut send_output) {
        Ok(exit) => send(conn, &Reply::Exited(exit))?,
        Err(Failure::Op(e)) => send_error(conn, &e)?,
        Err(Failure::Transport(e)) => return Err(e),
    }
    Ok(Flow::Continue)
}

fn read_file<C: Connection>(shared: &Shared, conn: &mut C, path: &str, limit: u64) -> io::Result<Flow> {
    let path = match paths::resolve(path, &shared.config.home) {
        Ok(p) => p,
        Err(e) => return send_error(conn, &e).map(|()| Flow::Continue),
    };
    match files::read(&path, limit, &mut |chunk| send(conn, &Reply::Data(chunk.to_vec()))) {
        Ok(size) => send(conn, &Reply::DataEnd { size })?,
        Err(Failure::Op(e)) => send_error(conn, &e)?,
        Err(Failure::Transport(e)) => return Err(e),
    }
    Ok(Flow::Continue)
}

/// FileWrite: answer Ok (or an error) at once, then take Data frames up to DataEnd, then report.
/// A write that fails midway still consumes the client's frames, so the connection stays in step.
fn write_file<C: Connection>(shared: &Shared, conn: &mut C, spec: &WriteSpec) -> io::Result<Flow> {
    let pending = paths::resolve(&spec.path, &shared.config.home)
        .and_then(|target| files::begin_write(&target, spec.mode, spec.create_parents));
    let mut pending = match pending {
        Ok(p) => Some(p),
        Err(e) => return send_error(conn, &e).map(|()| Flow::Continue),
    };
    send(conn, &Reply::Ok)?;
    let mut failure: Option<OpError> = None;
    let timeout = shared.config.frame_timeout;
    loop {
        // Dropping `pending` on any early return removes the temporary file.
        let frame = match frame::read_frame(conn, Some(timeout), timeout) {
            Ok(frame) => frame,
            Err(e) => {
                close_after(conn, &e);
                return Ok(Flow::Close);
            }
        };
        match Request::decode(frame.kind, &frame.payload) {
            Ok(Request::Data(data)) => {
                if let Some(p) = pending.as_mut() {
                    if let Err(e) = p.append(&data) {
                        failure = Some(e);
                        pending = None;
                    }
                }
            }
            Ok(Request::DataEnd) => break,
            Ok(other) => {
                let message = format!("expected data or data-end during a file write, got {}", other.name());
                send_error(conn, &OpError::bad_request(message))?;
                return Ok(Flow::Close);
            }
            Err(e) => {
                send_error(conn, &OpError::bad_request(format!("malformed frame during a file write: {e}")))?;
                return Ok(Flow::Close);
            }
        }
    }
    let result = match (failure, pending) {
        (Some(e), _) => Err(e),
        (None, Some(p)) => p.commit(),
        (None, None) => Err(OpError::new(ErrorCode::Io, "file write lost its temporary file")),
    };
    match result {
        Ok(size) => send(conn, &Reply::Written { size })?,
        Err(e) => send_error(conn, &e)?,
    }
    Ok(Flow::Continue)
}

fn list_dir<C: Connection>(shared: &Shared, conn: &mut C, path: &str) -> io::Result<Flow> {
    let entries = match paths::resolve(path, &shared.config.home).and_then(|p| files::list(&p)) {
        Ok(entries) => entries,
        Err(e) => return send_error(conn, &e).map(|()| Flow::Continue),
    };
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let total = entries.len();
    for (i, entry) in entries.into_iter().enumerate() {
        batch_bytes += entry.name.len() + entry.path.len() + 24;
        batch.push(entry);
        if batch_bytes >= LIST_BATCH && i + 1 < total {
            send(conn, &Reply::DirEntries { entries: std::mem::take(&mut batch), more: true })?;
            batch_bytes = 0;
        }
    }
    send(conn, &Reply::DirEntries { entries: batch, more: false })?;
    Ok(Flow::Continue)
}

fn install_ca(shared: &Shared, pem: &[u8]) -> Result<Reply, OpError> {
    let vars = ca::install(pem, &shared.config.ca)?;
    shared.env.update(&vars, &[])?;
    crate::sys::console::line(
        "agent",
        &format!("appliance CA installed; bundle {}", shared.config.ca.bundle.display()),
    );
    Ok(Reply::CaInstalled { bundle_path: shared.config.ca.bundle.to_string_lossy().into_owned() })
}

/// Acknowledges first: once the handler runs, the sandbox may go down at any moment.
fn power<C: Connection>(shared: &Shared, conn: &mut C, action: Power) -> io::Result<Flow> {
    send(conn, &Reply::Ok)?;
    crate::sys::console::line("agent", &format!("{action:?} requested"));
    if let Err(e) = (shared.config.power)(action) {
        crate::sys::console::line("agent", &format!("power request failed: {e}"));
    }
    Ok(Flow::Close)
}

/// SessionAttach: replay, then live output until the session ends or the client leaves. A
/// second thread reads the client's stdin frames meanwhile.
fn attach<C: Connection>(shared: &Shared, conn: &mut C, id: u32) -> io::Result<Flow> {
    let subscription = match shared.sessions.attach(id) {
        Ok(s) => s,
        Err(e) => return send_error(conn, &e).map(|()| Flow::Continue),
    };
    send(conn, &Reply::Ok)?;
    for (stream, data) in &subscription.replay {
        send(conn, &Reply::Output { stream: *stream, data: data.clone() })?;
    }
    send(conn, &Reply::ReplayEnd)?;
    if let Some(status) = subscription.ended {
        send(conn, &Reply::SessionEnded(status))?;
        return Ok(Flow::Close);
    }
    let reader = conn.try_clone()?;
    let session = Arc::clone(&subscription.session);
    let injector = subscription.injector.clone();
    let timeout = shared.config.frame_timeout;
    std::thread::Builder::new()
        .name("agent-attach".into())
        .spawn(move || read_attached_input(reader, &session, &injector, timeout))?;
    loop {
        match subscription.events.recv() {
            Ok(Event::Output(stream, data)) => send(conn, &Reply::Output { stream, data })?,
            Ok(Event::Notice(e)) => send_error(conn, &e)?,
            Ok(Event::Ended(status)) => {
                send(conn, &Reply::SessionEnded(status))?;
                return Ok(Flow::Close);
            }
            Ok(Event::Detach) | Err(_) => return Ok(Flow::Close),
        }
    }
}

fn read_attached_input<C: Connection>(mut conn: C, session: &Session, injector: &SyncSender<Event>, timeout: Duration) {
    loop {
        let Ok(frame) = frame::read_frame(&mut conn, None, timeout) else {
            // Closed, or framing lost: either way the attachment is over.
            let _ = injector.send(Event::Detach);
            return;
        };
        let notice = match Request::decode(frame.kind, &frame.payload) {
            Ok(Request::Stdin(data)) => session.write_stdin(&data).err(),
            Ok(Request::StdinClose) => {
                session.close_stdin();
                None
            }
            Ok(other) => {
                Some(OpError::bad_request(format!("{} is not allowed during a session attachment", other.name())))
            }
            Err(e) => Some(OpError::bad_request(format!("malformed frame during a session attachment: {e}"))),
        };
        if let Some(e) = notice {
            if injector.send(Event::Notice(e)).is_err() {
                return;
            }
        }
    }
}

/// The home directory for a sandbox: /root when the template has it, else /.
pub fn default_home() -> &'static Path {
    if Path::new("/root").is_dir() {
        Path::new("/root")
    } else {
        Path::new("/")
    }
}

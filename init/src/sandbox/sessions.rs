//! Background sessions: commands that outlive the request that started them, with pipes or on a
//! pseudo-terminal (interactive terminals). Each has a pump thread that reads its output into a
//! bounded backlog and passes it to attached clients; a client that attaches late gets the
//! backlog first, then live output, then the exit status.

use super::child::{self, Spawned};
use super::env::EnvStore;
use super::error::OpError;
use super::{paths, pty, users};
use agent_protocol::{Command, ErrorCode, ExitStatus, OutputStream, PtySpec, SessionInfo, SessionSpec, WindowSize};
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Output kept per session for clients that attach later.
const BACKLOG_BYTES: usize = 1 << 20;
const MAX_RUNNING: usize = 256;
/// Ended sessions stay listed (with their exit status) up to this many, oldest dropped first.
const KEEP_ENDED: usize = 64;
/// Events queued per attached client before the session's pump waits for it.
const QUEUE_DEPTH: usize = 64;
/// How long a stdin write waits for a process that does not read its input.
const STDIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What an attached client receives.
#[derive(Debug)]
pub enum Event {
    Output(OutputStream, Vec<u8>),
    Ended(ExitStatus),
    /// A problem with the client's own input, reported without ending the attachment.
    Notice(OpError),
    /// The client is gone; the attachment ends.
    Detach,
}

#[derive(Default)]
pub struct Sessions {
    table: Mutex<BTreeMap<u32, Arc<Session>>>,
    next_id: AtomicU32,
}

pub struct Session {
    id: u32,
    pid: u32,
    command: String,
    /// Whether it runs on a pseudo-terminal (it then leads its own session of processes).
    on_terminal: bool,
    /// The terminal's master side, for resizing; closed when the session ends.
    terminal: Mutex<Option<File>>,
    stdin: Mutex<Option<File>>,
    state: Mutex<State>,
    next_subscriber: AtomicU64,
}

#[derive(Default)]
struct State {
    backlog: VecDeque<(OutputStream, Vec<u8>)>,
    backlog_bytes: usize,
    subscribers: Vec<(u64, SyncSender<Event>)>,
    exit: Option<ExitStatus>,
}

/// One attached client's view of a session. Dropping it detaches.
pub struct Subscription {
    /// Output produced before the attachment, oldest first.
    pub replay: Vec<(OutputStream, Vec<u8>)>,
    /// Set if the session had already ended: nothing else will arrive.
    pub ended: Option<ExitStatus>,
    pub events: Receiver<Event>,
    /// Lets the client's reader side add notices or end the attachment.
    pub injector: SyncSender<Event>,
    pub session: Arc<Session>,
    subscriber: Option<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking holder cannot leave these structures half-updated in a harmful way.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sessions {
    pub fn start(&self, spec: &SessionSpec, env: &EnvStore, home: &Path) -> Result<(u32, u32), OpError> {
        let run_as = users::run_as(spec.user.as_deref(), home)?;
        let home = run_as.home.as_path();
        let cwd = working_dir(spec.cwd.as_deref(), home)?;
        let vars = env.for_command(home, &spec.env.0)?;
        self.launch(&spec.command, false, || child::spawn(&spec.command, &vars, &cwd, true, run_as.identity.as_ref()))
    }

    /// Starts an interactive session on a pseudo-terminal (a login shell unless the spec names
    /// a command), with `TERM` set for it unless the request sets its own.
    pub fn start_terminal(&self, spec: &PtySpec, env: &EnvStore, home: &Path) -> Result<(u32, u32), OpError> {
        check_size(spec.size)?;
        let command = spec.command.clone().unwrap_or_else(pty::login_shell);
        let run_as = users::run_as(spec.user.as_deref(), home)?;
        let home = run_as.home.as_path();
        let cwd = working_dir(spec.cwd.as_deref(), home)?;
        let mut vars = env.for_command(home, &spec.env.0)?;
        if !spec.env.0.iter().any(|(name, _)| name == "TERM") {
            vars.retain(|(name, _)| name != "TERM");
            vars.push(("TERM".into(), pty::TERM.into()));
        }
        self.launch(&command, true, || {
            child::spawn_terminal(&command, &vars, &cwd, spec.size, run_as.identity.as_ref())
        })
    }

    /// Registers a session whose process `spawn` starts, within the running-session limit.
    fn launch(
        &self,
        command: &Command,
        on_terminal: bool,
        spawn: impl FnOnce() -> Result<Spawned, OpError>,
    ) -> Result<(u32, u32), OpError> {
        let mut table = lock(&self.table);
        let running = table.values().filter(|s| lock(&s.state).exit.is_none()).count();
        if running >= MAX_RUNNING {
            return Err(OpError::new(ErrorCode::Busy, format!("{MAX_RUNNING} sessions are already running")));
        }
        let mut process = spawn()?;
        if let Some(stdin) = &process.stdin {
            if let Err(e) = crate::sys::process::set_nonblocking(stdin.as_raw_fd()) {
                let _ = process.kill_and_reap();
                return Err(OpError::io("session stdin", &e));
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let session = Arc::new(Session {
            id,
            pid: process.pid(),
            command: child::describe(command),
            on_terminal,
            terminal: Mutex::new(process.terminal.take()),
            stdin: Mutex::new(process.stdin.take()),
            state: Mutex::new(State::default()),
            next_subscriber: AtomicU64::new(0),
        });
        let pump_session = Arc::clone(&session);
        let started =
            std::thread::Builder::new().name(format!("session-{id}")).spawn(move || pump(pump_session, process));
        if let Err(e) = started {
            // The process was moved into the failed closure and dropped; stop what it started.
            let _ = crate::sys::process::kill_group(session.pid as libc::pid_t, libc::SIGKILL);
            return Err(OpError::io("session thread", &e));
        }
        table.insert(id, Arc::clone(&session));
        prune_ended(&mut table);
        Ok((id, session.pid))
    }

    /// Sets the terminal size of a session started with `start_terminal`.
    pub fn resize(&self, id: u32, size: WindowSize) -> Result<(), OpError> {
        check_size(size)?;
        let session = self.get(id)?;
        let terminal = lock(&session.terminal);
        match terminal.as_ref() {
            Some(master) => pty::set_size(master, size).map_err(|e| OpError::io(format!("resize session {id}"), &e)),
            None if session.on_terminal => {
                Err(OpError::new(ErrorCode::Conflict, format!("session {id} has already ended")))
            }
            None => Err(OpError::new(ErrorCode::Conflict, format!("session {id} has no terminal"))),
        }
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        lock(&self.table)
            .values()
            .map(|s| SessionInfo { id: s.id, pid: s.pid, command: s.command.clone(), exit: lock(&s.state).exit })
            .collect()
    }

    fn get(&self, id: u32) -> Result<Arc<Session>, OpError> {
        lock(&self.table).get(&id).cloned().ok_or_else(|| OpError::new(ErrorCode::NotFound, format!("no session {id}")))
    }

    /// Sends `signal` to the session's process group.
    pub fn kill(&self, id: u32, signal: i32) -> Result<(), OpError> {
        if !(1..=64).contains(&signal) {
            return Err(OpError::bad_request(format!("invalid signal number {signal}")));
        }
        let session = self.get(id)?;
        // Holding the state lock keeps the pump from recording the exit (and the pid from
        // being recycled) while the signal is sent.
        let state = lock(&session.state);
        if state.exit.is_some() {
            return Err(OpError::new(ErrorCode::Conflict, format!("session {id} has already ended")));
        }
        let pid = session.pid as libc::pid_t;
        // A shell with job control runs each job in a process group of its own: a terminal's
        // signal goes to every process of its session (the shell's group included).
        if session.on_terminal && crate::sys::process::kill_session(pid, signal) > 0 {
            return Ok(());
        }
        crate::sys::process::kill_group(pid, signal).map_err(|e| OpError::io(format!("signal session {id}"), &e))
    }

    pub fn write_stdin(&self, id: u32, data: &[u8]) -> Result<(), OpError> {
        self.get(id)?.write_stdin(data)
    }

    pub fn attach(&self, id: u32) -> Result<Subscription, OpError> {
        let session = self.get(id)?;
        let (tx, rx) = sync_channel(QUEUE_DEPTH);
        let mut state = lock(&session.state);
        let replay: Vec<_> = state.backlog.iter().cloned().collect();
        let ended = state.exit;
        let subscriber = if ended.is_none() {
            let n = session.next_subscriber.fetch_add(1, Ordering::Relaxed);
            state.subscribers.push((n, tx.clone()));
            Some(n)
        } else {
            None
        };
        drop(state);
        Ok(Subscription { replay, ended, events: rx, injector: tx, session, subscriber })
    }
}

fn working_dir(cwd: Option<&str>, home: &Path) -> Result<PathBuf, OpError> {
    match cwd {
        Some(dir) => paths::resolve(dir, home),
        None => Ok(home.to_path_buf()),
    }
}

fn check_size(size: WindowSize) -> Result<(), OpError> {
    if size.is_valid() {
        Ok(())
    } else {
        let max = agent_protocol::MAX_WINDOW_SIDE;
        Err(OpError::bad_request(format!(
            "terminal size {}x{} is outside 1x1 to {max}x{max} (columns x rows)",
            size.cols, size.rows
        )))
    }
}

/// Drops the oldest ended sessions beyond `KEEP_ENDED`.
fn prune_ended(table: &mut BTreeMap<u32, Arc<Session>>) {
    let ended: Vec<u32> = table.values().filter(|s| lock(&s.state).exit.is_some()).map(|s| s.id).collect();
    for id in ended.iter().take(ended.len().saturating_sub(KEEP_ENDED)) {
        table.remove(id);
    }
}

impl Session {
    /// Writes all of `data` to the process's stdin, waiting at most `STDIN_TIMEOUT` for room.
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), OpError> {
        let mut guard = lock(&self.stdin);
        let Some(stdin) = guard.as_mut() else {
            return Err(OpError::new(ErrorCode::Conflict, format!("stdin of session {} is closed", self.id)));
        };
        let deadline = Instant::now() + STDIN_TIMEOUT;
        let mut rest = data;
        while !rest.is_empty() {
            match stdin.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || !wait_writable(stdin.as_raw_fd(), left) {
                        return Err(OpError::new(
                            ErrorCode::Busy,
                            format!("session {} did not read its stdin within {STDIN_TIMEOUT:?}", self.id),
                        ));
                    }
                }
                Err(e) => {
                    // EPIPE: the process closed its input; later writes fail the same way.
                    *guard = None;
                    return Err(OpError::new(ErrorCode::Conflict, format!("stdin of session {}: {e}", self.id)));
                }
            }
        }
        Ok(())
    }

    pub fn close_stdin(&self) {
        *lock(&self.stdin) = None;
    }

    /// Closes the agent's last handles on the session's terminal, if it has one.
    fn close_terminal(&self) {
        *lock(&self.terminal) = None;
    }

    fn publish(&self, stream: OutputStream, data: &[u8]) {
        let subscribers = {
            let mut state = lock(&self.state);
            state.backlog.push_back((stream, data.to_vec()));
            state.backlog_bytes += data.len();
            while state.backlog_bytes > BACKLOG_BYTES {
                match state.backlog.pop_front() {
                    Some((_, old)) => state.backlog_bytes -= old.len(),
                    None => break,
                }
            }
            state.subscribers.clone()
        };
        let mut gone = Vec::new();
        for (n, tx) in subscribers {
            // Blocks while this client's queue is full: a slow client slows the session, and a
            // dead one is dropped once its connection's write timeout fires.
            if tx.send(Event::Output(stream, data.to_vec())).is_err() {
                gone.push(n);
            }
        }
        if !gone.is_empty() {
            lock(&self.state).subscribers.retain(|(n, _)| !gone.contains(n));
        }
    }

    fn finish(&self, status: ExitStatus) {
        let subscribers = {
            let mut state = lock(&self.state);
            state.exit = Some(status);
            std::mem::take(&mut state.subscribers)
        };
        self.close_stdin();
        self.close_terminal();
        for (_, tx) in subscribers {
            let _ = tx.send(Event::Ended(status));
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(n) = self.subscriber {
            lock(&self.session.state).subscribers.retain(|(m, _)| *m != n);
        }
    }
}

fn wait_writable(fd: std::os::fd::RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: one live pollfd, matching the count of 1.
    let ready = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    ready > 0
}

/// The session's pump: output to the backlog and subscribers until the process ends.
fn pump(session: Arc<Session>, mut process: Spawned) {
    let mut sink = |stream: OutputStream, data: &[u8]| {
        session.publish(stream, data);
        Ok(())
    };
    let status = match process.follow(None, &mut sink) {
        Ok(_) => process.reap(),
        Err(_) => process.kill_and_reap(),
    };
    let _ = process.drain(&mut sink);
    // A failed wait leaves no status to report; -1 marks it as unknown.
    session.finish(status.unwrap_or(ExitStatus::Code(-1)));
}

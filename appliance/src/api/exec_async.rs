//! Commands run without holding a request open: `POST /exec/run-async` starts one and answers
//! its result at once if it ends within `INLINE_WAIT` (as the OpenComputer API does), else
//! `202 {execId, running, startedAt}`; `GET /exec/{execId}/result` answers `{running, exitCode,
//! stdout, stderr}` (or `error`), holding the request up to `POLL_WAIT` while the command runs
//! so clients that poll see the end promptly. Results are kept `KEEP_RESULTS` after the end.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::AppError;
use crate::lifecycle::runtime_error;
use crate::runtime::{ExecOutput, ExecRequest, SandboxRuntime};

/// How long `run-async` waits before answering with an id instead of the result.
pub const INLINE_WAIT: Duration = Duration::from_millis(400);
/// How long a result poll waits for a running command to end.
pub const POLL_WAIT: Duration = Duration::from_millis(500);
/// How long a finished command's result stays readable.
pub const KEEP_RESULTS: Duration = Duration::from_secs(600);
/// Commands running at once through this route, on the whole appliance (each holds a thread).
pub const MAX_RUNNING: usize = 64;

enum State {
    Running,
    Done(ExecOutput),
    Failed(String),
}

struct Entry {
    sandbox_id: String,
    started_at: i64,
    state: State,
    ended: Option<Instant>,
}

#[derive(Default)]
pub struct AsyncExecs {
    entries: Mutex<HashMap<String, Entry>>,
    changed: Condvar,
}

impl AsyncExecs {
    /// Starts `request` on a thread of its own; answers like `run-async`.
    pub fn start(
        self: &Arc<Self>,
        runtime: Arc<dyn SandboxRuntime>,
        sandbox_id: &str,
        request: ExecRequest,
    ) -> Result<(u16, Value), AppError> {
        let exec_id = crate::lifecycle::new_id()?;
        let started_at = crate::clock::now_unix();
        {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            entries.retain(|_, e| e.ended.is_none_or(|t| t.elapsed() < KEEP_RESULTS));
            if entries.values().filter(|e| matches!(e.state, State::Running)).count() >= MAX_RUNNING {
                return Err(AppError::new(
                    429,
                    format!("{MAX_RUNNING} commands are already running through exec/run-async; wait for one to end"),
                ));
            }
            let entry = Entry { sandbox_id: sandbox_id.to_string(), started_at, state: State::Running, ended: None };
            entries.insert(exec_id.clone(), entry);
        }
        let execs = Arc::clone(self);
        let (id, sid) = (exec_id.clone(), sandbox_id.to_string());
        let spawned = std::thread::Builder::new().name("exec-async".into()).spawn(move || {
            let state = match runtime.exec_run(&sid, &request) {
                Ok(out) => State::Done(out),
                Err(e) => State::Failed(runtime_error(e).message),
            };
            execs.finish(&id, state);
        });
        if let Err(e) = spawned {
            self.finish(&exec_id, State::Failed(format!("cannot start the command: {e}")));
        }
        match self.wait(sandbox_id, &exec_id, INLINE_WAIT)? {
            (false, body) => Ok((200, body)),
            (true, _) => {
                Ok((202, json!({"execId": exec_id, "running": true, "startedAt": crate::clock::rfc3339(started_at)})))
            }
        }
    }

    /// `GET /exec/{execId}/result`.
    pub fn result(&self, sandbox_id: &str, exec_id: &str) -> Result<Value, AppError> {
        self.wait(sandbox_id, exec_id, POLL_WAIT).map(|(_, body)| body)
    }

    fn finish(&self, exec_id: &str, state: State) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = entries.get_mut(exec_id) {
            entry.state = state;
            entry.ended = Some(Instant::now());
        }
        self.changed.notify_all();
    }

    /// Waits up to `wait` for the command to end; (still running, the result body).
    fn wait(&self, sandbox_id: &str, exec_id: &str, wait: Duration) -> Result<(bool, Value), AppError> {
        let deadline = Instant::now() + wait;
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let entry = entries
                .get(exec_id)
                .filter(|e| e.sandbox_id == sandbox_id)
                .ok_or_else(|| AppError::not_found(format!("no command {exec_id} in sandbox {sandbox_id}")))?;
            let body = match &entry.state {
                State::Running => None,
                State::Done(out) => Some(json!({
                    "execId": exec_id,
                    "running": false,
                    "exitCode": out.exit_code,
                    "stdout": String::from_utf8_lossy(&out.stdout),
                    "stderr": String::from_utf8_lossy(&out.stderr),
                    "startedAt": crate::clock::rfc3339(entry.started_at),
                })),
                State::Failed(why) => Some(json!({
                    "execId": exec_id,
                    "running": false,
                    "exitCode": -1,
                    "stdout": "",
                    "stderr": "",
                    "error": why,
                    "startedAt": crate::clock::rfc3339(entry.started_at),
                })),
            };
            if let Some(body) = body {
                return Ok((false, body));
            }
            let now = Instant::now();
            if now >= deadline {
                let started = crate::clock::rfc3339(entry.started_at);
                return Ok((true, json!({"execId": exec_id, "running": true, "startedAt": started})));
            }
            entries = self.changed.wait_timeout(entries, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

//! The sandbox side of `bench api`'s busy phase: an in-process double whose commands only
//! sleep. The phase measures the HTTP layer while hundreds of commands are in flight, so what
//! a command does must not depend on a VM (the same kind of double the API tests use).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::runtime::{
    BootSpec, Booted, DirEntry, EnvVars, ExecAttachment, ExecOutput, ExecRequest, ExecSessionInfo, PtyRequest,
    RuntimeError, SandboxRuntime,
};
use crate::seal::{SandboxSeal, SealPublisher};

#[derive(Default)]
pub struct SleepingRuntime {
    next_cid: AtomicU32,
    alive: Mutex<HashSet<String>>,
}

fn unsupported(what: &str) -> RuntimeError {
    RuntimeError::Invalid(format!("{what} is not part of the benchmark"))
}

impl SleepingRuntime {
    fn check(&self, id: &str) -> Result<(), RuntimeError> {
        let alive = self.alive.lock().map_err(|_| RuntimeError::Failed("lock poisoned".into()))?;
        if alive.contains(id) {
            Ok(())
        } else {
            Err(RuntimeError::NotFound(format!("sandbox {id} is not running")))
        }
    }
}

impl SandboxRuntime for SleepingRuntime {
    fn boot(&self, spec: &BootSpec) -> Result<Booted, RuntimeError> {
        let mut alive = self.alive.lock().map_err(|_| RuntimeError::Failed("lock poisoned".into()))?;
        alive.insert(spec.sandbox_id.clone());
        Ok(Booted { cid: 3 + self.next_cid.fetch_add(1, Ordering::SeqCst), disk_mb: spec.disk_mb.unwrap_or(2048) })
    }
    fn set_env(&self, id: &str, _envs: &EnvVars) -> Result<(), RuntimeError> {
        self.check(id)
    }
    fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        if let Ok(mut alive) = self.alive.lock() {
            alive.remove(id);
        }
        Ok(())
    }
    fn is_alive(&self, id: &str) -> bool {
        self.check(id).is_ok()
    }
    fn running_ids(&self) -> Vec<String> {
        self.alive.lock().map(|a| a.iter().cloned().collect()).unwrap_or_default()
    }
    /// `sleep N` (N in milliseconds here) waits; anything else answers at once.
    fn exec_run(&self, id: &str, request: &ExecRequest) -> Result<ExecOutput, RuntimeError> {
        self.check(id)?;
        let millis = request.command_line.strip_prefix("sleep ").and_then(|n| n.trim().parse::<u64>().ok());
        std::thread::sleep(Duration::from_millis(millis.unwrap_or(0)));
        Ok(ExecOutput { exit_code: 0, stdout: Vec::new(), stderr: Vec::new() })
    }
    fn exec_start(&self, _id: &str, _request: &ExecRequest) -> Result<String, RuntimeError> {
        Err(unsupported("exec sessions"))
    }
    fn exec_list(&self, _id: &str) -> Result<Vec<ExecSessionInfo>, RuntimeError> {
        Ok(Vec::new())
    }
    fn exec_kill(&self, _id: &str, _session_id: &str, _signal: i32) -> Result<(), RuntimeError> {
        Err(unsupported("exec sessions"))
    }
    fn exec_attach(&self, _id: &str, _session_id: &str) -> Result<ExecAttachment, RuntimeError> {
        Err(unsupported("exec sessions"))
    }
    fn pty_start(&self, _id: &str, _request: &PtyRequest) -> Result<String, RuntimeError> {
        Err(unsupported("terminals"))
    }
    fn pty_resize(&self, _id: &str, _session_id: &str, _cols: u16, _rows: u16) -> Result<(), RuntimeError> {
        Err(unsupported("terminals"))
    }
    fn read_file(&self, _id: &str, _path: &str) -> Result<Vec<u8>, RuntimeError> {
        Err(unsupported("files"))
    }
    fn write_file(&self, _id: &str, _path: &str, _data: &[u8]) -> Result<(), RuntimeError> {
        Err(unsupported("files"))
    }
    fn remove_file(&self, _id: &str, _path: &str) -> Result<(), RuntimeError> {
        Err(unsupported("files"))
    }
    fn list_dir(&self, _id: &str, _path: &str) -> Result<Vec<DirEntry>, RuntimeError> {
        Err(unsupported("files"))
    }
    fn make_dir(&self, _id: &str, _path: &str) -> Result<(), RuntimeError> {
        Err(unsupported("files"))
    }
}

/// The benchmark's sandboxes have no sealed secrets to publish.
pub struct NoSeals;

impl SealPublisher for NoSeals {
    fn publish(&self, _seal: SandboxSeal) -> Result<(), String> {
        Ok(())
    }
    fn withdraw(&self, _sandbox_id: &str) {}
}

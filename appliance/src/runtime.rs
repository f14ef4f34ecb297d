//! What the control plane needs from the sandbox side: boot a microVM, stop it, and
//! talk to its agent (exec, sessions, files, environment). The real implementation
//! (VMM processes + the vsock agent) is wired in by the embedding binary; when none
//! is wired, sandbox operations answer 503 instead of pretending.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::mpsc::Receiver;

use zeroize::Zeroizing;

pub use crate::store::records::CheckpointKind;

/// The largest file the API moves either way (4 GiB). Transfers are streamed through bounded
/// buffers, so this is not about memory: it bounds how long one transfer may hold an agent
/// connection, and it keeps the body length tiny_http may try to drain from a client bounded
/// (see `http::front`, which refuses longer bodies before they reach tiny_http).
pub const MAX_FILE_SIZE: u64 = 4 << 30;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSpec {
    pub sandbox_id: String,
    pub template: String,
    pub cpu_count: u32,
    pub memory_mb: u32,
    /// Size of the root disk; None keeps the template's.
    pub disk_mb: Option<u32>,
}

/// A booted sandbox: its vsock CID identifies it to the proxy and the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Booted {
    pub cid: u32,
    /// Size of the root disk it got.
    pub disk_mb: u32,
}

/// A hibernated sandbox's snapshot, as the VMM reported writing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// The machine state (vCPUs, devices, clocks).
    pub state_bytes: u64,
    /// Guest memory actually stored (never-written pages are holes and not counted).
    pub memory_bytes: u64,
    /// How long the guest stood still while it was written.
    pub paused_ms: u64,
}

/// One environment variable handed to the agent. Values are wiped on drop (they are
/// sealed tokens or caller-supplied values, never secret plaintexts).
pub type EnvVars = Vec<(String, Zeroizing<String>)>;

/// A command for the agent to run with `sh -c`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub command_line: String,
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Seconds; the agent kills the command when it runs longer.
    pub timeout_sec: u64,
    /// Who runs it in the guest (its template's `User`); None: root.
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSessionInfo {
    pub session_id: String,
    pub command_line: String,
    pub running: bool,
    pub exit_code: Option<i32>,
}

/// An interactive terminal: a shell on a pseudo-terminal in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtyRequest {
    pub cols: u16,
    pub rows: u16,
    /// The program to run instead of the guest's login shell.
    pub shell: Option<String>,
    /// Its working directory and user (its template's `WorkingDir` and `User`); None: the
    /// agent's home directory, root.
    pub cwd: Option<String>,
    pub user: Option<String>,
}

/// Output of an attached exec session, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The output from before the attachment has all been replayed; what follows is live.
    ReplayEnd,
    Exit(i32),
}

/// A live attachment to an exec session: output events and the session's stdin.
pub struct ExecAttachment {
    pub events: Receiver<ExecEvent>,
    pub stdin: Box<dyn Write + Send>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub path: String,
    pub is_dir: bool,
    pub size: u64,
}

/// One file's metadata, as `stat` in the sandbox saw it (symlinks followed, `is_symlink` set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub name: String,
    pub path: String,
    pub is_dir: bool,
    pub is_symlink: bool,
    pub size: u64,
    /// Permission bits (st_mode & 0o7777).
    pub mode: u32,
    /// Modification time, milliseconds since the Unix epoch.
    pub modified_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeError {
    /// The sandbox (or session, or file) does not exist on the sandbox side.
    NotFound(String),
    /// The request is invalid for the sandbox side (bad path, bad signal...).
    Invalid(String),
    /// The target is in a state that forbids the request (e.g. the session has ended).
    Conflict(String),
    /// Booting or talking to the sandbox failed.
    Failed(String),
    /// The sandbox's guest misbehaved or failed: its agent broke the protocol, overran a
    /// deadline or a cap, or stopped answering. Code in a sandbox is root and may replace the
    /// agent, so this is the guest's doing, not the appliance's.
    Guest(String),
    /// The sandbox's disk (or the user's quota in it) is full.
    NoSpace(String),
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound(m)
            | Self::Invalid(m)
            | Self::Conflict(m)
            | Self::Failed(m)
            | Self::Guest(m)
            | Self::NoSpace(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for RuntimeError {}

/// A template's disk: its name, whether the image shipped it, its length and what it takes on
/// the data disk (it is sparse, and its clones share its blocks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateDisk {
    pub name: String,
    pub built_in: bool,
    pub length: u64,
    pub allocated: u64,
}

/// The sandbox side. Implementations must be safe to call from many request threads.
pub trait SandboxRuntime: Send + Sync {
    fn boot(&self, spec: &BootSpec) -> Result<Booted, RuntimeError>;
    /// Restarts a running sandbox's guest from its own root disk with a fresh VMM and the same
    /// vsock CID: its files stay, its processes and memory do not, nor its environment (the
    /// caller hands that over again with `set_env`).
    fn restart(&self, spec: &BootSpec) -> Result<Booted, RuntimeError>;
    /// Writes a running sandbox's guest state and memory to a snapshot on the data disk and ends
    /// its VMM; its root disk and vsock CID stay, so it holds no memory and no process until
    /// `wake`. A snapshot is kept only once complete and durable; if it cannot be written the
    /// sandbox runs on and the error says why.
    fn hibernate(&self, sandbox_id: &str) -> Result<Snapshot, RuntimeError> {
        Err(RuntimeError::Failed(format!("hibernation is not supported by this runtime (sandbox {sandbox_id})")))
    }
    /// Resumes a hibernated sandbox from its snapshot on the same root disk and CID: its
    /// processes, open files and sessions carry on; the guest is given the current time and
    /// fresh entropy. The snapshot is dropped once the resumed VMM ends, or at the next
    /// hibernation. A wake that fails leaves no VMM running.
    fn wake(&self, spec: &BootSpec) -> Result<Booted, RuntimeError> {
        Err(RuntimeError::Failed(format!("hibernation is not supported by this runtime (sandbox {})", spec.sandbox_id)))
    }
    /// Every sandbox with a complete hibernation snapshot and no VMM, including those found
    /// after a restart (`stop` drops one).
    fn hibernated_ids(&self) -> Vec<String> {
        Vec::new()
    }
    /// Writes a checkpoint of a running sandbox under `checkpoint_id`: its root disk copied while
    /// the guest stood still, and for `full` its machine state and memory too; the guest runs on.
    /// Kept only once complete and durable; returns the bytes it takes on the data disk.
    fn checkpoint(&self, sandbox_id: &str, checkpoint_id: &str, kind: CheckpointKind) -> Result<u64, RuntimeError> {
        let _ = (checkpoint_id, kind);
        Err(RuntimeError::Failed(format!("checkpoints are not supported by this runtime (sandbox {sandbox_id})")))
    }
    /// Puts a running sandbox back to a checkpoint, keeping its vsock CID: its root disk is
    /// replaced by the checkpoint's, and its guest resumes the checkpoint (`full`, given the time
    /// and fresh entropy) or boots from that disk (`disk_only`, then it needs `set_env` again).
    /// A restore that fails leaves no VMM running.
    fn restore_checkpoint(
        &self,
        spec: &BootSpec,
        checkpoint_id: &str,
        kind: CheckpointKind,
    ) -> Result<Booted, RuntimeError> {
        let _ = (checkpoint_id, kind);
        Err(RuntimeError::Failed(format!(
            "checkpoints are not supported by this runtime (sandbox {})",
            spec.sandbox_id
        )))
    }
    /// Starts the new sandbox `spec.sandbox_id` from a checkpoint: a new vsock CID and a
    /// copy-on-write clone of the checkpoint's disk; the guest resumes (`full`) or boots from it
    /// (`disk_only`). Like `boot`, it then needs its environment (`set_env`).
    fn fork(&self, spec: &BootSpec, checkpoint_id: &str, kind: CheckpointKind) -> Result<Booted, RuntimeError> {
        let _ = (checkpoint_id, kind);
        Err(RuntimeError::Failed(format!(
            "checkpoints are not supported by this runtime (sandbox {})",
            spec.sandbox_id
        )))
    }
    /// Removes a checkpoint's files; a missing one is not an error.
    fn delete_checkpoint(&self, checkpoint_id: &str) -> Result<(), RuntimeError> {
        let _ = checkpoint_id;
        Ok(())
    }
    /// Every complete checkpoint on the data disk (the control plane drops those without a record).
    fn checkpoint_ids(&self) -> Vec<String> {
        Vec::new()
    }
    /// Every template a create may name: shipped in the image (`built_in`) or made on the appliance.
    fn templates(&self) -> Vec<TemplateDisk> {
        Vec::new()
    }
    /// Makes the ext4 file `disk` (on the data disk; moved, not copied) template `name`, whose
    /// content is identified by `content_id`; from then on creates may name it. Replaces nothing:
    /// a name in use is a conflict.
    fn install_template(&self, name: &str, disk: &Path, content_id: &str) -> Result<(), RuntimeError> {
        let _ = (disk, content_id);
        Err(RuntimeError::Failed(format!("templates cannot be added to this runtime ({name})")))
    }
    /// Removes template `name`'s disk and its snapshots; sandboxes made from it keep their own
    /// disks (copy-on-write clones).
    fn remove_template(&self, name: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::Failed(format!("templates cannot be removed from this runtime ({name})")))
    }
    /// Writes a consistent copy of a sandbox's root disk to `to` (a new file on the data disk; a
    /// reflink, not a byte copy): a running guest stands still for the copy.
    fn copy_root_disk(&self, sandbox_id: &str, to: &Path) -> Result<(), RuntimeError> {
        let _ = to;
        Err(RuntimeError::Failed(format!("root disks cannot be copied in this runtime (sandbox {sandbox_id})")))
    }
    /// Hands the agent its environment (sealed tokens, proxy settings, request envs).
    fn set_env(&self, sandbox_id: &str, envs: &EnvVars) -> Result<(), RuntimeError>;
    /// Kills the VMM and releases the sandbox's disk and snapshot; stopping a dead sandbox is not
    /// an error.
    fn stop(&self, sandbox_id: &str) -> Result<(), RuntimeError>;
    /// Whether the sandbox's VMM is still running (used after restarts and by the reaper).
    fn is_alive(&self, sandbox_id: &str) -> bool;
    /// Every sandbox whose VMM runs, including those found after a restart.
    fn running_ids(&self) -> Vec<String>;

    fn exec_run(&self, sandbox_id: &str, request: &ExecRequest) -> Result<ExecOutput, RuntimeError>;
    fn exec_start(&self, sandbox_id: &str, request: &ExecRequest) -> Result<String, RuntimeError>;
    fn exec_list(&self, sandbox_id: &str) -> Result<Vec<ExecSessionInfo>, RuntimeError>;
    fn exec_kill(&self, sandbox_id: &str, session_id: &str, signal: i32) -> Result<(), RuntimeError>;
    fn exec_attach(&self, sandbox_id: &str, session_id: &str) -> Result<ExecAttachment, RuntimeError>;

    /// Starts an interactive terminal; returns its session id. It is attached to and killed
    /// like an exec session (`exec_attach`, `exec_kill`); everything it prints is stdout.
    fn pty_start(&self, sandbox_id: &str, request: &PtyRequest) -> Result<String, RuntimeError>;
    /// Sets a terminal's size (its programs get SIGWINCH).
    fn pty_resize(&self, sandbox_id: &str, session_id: &str, cols: u16, rows: u16) -> Result<(), RuntimeError>;

    /// Streams the file at `path` into `sink`, in pieces as they come; returns its size. Files
    /// larger than `MAX_FILE_SIZE` fail. An error after the first piece leaves `sink` with
    /// part of the file: the caller must not present that as the whole file.
    fn read_file_to(&self, sandbox_id: &str, path: &str, sink: &mut dyn Write) -> Result<u64, RuntimeError>;
    /// Replaces the file at `path` (parents created) with everything `source` yields, taken in
    /// pieces; returns the bytes written. If `source` fails, the file is left as it was.
    fn write_file_from(&self, sandbox_id: &str, path: &str, source: &mut dyn Read) -> Result<u64, RuntimeError>;
    fn remove_file(&self, sandbox_id: &str, path: &str) -> Result<(), RuntimeError>;
    fn list_dir(&self, sandbox_id: &str, path: &str) -> Result<Vec<DirEntry>, RuntimeError>;
    fn make_dir(&self, sandbox_id: &str, path: &str) -> Result<(), RuntimeError>;

    fn stat_file(&self, sandbox_id: &str, path: &str) -> Result<FileInfo, RuntimeError> {
        let _ = (sandbox_id, path);
        Err(RuntimeError::Failed("file stat is not supported by this runtime".into()))
    }
    /// Moves a file or directory within the sandbox.
    fn rename_file(&self, sandbox_id: &str, from: &str, to: &str) -> Result<(), RuntimeError> {
        let _ = (sandbox_id, from, to);
        Err(RuntimeError::Failed("file rename is not supported by this runtime".into()))
    }

    /// The last `max_bytes` (at most) of what the sandbox's guest wrote to its console, while
    /// it runs and, kept when it ended, until `forget`. Only guest output: nothing the host adds.
    fn console_tail(&self, sandbox_id: &str, max_bytes: u64) -> Result<Vec<u8>, RuntimeError> {
        let _ = max_bytes;
        Err(RuntimeError::NotFound(format!("no console log is kept for sandbox {sandbox_id}")))
    }

    /// Drops what is kept of an ended sandbox (its console log); its record is gone.
    fn forget(&self, _sandbox_id: &str) {}

    /// Has the VMM write all guest RAM to a file on the data disk (diagnostics and the
    /// secret-search tests); returns where and how large.
    fn memory_dump(&self, sandbox_id: &str) -> Result<(String, u64), RuntimeError> {
        Err(RuntimeError::Invalid(format!("memory dumps are not supported by this runtime (sandbox {sandbox_id})")))
    }

    /// For a sandbox whose VMM ended on its own: whether that was a clean end (the guest
    /// powered off or rebooted) and how it ended, in words.
    fn exit_description(&self, _sandbox_id: &str) -> Option<(bool, String)> {
        None
    }

    /// Gauges of what the runtime holds (processes, CIDs, disks), as (metric name, help,
    /// value), exported on /metrics so leaks are visible.
    fn resource_gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        Vec::new()
    }
}

//! Shared test helpers: an in-process server over a real LMDB store in a temp dir,
//! with test doubles of the sandbox runtime and the seal publisher.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appliance::capacity::CapacityConfig;
use appliance::client::{HttpClient, HttpResponse};
use appliance::http::front::ConnectionLimits;
use appliance::lifecycle::Backend;
use appliance::runtime::*;
use appliance::seal::{SandboxSeal, SealPublisher};
use appliance::serve::{self, Running, SandboxSide, ServeConfig};

pub mod swtpm;
use serde_json::Value;

pub const ADMIN_KEY: &str = "integration-test-admin-key-0123456789";

pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "appliance-it-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

// ---------------------------------------------------------------- runtime double

#[derive(Default)]
pub struct FakeSandbox {
    pub cid: u32,
    pub alive: bool,
    pub template: String,
    pub cpu: u32,
    pub memory: u32,
    pub env: Vec<(String, String)>,
    pub files: BTreeMap<String, Vec<u8>>,
    pub dirs: Vec<String>,
    pub sessions: Vec<ExecSessionInfo>,
    pub killed: Vec<(String, i32)>,
    /// What the guest wrote to its console; kept after the sandbox stops, as the real runtime does.
    pub console: Vec<u8>,
    /// Terminals by session id: their size (cols, rows) and the shell asked for.
    pub terminals: BTreeMap<String, ((u16, u16), Option<String>)>,
    /// Its guest is in a snapshot: no VMM (`alive` is false), everything above kept for a wake.
    pub hibernated: bool,
    /// How many times it was woken and told the time and given entropy (`Resumed`).
    pub resumed: u32,
}

/// Disk size of every template of the runtime double.
pub const TEMPLATE_DISK_MB: u32 = 2048;

#[derive(Default)]
pub struct FakeRuntime {
    pub sandboxes: Mutex<HashMap<String, FakeSandbox>>,
    pub next_cid: AtomicU32,
    pub stops: Mutex<Vec<String>>,
    /// Sandboxes restarted, in order.
    pub restarts: Mutex<Vec<String>>,
    /// Makes the next boots fail (templates named here are "missing").
    pub fail_boot_template: Mutex<Option<String>>,
    pub fail_set_env: Mutex<bool>,
    /// How long each boot takes (to let a test change secrets while a create is under way).
    pub boot_delay: Mutex<Duration>,
    /// How long every `exec_run` takes (a command that sleeps).
    pub exec_delay: Mutex<Duration>,
    /// Sandboxes whose kept state (console log) the control plane dropped.
    pub forgotten: Mutex<Vec<String>>,
    /// Bytes of generated files (`/gen/<n>`) handed to read sinks, and of uploads taken from
    /// write sources, so far.
    pub read_handed_out: AtomicU64,
    pub write_taken_in: AtomicU64,
    /// The largest single read an upload's source returned.
    pub largest_source_read: AtomicUsize,
    /// Uploads to `/sink/...`: their size and whether every byte was `pattern_byte`.
    pub sunk: Mutex<HashMap<String, (u64, bool)>>,
    /// Generated reads fail (as a vanished agent) before handing over byte `n`.
    pub cut_reads_at: Mutex<Option<u64>>,
    /// Writes of more than this many bytes fail as a full disk.
    pub disk_left: Mutex<Option<u64>>,
    /// Sandboxes hibernated and woken, in order.
    pub hibernations: Mutex<Vec<String>>,
    pub wakes: Mutex<Vec<String>>,
    /// Makes hibernations fail with this error (the VMM reported `SnapshotFailed`); the guest
    /// runs on.
    pub fail_hibernate: Mutex<Option<String>>,
    /// Makes wakes fail (the resumed guest's agent never answers); no VMM is left.
    pub fail_wake: Mutex<bool>,
    /// How long each hibernation takes.
    pub hibernate_delay: Mutex<Duration>,
    /// Checkpoints by id: what of the guest each kept.
    pub checkpoints: Mutex<HashMap<String, FakeCheckpoint>>,
    /// Makes checkpoints fail (the VMM reported `SnapshotFailed`); the guest runs on.
    pub fail_checkpoint: Mutex<Option<String>>,
    /// Templates made through the API: name -> where the double keeps the disk it was handed.
    pub made_templates: Mutex<BTreeMap<String, PathBuf>>,
}

/// The templates the double ships, as the image does.
pub const SHIPPED_TEMPLATES: [&str; 3] = ["base", "node", "python"];

/// Where the double keeps made templates' disks (its own directory per process).
fn fake_template_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("appliance-fake-templates-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

/// What a checkpoint of the double keeps: the disk (files) always, the guest (environment,
/// sessions) when `full`.
#[derive(Clone)]
pub struct FakeCheckpoint {
    pub kind: CheckpointKind,
    pub files: BTreeMap<String, Vec<u8>>,
    pub env: Vec<(String, String)>,
    pub sessions: Vec<ExecSessionInfo>,
    pub memory: u32,
}

/// The piece size of the double's file transfers (the agent's is 256 KiB).
pub const FAKE_PIECE: usize = 256 << 10;

/// Byte `i` of a generated file: a pattern that a shifted or dropped piece breaks.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8 ^ ((i >> 16) as u8)
}

impl FakeRuntime {
    pub fn with_sandbox<R>(&self, id: &str, f: impl FnOnce(&mut FakeSandbox) -> R) -> Result<R, RuntimeError> {
        let mut map = self.sandboxes.lock().expect("lock");
        match map.get_mut(id) {
            Some(s) if s.alive => Ok(f(s)),
            _ => Err(RuntimeError::NotFound(format!("sandbox {id} is not running"))),
        }
    }

    pub fn env_of(&self, id: &str) -> Vec<(String, String)> {
        self.sandboxes.lock().expect("lock").get(id).map(|s| s.env.clone()).unwrap_or_default()
    }

    pub fn kill_vmm(&self, id: &str) {
        if let Some(s) = self.sandboxes.lock().expect("lock").get_mut(id) {
            s.alive = false;
        }
    }
}

/// Expands `$NAME` from `env` in an `echo` line, the only command this double runs.
fn fake_shell(line: &str, env: &[(String, String)], extra: &BTreeMap<String, String>) -> ExecOutput {
    let Some(rest) = line.strip_prefix("echo ") else {
        return ExecOutput { exit_code: 127, stdout: vec![], stderr: format!("sh: {line}: not found\n").into_bytes() };
    };
    let mut out = String::new();
    for word in rest.split(' ') {
        if !out.is_empty() {
            out.push(' ');
        }
        match word.strip_prefix('$') {
            Some(name) => {
                let v = extra
                    .get(name)
                    .cloned()
                    .or_else(|| env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
                    .unwrap_or_default();
                out.push_str(&v);
            }
            None => out.push_str(word.trim_matches('\'')),
        }
    }
    out.push('\n');
    ExecOutput { exit_code: 0, stdout: out.into_bytes(), stderr: vec![] }
}

struct ChannelStdin(Sender<Vec<u8>>);

impl Write for ChannelStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf.to_vec()).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "session ended"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SandboxRuntime for FakeRuntime {
    fn boot(&self, spec: &BootSpec) -> Result<Booted, RuntimeError> {
        let delay = *self.boot_delay.lock().expect("lock");
        std::thread::sleep(delay);
        if self.fail_boot_template.lock().expect("lock").as_deref() == Some(spec.template.as_str()) {
            return Err(RuntimeError::NotFound(format!("template {:?} not found", spec.template)));
        }
        // Every template of this double has a 2048 MiB disk, as the image's do.
        let disk_mb = spec.disk_mb.unwrap_or(TEMPLATE_DISK_MB);
        if disk_mb < TEMPLATE_DISK_MB {
            return Err(RuntimeError::Invalid(format!("diskMB {disk_mb} is smaller than the template's disk")));
        }
        let cid = 100 + self.next_cid.fetch_add(1, Ordering::SeqCst);
        self.sandboxes.lock().expect("lock").insert(
            spec.sandbox_id.clone(),
            FakeSandbox {
                cid,
                alive: true,
                template: spec.template.clone(),
                cpu: spec.cpu_count,
                memory: spec.memory_mb,
                ..Default::default()
            },
        );
        Ok(Booted { cid, disk_mb })
    }
    /// Keeps the files and the CID; the guest's environment, sessions and terminals are gone.
    fn restart(&self, spec: &BootSpec) -> Result<Booted, RuntimeError> {
        self.restarts.lock().expect("lock").push(spec.sandbox_id.clone());
        self.with_sandbox(&spec.sandbox_id, |s| {
            s.env.clear();
            s.sessions.clear();
            s.terminals.clear();
            Booted { cid: s.cid, disk_mb: spec.disk_mb.unwrap_or(TEMPLATE_DISK_MB) }
        })
    }
    /// Everything of the guest is kept (files, env, sessions, terminals); commands are refused
    /// until it is woken, as there is no VMM to run them.
    fn hibernate(&self, id: &str) -> Result<Snapshot, RuntimeError> {
        let delay = *self.hibernate_delay.lock().expect("lock");
        std::thread::sleep(delay);
        if let Some(error) = self.fail_hibernate.lock().expect("lock").clone() {
            return Err(RuntimeError::Failed(format!("sandbox {id}: the snapshot could not be written: {error}")));
        }
        let memory = self.with_sandbox(id, |s| {
            s.alive = false;
            s.hibernated = true;
            s.memory
        })?;
        self.hibernations.lock().expect("lock").push(id.to_string());
        Ok(Snapshot { state_bytes: 40 << 10, memory_bytes: u64::from(memory) << 18, paused_ms: 12 })
    }
    fn wake(&self, spec: &BootSpec) -> Result<Booted, RuntimeError> {
        let id = &spec.sandbox_id;
        let fail = *self.fail_wake.lock().expect("lock");
        let mut map = self.sandboxes.lock().expect("lock");
        let s = match map.get_mut(id) {
            Some(s) if s.hibernated => s,
            _ => return Err(RuntimeError::NotFound(format!("sandbox {id} has no hibernation snapshot"))),
        };
        if fail {
            s.hibernated = false;
            return Err(RuntimeError::Failed(format!("the agent did not answer within 60s (sandbox {id}, test)")));
        }
        s.hibernated = false;
        s.alive = true;
        s.resumed += 1;
        self.wakes.lock().expect("lock").push(id.clone());
        Ok(Booted { cid: s.cid, disk_mb: spec.disk_mb.unwrap_or(TEMPLATE_DISK_MB) })
    }
    fn checkpoint(&self, id: &str, checkpoint_id: &str, kind: CheckpointKind) -> Result<u64, RuntimeError> {
        if let Some(error) = self.fail_checkpoint.lock().expect("lock").clone() {
            return Err(RuntimeError::Failed(format!("sandbox {id}: the snapshot could not be written: {error}")));
        }
        let kept = self.with_sandbox(id, |s| FakeCheckpoint {
            kind,
            files: s.files.clone(),
            env: if kind == CheckpointKind::Full { s.env.clone() } else { Vec::new() },
            sessions: if kind == CheckpointKind::Full { s.sessions.clone() } else { Vec::new() },
            memory: s.memory,
        })?;
        let size = kept.files.values().map(|f| f.len() as u64).sum::<u64>() + 4096;
        self.checkpoints.lock().expect("lock").insert(checkpoint_id.to_string(), kept);
        Ok(size)
    }
    fn restore_checkpoint(
        &self,
        spec: &BootSpec,
        checkpoint_id: &str,
        kind: CheckpointKind,
    ) -> Result<Booted, RuntimeError> {
        let kept = self.checkpoints.lock().expect("lock").get(checkpoint_id).cloned();
        let kept = kept.ok_or_else(|| RuntimeError::NotFound(format!("checkpoint {checkpoint_id} has no files")))?;
        assert_eq!(kept.kind, kind, "restored as the kind it was taken as");
        self.with_sandbox(&spec.sandbox_id, |s| {
            s.files = kept.files;
            s.env = kept.env;
            s.sessions = kept.sessions;
            s.terminals.clear();
            if kind == CheckpointKind::Full {
                s.resumed += 1;
            }
            Booted { cid: s.cid, disk_mb: spec.disk_mb.unwrap_or(TEMPLATE_DISK_MB) }
        })
    }
    fn fork(&self, spec: &BootSpec, checkpoint_id: &str, kind: CheckpointKind) -> Result<Booted, RuntimeError> {
        let kept = self.checkpoints.lock().expect("lock").get(checkpoint_id).cloned();
        let kept = kept.ok_or_else(|| RuntimeError::NotFound(format!("checkpoint {checkpoint_id} has no files")))?;
        assert_eq!((kept.kind, kept.memory), (kind, spec.memory_mb), "forked with the checkpoint's machine");
        let booted = self.boot(spec)?;
        self.with_sandbox(&spec.sandbox_id, |s| {
            s.files = kept.files;
            s.env = kept.env;
            s.sessions = kept.sessions;
            s.resumed = u32::from(kind == CheckpointKind::Full);
        })?;
        Ok(booted)
    }
    fn templates(&self) -> Vec<TemplateDisk> {
        let length = u64::from(TEMPLATE_DISK_MB) << 20;
        let mut all: Vec<TemplateDisk> = SHIPPED_TEMPLATES
            .iter()
            .map(|name| TemplateDisk { name: name.to_string(), built_in: true, length, allocated: 1 << 20 })
            .collect();
        for (name, disk) in self.made_templates.lock().expect("lock").iter() {
            let length = std::fs::metadata(disk).map_or(0, |m| m.len());
            all.push(TemplateDisk { name: name.clone(), built_in: false, length, allocated: length });
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
    fn install_template(&self, name: &str, disk: &Path, _content_id: &str) -> Result<(), RuntimeError> {
        let mut made = self.made_templates.lock().expect("lock");
        if SHIPPED_TEMPLATES.contains(&name) || made.contains_key(name) {
            return Err(RuntimeError::Conflict(format!("a template named {name:?} exists already")));
        }
        let kept = fake_template_dir().join(format!("{name}-{}.ext4", self.next_cid.fetch_add(1, Ordering::SeqCst)));
        std::fs::rename(disk, &kept).map_err(|e| RuntimeError::Failed(format!("cannot keep {name}: {e}")))?;
        made.insert(name.to_string(), kept);
        Ok(())
    }
    fn remove_template(&self, name: &str) -> Result<(), RuntimeError> {
        let disk = self.made_templates.lock().expect("lock").remove(name);
        match disk {
            Some(disk) => {
                let _ = std::fs::remove_file(disk);
                Ok(())
            }
            None => Err(RuntimeError::NotFound(format!("template {name:?} not found"))),
        }
    }
    fn copy_root_disk(&self, sandbox_id: &str, to: &Path) -> Result<(), RuntimeError> {
        let files = self
            .sandboxes
            .lock()
            .expect("lock")
            .get(sandbox_id)
            .filter(|s| s.alive || s.hibernated)
            .map(|s| s.files.clone())
            .ok_or_else(|| RuntimeError::NotFound(format!("sandbox {sandbox_id} is not running")))?;
        // The double's "disk": its files, one `path=bytes` line each.
        let text: String = files.iter().map(|(p, b)| format!("{p}={}\n", String::from_utf8_lossy(b))).collect();
        std::fs::write(to, text).map_err(|e| RuntimeError::Failed(e.to_string()))
    }
    fn delete_checkpoint(&self, checkpoint_id: &str) -> Result<(), RuntimeError> {
        self.checkpoints.lock().expect("lock").remove(checkpoint_id);
        Ok(())
    }
    fn checkpoint_ids(&self) -> Vec<String> {
        self.checkpoints.lock().expect("lock").keys().cloned().collect()
    }
    fn hibernated_ids(&self) -> Vec<String> {
        self.sandboxes.lock().expect("lock").iter().filter(|(_, s)| s.hibernated).map(|(id, _)| id.clone()).collect()
    }
    fn set_env(&self, id: &str, envs: &EnvVars) -> Result<(), RuntimeError> {
        if *self.fail_set_env.lock().expect("lock") {
            return Err(RuntimeError::Failed("agent did not answer".into()));
        }
        self.with_sandbox(id, |s| s.env = envs.iter().map(|(k, v)| (k.clone(), v.to_string())).collect())
    }
    fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        self.stops.lock().expect("lock").push(id.to_string());
        if let Some(s) = self.sandboxes.lock().expect("lock").get_mut(id) {
            s.alive = false;
            // The snapshot goes with the sandbox's directory.
            s.hibernated = false;
        }
        Ok(())
    }
    fn is_alive(&self, id: &str) -> bool {
        self.sandboxes.lock().expect("lock").get(id).is_some_and(|s| s.alive)
    }
    fn running_ids(&self) -> Vec<String> {
        self.sandboxes.lock().expect("lock").iter().filter(|(_, s)| s.alive).map(|(id, _)| id.clone()).collect()
    }
    fn exec_run(&self, id: &str, r: &ExecRequest) -> Result<ExecOutput, RuntimeError> {
        let delay = *self.exec_delay.lock().expect("lock");
        std::thread::sleep(delay);
        if r.command_line == "pwd" {
            let cwd = r.cwd.clone().unwrap_or_else(|| "/root".into());
            return self.with_sandbox(id, |_| ExecOutput {
                exit_code: 0,
                stdout: format!("{cwd}\n").into_bytes(),
                stderr: vec![],
            });
        }
        self.with_sandbox(id, |s| fake_shell(&r.command_line, &s.env, &r.envs))
    }
    fn exec_start(&self, id: &str, r: &ExecRequest) -> Result<String, RuntimeError> {
        self.with_sandbox(id, |s| {
            let sid = format!("session-{}", s.sessions.len() + 1);
            s.sessions.push(ExecSessionInfo {
                session_id: sid.clone(),
                command_line: r.command_line.clone(),
                running: true,
                exit_code: None,
            });
            sid
        })
    }
    fn exec_list(&self, id: &str) -> Result<Vec<ExecSessionInfo>, RuntimeError> {
        self.with_sandbox(id, |s| s.sessions.clone())
    }
    fn exec_kill(&self, id: &str, sid: &str, signal: i32) -> Result<(), RuntimeError> {
        self.with_sandbox(id, |s| {
            let session = s.sessions.iter_mut().find(|x| x.session_id == sid);
            match session {
                Some(x) => {
                    x.running = false;
                    x.exit_code = Some(128 + signal);
                    s.killed.push((sid.to_string(), signal));
                    Ok(())
                }
                None => Err(RuntimeError::NotFound(format!("session {sid} not found"))),
            }
        })?
    }
    /// The session echoes stdin back on stdout, `err:` lines on stderr, and exits
    /// with code 7 on a line `exit`.
    fn exec_attach(&self, id: &str, sid: &str) -> Result<ExecAttachment, RuntimeError> {
        let known = self.with_sandbox(id, |s| s.sessions.iter().any(|x| x.session_id == sid))?;
        if !known {
            return Err(RuntimeError::NotFound(format!("session {sid} not found")));
        }
        let (events_tx, events) = mpsc::channel();
        let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            let _ = events_tx.send(ExecEvent::Stdout(b"ready\n".to_vec()));
            let _ = events_tx.send(ExecEvent::ReplayEnd);
            while let Ok(chunk) = stdin_rx.recv() {
                let text = String::from_utf8_lossy(&chunk).to_string();
                if text.trim() == "exit" {
                    let _ = events_tx.send(ExecEvent::Exit(7));
                    return;
                }
                let ev = match text.strip_prefix("err:") {
                    Some(rest) => ExecEvent::Stderr(rest.as_bytes().to_vec()),
                    None => ExecEvent::Stdout(chunk),
                };
                let _ = events_tx.send(ev);
            }
        });
        Ok(ExecAttachment { events, stdin: Box::new(ChannelStdin(stdin_tx)) })
    }
    /// A terminal is listed like a session (as the agent lists it) and attached to like one.
    fn pty_start(&self, id: &str, r: &PtyRequest) -> Result<String, RuntimeError> {
        self.with_sandbox(id, |s| {
            let sid = format!("session-{}", s.sessions.len() + 1);
            s.sessions.push(ExecSessionInfo {
                session_id: sid.clone(),
                command_line: r.shell.clone().unwrap_or_else(|| "/bin/bash -l".into()),
                running: true,
                exit_code: None,
            });
            s.terminals.insert(sid.clone(), ((r.cols, r.rows), r.shell.clone()));
            sid
        })
    }
    fn pty_resize(&self, id: &str, sid: &str, cols: u16, rows: u16) -> Result<(), RuntimeError> {
        self.with_sandbox(id, |s| {
            let running = s.sessions.iter().find(|x| x.session_id == sid).map(|x| x.running);
            match (running, s.terminals.get_mut(sid)) {
                (None, _) => Err(RuntimeError::NotFound(format!("session {sid} not found"))),
                (Some(false), _) => Err(RuntimeError::Conflict(format!("session {sid} has already ended"))),
                (Some(true), None) => Err(RuntimeError::Conflict(format!("session {sid} has no terminal"))),
                (Some(true), Some((size, _))) => {
                    *size = (cols, rows);
                    Ok(())
                }
            }
        })?
    }
    /// Paths under `/gen/<n>` are `n` generated bytes (`pattern_byte`) and under `/zero/<n>` `n`
    /// zeros, streamed without being held; other files come from `files`. Data goes out in pieces of `FAKE_PIECE` bytes.
    fn read_file_to(&self, id: &str, path: &str, sink: &mut dyn Write) -> Result<u64, RuntimeError> {
        // Zeros cost nothing to make: for timing the server rather than the double.
        if let Some(n) = path.strip_prefix("/zero/") {
            self.with_sandbox(id, |_| ())?;
            let size: u64 = n.parse().map_err(|_| RuntimeError::Invalid(format!("{path}: not a size")))?;
            let piece = vec![0u8; FAKE_PIECE];
            let mut sent = 0u64;
            while sent < size {
                let n = (size - sent).min(FAKE_PIECE as u64) as usize;
                sink.write_all(&piece[..n]).map_err(|e| RuntimeError::Failed(format!("sink: {e}")))?;
                sent += n as u64;
            }
            return Ok(size);
        }
        if let Some(n) = path.strip_prefix("/gen/") {
            self.with_sandbox(id, |_| ())?;
            let size: u64 = n.parse().map_err(|_| RuntimeError::Invalid(format!("{path}: not a size")))?;
            let cut_at = *self.cut_reads_at.lock().expect("lock");
            let mut piece = vec![0u8; FAKE_PIECE];
            let mut sent = 0u64;
            while sent < size {
                let n = (size - sent).min(FAKE_PIECE as u64) as usize;
                for (i, b) in piece[..n].iter_mut().enumerate() {
                    *b = pattern_byte(sent + i as u64);
                }
                if cut_at.is_some_and(|cut| sent + n as u64 > cut) {
                    return Err(RuntimeError::Guest(format!("{path}: the agent went away (test)")));
                }
                sink.write_all(&piece[..n]).map_err(|e| RuntimeError::Failed(format!("sink: {e}")))?;
                sent += n as u64;
                self.read_handed_out.fetch_add(n as u64, Ordering::SeqCst);
            }
            return Ok(size);
        }
        let data = self
            .with_sandbox(id, |s| s.files.get(path).cloned())?
            .ok_or_else(|| RuntimeError::NotFound(format!("{path}: no such file")))?;
        for piece in data.chunks(FAKE_PIECE) {
            sink.write_all(piece).map_err(|e| RuntimeError::Failed(format!("sink: {e}")))?;
        }
        Ok(data.len() as u64)
    }
    /// Paths under `/sink/` are counted and checked against `pattern_byte`, not kept (their
    /// size and whether every byte matched are recorded in `sunk`); others go to `files`.
    /// With `disk_left` set, more data than that is a full disk.
    fn write_file_from(&self, id: &str, path: &str, source: &mut dyn Read) -> Result<u64, RuntimeError> {
        self.with_sandbox(id, |_| ())?;
        let disk_left = *self.disk_left.lock().expect("lock");
        let sinking = path.starts_with("/sink/");
        let mut buf = vec![0u8; FAKE_PIECE];
        let (mut total, mut kept, mut matches) = (0u64, Vec::new(), true);
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RuntimeError::Failed(format!("source: {e}"))),
            };
            self.largest_source_read.fetch_max(n, Ordering::SeqCst);
            if sinking {
                matches &= buf[..n].iter().enumerate().all(|(i, b)| *b == pattern_byte(total + i as u64));
            } else {
                kept.extend_from_slice(&buf[..n]);
            }
            total += n as u64;
            self.write_taken_in.fetch_add(n as u64, Ordering::SeqCst);
        }
        // As the agent does: the rest is taken, then the write fails and nothing is kept.
        if disk_left.is_some_and(|left| total > left) {
            return Err(RuntimeError::NoSpace(format!("{path}: No space left on device (os error 28)")));
        }
        if sinking {
            self.sunk.lock().expect("lock").insert(path.to_string(), (total, matches));
        } else {
            self.with_sandbox(id, |s| s.files.insert(path.to_string(), kept))?;
        }
        Ok(total)
    }
    fn remove_file(&self, id: &str, path: &str) -> Result<(), RuntimeError> {
        self.with_sandbox(id, |s| s.files.remove(path))?
            .map(|_| ())
            .ok_or_else(|| RuntimeError::NotFound(format!("{path}: no such file")))
    }
    fn list_dir(&self, id: &str, path: &str) -> Result<Vec<DirEntry>, RuntimeError> {
        self.with_sandbox(id, |s| {
            let prefix = format!("{}/", path.trim_end_matches('/'));
            let mut out: Vec<DirEntry> = s
                .files
                .iter()
                .filter(|(p, _)| p.starts_with(&prefix) && !p[prefix.len()..].contains('/'))
                .map(|(p, d)| DirEntry {
                    name: p[prefix.len()..].to_string(),
                    path: p.clone(),
                    is_dir: false,
                    size: d.len() as u64,
                })
                .collect();
            for d in &s.dirs {
                if d.starts_with(&prefix) && !d[prefix.len()..].contains('/') {
                    out.push(DirEntry { name: d[prefix.len()..].to_string(), path: d.clone(), is_dir: true, size: 0 });
                }
            }
            out
        })
    }
    fn make_dir(&self, id: &str, path: &str) -> Result<(), RuntimeError> {
        self.with_sandbox(id, |s| s.dirs.push(path.to_string()))
    }
    fn stat_file(&self, id: &str, path: &str) -> Result<FileInfo, RuntimeError> {
        let found = self.with_sandbox(id, |s| {
            let name = path.rsplit('/').next().unwrap_or_default().to_string();
            let info = |is_dir: bool, size: u64| FileInfo {
                name: name.clone(),
                path: path.to_string(),
                is_dir,
                is_symlink: false,
                size,
                mode: if is_dir { 0o755 } else { 0o644 },
                modified_ms: 1_700_000_000_000,
            };
            match s.files.get(path) {
                Some(data) => Some(info(false, data.len() as u64)),
                None => s.dirs.iter().any(|d| d == path).then(|| info(true, 0)),
            }
        })?;
        found.ok_or_else(|| RuntimeError::NotFound(format!("{path}: no such file or directory")))
    }
    fn rename_file(&self, id: &str, from: &str, to: &str) -> Result<(), RuntimeError> {
        self.with_sandbox(id, |s| match s.files.remove(from) {
            Some(data) => {
                s.files.insert(to.to_string(), data);
                Ok(())
            }
            None => Err(RuntimeError::NotFound(format!("{from}: no such file or directory"))),
        })?
    }
    fn console_tail(&self, id: &str, max_bytes: u64) -> Result<Vec<u8>, RuntimeError> {
        let map = self.sandboxes.lock().expect("lock");
        let s = map.get(id).ok_or_else(|| RuntimeError::NotFound(format!("sandbox {id} unknown")))?;
        let start = s.console.len().saturating_sub(max_bytes as usize);
        Ok(s.console[start..].to_vec())
    }
    fn forget(&self, id: &str) {
        self.forgotten.lock().expect("lock").push(id.to_string());
        if let Some(s) = self.sandboxes.lock().expect("lock").get_mut(id) {
            s.console.clear();
        }
    }
}

// ---------------------------------------------------------------- publisher double

#[derive(Default)]
pub struct FakePublisher {
    pub published: Mutex<HashMap<String, SandboxSeal>>,
    pub withdrawn: Mutex<Vec<String>>,
    /// Makes every publish fail, as a registry refusing the bindings would.
    pub fail_publish: Mutex<bool>,
}

impl SealPublisher for FakePublisher {
    fn publish(&self, seal: SandboxSeal) -> Result<(), String> {
        if *self.fail_publish.lock().expect("lock") {
            return Err("registry refused the bindings (test)".into());
        }
        self.published.lock().expect("lock").insert(seal.sandbox_id.clone(), seal);
        Ok(())
    }
    fn withdraw(&self, id: &str) {
        self.published.lock().expect("lock").remove(id);
        self.withdrawn.lock().expect("lock").push(id.to_string());
    }
}

// ---------------------------------------------------------------- server harness

pub struct Harness {
    pub running: Option<Running>,
    pub runtime: Arc<FakeRuntime>,
    pub publisher: Arc<FakePublisher>,
    pub data_dir: PathBuf,
    pub addr: SocketAddr,
    /// Kept for `restart`.
    pub capacity: CapacityConfig,
    pub master_key_store: appliance::master_key::Choice,
}

pub fn config(data_dir: &Path, key_file: Option<PathBuf>) -> ServeConfig {
    ServeConfig {
        listen: "127.0.0.1:0".into(),
        loopback_listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        vmm_bin: PathBuf::from("/nonexistent/vmm"),
        admin_key_file: key_file,
        master_key_file: None,
        master_key_store: appliance::master_key::Choice::DataDir,
        log_requests: false,
        stopped_retention: std::time::Duration::from_secs(3600),
        power_control: false,
        require_data_mount: false,
        capacity: roomy_capacity(),
        connections: ConnectionLimits::default(),
        tls: appliance::api_tls::TlsChoice::Plain,
        tls_trust_out: None,
        upgrade_key_files: Vec::new(),
    }
}

/// Far more than any test asks for, and the same on every machine that runs the tests.
pub fn roomy_capacity() -> CapacityConfig {
    CapacityConfig { memory_total_mb: Some(1 << 20), memory_reserve_mb: Some(0), vcpus: Some(64), disk_reserve_mb: 0 }
}

/// Every file below `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

pub fn write_key_file(dir: &Path) -> PathBuf {
    let path = dir.join("admin-key");
    std::fs::write(&path, format!("{ADMIN_KEY}\n")).expect("write key");
    path
}

impl Harness {
    pub fn start(tag: &str) -> Harness {
        let data_dir = temp_dir(tag);
        Self::start_in(data_dir, Arc::new(FakeRuntime::default()), Arc::new(FakePublisher::default()))
    }

    pub fn start_in(data_dir: PathBuf, runtime: Arc<FakeRuntime>, publisher: Arc<FakePublisher>) -> Harness {
        Self::start_configured(data_dir, runtime, publisher, |_| {})
    }

    /// Like `start`, with stopped sandboxes forgotten `retention` after they ended.
    pub fn start_with_retention(tag: &str, retention: Duration) -> Harness {
        let data_dir = temp_dir(tag);
        Self::start_configured(data_dir, Arc::new(FakeRuntime::default()), Arc::new(FakePublisher::default()), |c| {
            c.stopped_retention = retention;
        })
    }

    /// Like `start`, with admission control sized by `capacity` instead of the roomy default.
    pub fn start_with_capacity(tag: &str, capacity: CapacityConfig) -> Harness {
        let data_dir = temp_dir(tag);
        Self::start_configured(data_dir, Arc::new(FakeRuntime::default()), Arc::new(FakePublisher::default()), |c| {
            c.capacity = capacity;
        })
    }

    /// Like `start`, with client connections capped and timed by `limits`.
    /// Keeps the master key where `store` says (a swtpm socket in the TPM tests).
    pub fn start_with_key_store(tag: &str, store: appliance::master_key::Choice) -> Harness {
        let data_dir = temp_dir(tag);
        Self::start_configured(data_dir, Arc::new(FakeRuntime::default()), Arc::new(FakePublisher::default()), |c| {
            c.master_key_store = store;
        })
    }

    pub fn start_with_connections(tag: &str, limits: ConnectionLimits) -> Harness {
        let data_dir = temp_dir(tag);
        Self::start_configured(data_dir, Arc::new(FakeRuntime::default()), Arc::new(FakePublisher::default()), |c| {
            c.connections = limits;
        })
    }

    /// Starts with the configuration adjusted by `adjust` (e.g. HTTPS).
    pub fn start_configured(
        data_dir: PathBuf,
        runtime: Arc<FakeRuntime>,
        publisher: Arc<FakePublisher>,
        adjust: impl FnOnce(&mut ServeConfig),
    ) -> Harness {
        let key_file = write_key_file(&data_dir);
        let backend = Backend { runtime: runtime.clone(), publisher: publisher.clone(), egress: Arc::default() };
        let mut cfg = config(&data_dir, Some(key_file));
        adjust(&mut cfg);
        let running = serve::start(&cfg, SandboxSide::Wired(backend)).expect("start");
        let addr = running.addr();
        Harness {
            running: Some(running),
            runtime,
            publisher,
            data_dir,
            addr,
            capacity: cfg.capacity,
            master_key_store: cfg.master_key_store,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(self.addr, Some(ADMIN_KEY))
    }

    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(5));
        }
    }

    /// Stops and starts again on the same data dir with the same doubles.
    pub fn restart(&mut self) {
        self.stop();
        let key_file = write_key_file(&self.data_dir);
        let backend =
            Backend { runtime: self.runtime.clone(), publisher: self.publisher.clone(), egress: Arc::default() };
        let mut cfg = config(&self.data_dir, Some(key_file));
        cfg.capacity = self.capacity.clone();
        cfg.master_key_store = self.master_key_store.clone();
        let running = serve::start(&cfg, SandboxSide::Wired(backend)).expect("restart");
        self.addr = running.addr();
        self.running = Some(running);
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// The names in a `GET /api/projects/{id}/secrets` answer (`[{"name", "allowedHosts"}]`).
pub fn secret_names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("secret list is an array")
        .iter()
        .map(|e| e["name"].as_str().expect("entry has a name").to_string())
        .collect()
}

/// Waits (up to 10 s) until the reaper has recorded that sandbox `id` ended.
pub fn wait_ended(c: &mut Client, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, s) = c.call("GET", &format!("/api/sandboxes/{id}"), "");
        if s["status"] != "running" {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the reaper did not notice the dead VMM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Client {
    inner: HttpClient,
    /// Every response body, for the secrecy checks.
    pub transcript: Vec<u8>,
}

impl Client {
    pub fn new(addr: SocketAddr, key: Option<&str>) -> Client {
        Client { inner: HttpClient::connect(addr, key.map(String::from)).expect("connect"), transcript: Vec::new() }
    }

    pub fn raw(&mut self, method: &str, path: &str, body: &[u8]) -> HttpResponse {
        let r = self.inner.request(method, path, body).expect("request");
        self.transcript.extend_from_slice(&r.body);
        r
    }

    /// Uploads `body` as `content_type`; status and parsed JSON.
    pub fn upload(&mut self, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let r = self.inner.request_typed("POST", path, Some(content_type), body).expect("request");
        let v = if r.body.is_empty() { Value::Null } else { serde_json::from_slice(&r.body).expect("json body") };
        (r.status, v)
    }

    /// Status and parsed JSON (Null for empty bodies).
    pub fn call(&mut self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let r = self.raw(method, path, body.as_bytes());
        let v = if r.body.is_empty() { Value::Null } else { serde_json::from_slice(&r.body).expect("json body") };
        (r.status, v)
    }
}

/// Asks to attach `ws` to exec session `sid` of sandbox `id` (admin key, RFC 6455's sample
/// key) and returns the response head.
pub fn websocket_handshake(ws: &mut TcpStream, id: &str, sid: &str) -> String {
    websocket_open(ws, &format!("/api/sandboxes/{id}/exec/{sid}"), &format!("X-API-Key: {ADMIN_KEY}\r\n"))
}

/// Asks to open a WebSocket at `target` (path and query) with `headers` (each ending in CRLF)
/// added to the handshake, and returns the response head.
pub fn websocket_open(ws: &mut TcpStream, target: &str, headers: &str) -> String {
    let handshake = format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    );
    ws.write_all(handshake.as_bytes()).expect("handshake");
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte).expect("response");
        response.push(byte[0]);
    }
    String::from_utf8_lossy(&response).to_string()
}

/// A client WebSocket frame: masked, as clients must send them.
pub fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0xA1, 0xB2, 0xC3, 0xD4];
    let mut out = vec![0x80 | opcode];
    assert!(payload.len() < 126);
    out.push(0x80 | payload.len() as u8);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// One unmasked server frame: its opcode and payload.
pub fn read_server_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).expect("frame head");
    assert_eq!(head[1] & 0x80, 0, "server frames are unmasked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).expect("len");
            u16::from_be_bytes(b) as usize
        }
        127 => panic!("unexpectedly large frame"),
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).expect("payload");
    (head[0] & 0x0f, payload)
}

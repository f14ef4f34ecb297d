//! The real sandbox runtime: each sandbox is a `vmm` process booting the guest kernel and the
//! sandbox initramfs (our init and agent, which switch to the root disk) on a reflink clone of
//! its template, reached through its agent over vsock (CID = identity). A
//! hibernated sandbox is only its directory (disk and snapshot, `snapshot_dir`) and its CID.

mod agent;
mod checkpoint_files;
mod cids;
mod console_keep;
mod console_trim;
mod snapshot_dir;
mod template_snapshots;
pub mod templates;
mod vm;

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::runtime::{
    BootSpec, Booted, CheckpointKind, DirEntry, EnvVars, ExecAttachment, ExecOutput, ExecRequest, ExecSessionInfo,
    FileInfo, PtyRequest, RuntimeError, SandboxRuntime, Snapshot, TemplateDisk, MAX_FILE_SIZE,
};
use checkpoint_files::CheckpointFiles;
use cids::CidPool;
use template_snapshots::TemplateSnapshots;
use templates::TemplateStore;
use vm::Vm;

/// A nested boot under TCG takes seconds; this bounds a hung one.
const AGENT_READY_LIMIT: Duration = Duration::from_secs(90);
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Writing guest RAM out (zero MiB are skipped) takes well under this, even nested.
const DUMP_WAIT: Duration = Duration::from_secs(60);
/// A snapshot is guest RAM written out plus a little state, and the VMM's exit: as a dump, with
/// room for the largest guests.
const HIBERNATE_WAIT: Duration = Duration::from_secs(120);
/// A resumed guest's agent answers once its vsock transport is reset; a restore maps memory
/// lazily, so this is far less than a boot, but nested guests are slow.
const RESUME_READY_LIMIT: Duration = Duration::from_secs(60);
/// A checkpoint writes what a hibernation does, plus a reflink of the root disk.
const CHECKPOINT_WAIT: Duration = HIBERNATE_WAIT;

pub struct RuntimeConfig {
    pub vmm_bin: PathBuf,
    pub guest_kernel: PathBuf,
    /// The sandbox initramfs: our PID 1 and agent, never taken from the template.
    pub guest_initrd: PathBuf,
    /// Templates shipped read-only with the image (None: only those already imported).
    pub templates_source: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// The appliance CA certificate, installed in every sandbox's trust store.
    pub ca_cert_pem: String,
}

pub struct VmmRuntime {
    config: RuntimeConfig,
    templates: TemplateStore,
    sandboxes_dir: PathBuf,
    /// The console logs of ended sandboxes, kept until their records are forgotten.
    consoles_dir: PathBuf,
    cids: Arc<CidPool>,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Hibernated sandboxes: no VMM, a complete snapshot in their directory, their CID held.
    parked: Mutex<HashMap<String, Parked>>,
    checkpoints: CheckpointFiles,
    template_snapshots: TemplateSnapshots,
    /// Where template snapshots are taken: one directory per template, gone once it is kept.
    template_snapshots_work: PathBuf,
}

#[derive(Clone)]
struct Parked {
    dir: PathBuf,
    cid: u32,
}

impl VmmRuntime {
    /// Imports templates, adopts VMMs that survived an appliance restart and removes what
    /// is left of sandboxes whose VMM is gone.
    pub fn start(config: RuntimeConfig) -> Result<VmmRuntime, String> {
        for (what, path) in [
            ("vmm binary", &config.vmm_bin),
            ("guest kernel", &config.guest_kernel),
            ("guest initramfs", &config.guest_initrd),
        ] {
            if !path.is_file() {
                return Err(format!("{what} {} not found", path.display()));
            }
        }
        let (templates, names) =
            TemplateStore::import(config.templates_source.as_deref(), &config.data_dir.join("templates"))?;
        if names.is_empty() {
            return Err("no sandbox templates are available (is the system disk attached?)".into());
        }
        println!("appliance: sandbox templates: {}", names.join(", "));
        let sandboxes_dir = config.data_dir.join("sandboxes");
        fs::create_dir_all(&sandboxes_dir).map_err(|e| format!("cannot create {}: {e}", sandboxes_dir.display()))?;
        let consoles_dir = config.data_dir.join("consoles");
        let checkpoints = CheckpointFiles::open(config.data_dir.join("checkpoints"))?;
        let template_snapshots = TemplateSnapshots::open(config.data_dir.join("template-snapshots"))?;
        let template_snapshots_work = config.data_dir.join("template-snapshots.work");
        clear_work_dir(&template_snapshots_work);
        let runtime = VmmRuntime {
            checkpoints,
            template_snapshots,
            template_snapshots_work,
            config,
            templates,
            sandboxes_dir,
            consoles_dir,
            cids: Arc::new(CidPool::default()),
            vms: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::new()),
        };
        runtime.recover();
        console_trim::spawn(&runtime.sandboxes_dir, vm::CONSOLE_LOG)
            .map_err(|e| format!("cannot start the console-log trimmer: {e}"))?;
        Ok(runtime)
    }

    /// Finds the VMMs that outlived an appliance restart and the complete hibernation snapshots,
    /// and removes what is left of the other sandboxes (half-written snapshots included). Which of
    /// the found ones stay is the control plane's call (its reconcile stops VMMs without a
    /// running record and drops snapshots without a hibernated one).
    fn recover(&self) {
        let Ok(entries) = fs::read_dir(&self.sandboxes_dir) else { return };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            if let Some(vm) = vm::adopt(&dir, self.exit_reporter(&id)) {
                println!("appliance: sandbox {id}: VMM pid {} still running; adopted (cid {})", vm.pid, vm.cid);
                self.cids.claim(vm.cid);
                if let Ok(mut vms) = self.vms.lock() {
                    vms.insert(id, vm);
                }
            } else if let Some(cid) = vm::configured_cid(&dir).filter(|_| snapshot_dir::is_complete(&dir)) {
                if let Err(e) = snapshot_dir::clean_after_vmm(&dir) {
                    println!("appliance: sandbox {id}: cannot remove a half-written snapshot: {e}");
                }
                println!("appliance: sandbox {id}: hibernated (cid {cid}); its snapshot is kept");
                self.cids.claim(cid);
                if let Ok(mut parked) = self.parked.lock() {
                    parked.insert(id, Parked { dir, cid });
                }
            } else {
                // Its VMM ended while the appliance was down: keep what its guest printed.
                self.keep_console(&id, &dir);
                if let Err(e) = fs::remove_dir_all(&dir) {
                    println!("appliance: cannot remove leftovers of sandbox {id}: {e}");
                }
            }
        }
    }

    fn exit_reporter(&self, id: &str) -> impl FnOnce(Option<i32>) + Send + 'static {
        let id = id.to_string();
        move |status| {
            let code = status.map_or("signal".to_string(), |c| c.to_string());
            println!("appliance: sandbox {id}: VMM ended: {} (exit {code})", vmm_contract::exit::describe(status));
        }
    }

    fn vm(&self, id: &str) -> Result<Arc<Vm>, RuntimeError> {
        let vms = self.vms.lock().map_err(|_| RuntimeError::Failed("runtime state poisoned".into()))?;
        match vms.get(id) {
            Some(vm) if !vm.has_ended() => Ok(Arc::clone(vm)),
            _ => Err(RuntimeError::NotFound(format!("sandbox {id} is not running"))),
        }
    }

    /// Keeps the tail of an ended sandbox's console before its directory goes.
    fn keep_console(&self, id: &str, dir: &Path) {
        if let Err(e) = console_keep::keep(&dir.join(vm::CONSOLE_LOG), &self.consoles_dir, id) {
            println!("appliance: sandbox {id}: cannot keep its console log: {e}");
        }
    }

    fn agent(&self, id: &str) -> Result<agent::Agent, RuntimeError> {
        agent::connect(self.vm(id)?.cid)
    }

    /// Starts a new sandbox's guest in `dir`: resumes its template's snapshot when there is one
    /// for its machine and disk size, boots the template's disk otherwise. Returns the disk's size
    /// in MiB.
    fn boot_into(&self, spec: &BootSpec, dir: &Path, cid: u32) -> Result<u32, RuntimeError> {
        let template = self.templates.resolve(&spec.template)?;
        let name = template.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let template_mb = disk_mb_of(&template)?;
        let snapshot = self
            .template_snapshots
            .lookup(&name, spec.cpu_count, spec.memory_mb)
            .filter(|_| spec.disk_mb.is_none_or(|mb| mb == template_mb));
        if let Some((id, snapshot)) = snapshot {
            let disk = dir.join(vm::ROOT_DISK);
            let resumed = templates::reflink(&snapshot.join(snapshot_dir::DISK), &disk)
                .and_then(|()| self.start_from_checkpoint(spec, dir, cid, &snapshot, CheckpointKind::Full));
            match resumed {
                Ok(disk_mb) => return Ok(disk_mb),
                Err(e) => {
                    println!("appliance: template {name}: resuming its snapshot {id} failed ({e}); booting instead, and creates boot from now on");
                    self.template_snapshots.withdraw(&name);
                    self.discard_vm(&spec.sandbox_id);
                    let _ = fs::remove_file(&disk);
                }
            }
        }
        let disk_mb = templates::clone_sized(&template, &dir.join(vm::ROOT_DISK), spec.disk_mb)?;
        self.start_vm(spec, dir, cid)?;
        Ok(disk_mb)
    }

    /// Gives new sandbox `id` its directory and a CID and runs `start` (which returns the root
    /// disk's size in MiB) in them. If it fails, a VMM it started is stopped, and the directory
    /// and CID are given back either way; `what` names the start in the log.
    fn start_new(
        &self,
        id: &str,
        what: &str,
        start: impl FnOnce(&Path, u32) -> Result<u32, RuntimeError>,
    ) -> Result<Booted, RuntimeError> {
        let cid = self.cids.allocate().ok_or_else(|| RuntimeError::Failed("no free vsock CID".into()))?;
        let dir = self.sandboxes_dir.join(id);
        if let Err(e) = fs::create_dir(&dir) {
            self.cids.release(cid);
            return Err(RuntimeError::Failed(format!("cannot create {}: {e}", dir.display())));
        }
        match start(&dir, cid) {
            Ok(disk_mb) => Ok(Booted { cid, disk_mb }),
            Err(e) => {
                if self.vms.lock().is_ok_and(|v| v.contains_key(id)) {
                    // Kills the VMM, then frees its CID and directory once it is gone.
                    if let Err(stop_error) = self.stop(id) {
                        println!("appliance: sandbox {id}: cleanup after a failed {what}: {stop_error}");
                    }
                } else {
                    let _ = fs::remove_dir_all(&dir);
                    self.cids.release(cid);
                }
                Err(e)
            }
        }
    }

    /// Kills a sandbox's VMM and forgets it, keeping its directory and CID (for another start).
    fn discard_vm(&self, id: &str) {
        let vm = self.vms.lock().ok().and_then(|mut vms| vms.remove(id));
        if let Some(vm) = vm {
            vm.kill();
            vm.wait_ended(KILL_WAIT);
        }
    }

    /// Finds or takes each template's snapshot, one after the other on a thread of its own;
    /// creates of a template boot until its snapshot is ready.
    pub fn snapshot_templates(self: &Arc<Self>) {
        let runtime = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("template-snapshots".into()).spawn(move || {
            for name in runtime.templates.names() {
                if let Err(e) = runtime.snapshot_template(&name) {
                    println!("appliance: template {name}: no snapshot ({e}); its sandboxes boot their kernel");
                }
            }
        });
        if let Err(e) = spawned {
            println!("appliance: cannot start taking template snapshots ({e}); sandboxes boot their kernel");
        }
    }

    fn snapshot_template(&self, name: &str) -> Result<(), String> {
        let disk = self.templates.resolve(name).map_err(|e| e.to_string())?;
        let content = template_snapshots::template_content_id(&disk)?;
        let config = &self.config;
        let id = template_snapshots::snapshot_id(
            name,
            &content,
            &config.vmm_bin,
            &config.guest_kernel,
            &config.guest_initrd,
        )?;
        let stale = self.template_snapshots.remove_stale(name, &id);
        if stale > 0 {
            println!(
                "appliance: template {name}: removed {stale} snapshot(s) of another VMM, kernel, initramfs or template"
            );
        }
        if self.template_snapshots.files.path(&id).is_ok() {
            self.template_snapshots.set_ready(name, &id);
            println!("appliance: template {name}: snapshot {id} found; creates resume it");
            return Ok(());
        }
        let started = Instant::now();
        let cid = self.cids.allocate().ok_or("no free vsock CID")?;
        let dir = self.template_snapshots_work.join(name);
        let taken = fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))
            .and_then(|()| self.take_template_snapshot(name, &disk, &dir, cid, &id));
        let _ = fs::remove_dir_all(&dir);
        self.cids.release(cid);
        let bytes = taken?;
        self.template_snapshots.set_ready(name, &id);
        println!(
            "appliance: template {name}: snapshot {id} taken in {:.1}s ({} MiB); creates resume it",
            started.elapsed().as_secs_f64(),
            bytes >> 20
        );
        Ok(())
    }

    /// Boots the template's disk in `dir` to a ready agent and checkpoints it as `id`.
    fn take_template_snapshot(&self, name: &str, disk: &Path, dir: &Path, cid: u32, id: &str) -> Result<u64, String> {
        templates::reflink(disk, &dir.join(vm::ROOT_DISK)).map_err(|e| e.to_string())?;
        let sandbox_id = format!("template-{name}");
        let (vcpus, memory_mib) = template_snapshots::SHAPE;
        let vm_spec = vm::VmSpec {
            sandbox_id: &sandbox_id,
            dir,
            vmm_bin: &self.config.vmm_bin,
            kernel: &self.config.guest_kernel,
            initrd: &self.config.guest_initrd,
            vcpus,
            memory_mib,
            cid,
            restore_from: None,
        };
        let vm = vm::spawn(&vm_spec, |_| {})?;
        let taken = self
            .prepare_guest(&vm, cid)
            .map_err(|e| format!("{e}; guest console:\n{}", vm.console_tail(12)))
            .and_then(|()| vm.checkpoint(CHECKPOINT_WAIT))
            .and_then(|_| {
                self.template_snapshots
                    .files
                    .keep(id, &dir.join(snapshot_dir::NEXT), CheckpointKind::Full)
                    .map_err(|e| e.to_string())
            });
        vm.kill();
        vm.wait_ended(KILL_WAIT);
        taken
    }

    /// Starts a VMM on the root disk in `dir` and waits for its guest's agent.
    fn start_vm(&self, spec: &BootSpec, dir: &Path, cid: u32) -> Result<Arc<Vm>, RuntimeError> {
        let vm = self.spawn_vm(spec, dir, cid, None)?;
        let ready = self.prepare_guest(&vm, cid);
        ready.map_err(|e| RuntimeError::Failed(format!("{e}; guest console:\n{}", vm.console_tail(12))))?;
        Ok(vm)
    }

    /// Starts a VMM in `dir` (resuming the snapshot directory `restore_from`, if given) and
    /// tracks it.
    fn spawn_vm(
        &self,
        spec: &BootSpec,
        dir: &Path,
        cid: u32,
        restore_from: Option<&Path>,
    ) -> Result<Arc<Vm>, RuntimeError> {
        let vm_spec = vm::VmSpec {
            sandbox_id: &spec.sandbox_id,
            dir,
            vmm_bin: &self.config.vmm_bin,
            kernel: &self.config.guest_kernel,
            initrd: &self.config.guest_initrd,
            vcpus: spec.cpu_count,
            memory_mib: spec.memory_mb,
            cid,
            restore_from,
        };
        let vm = vm::spawn(&vm_spec, self.exit_reporter(&spec.sandbox_id)).map_err(RuntimeError::Failed)?;
        let how = if restore_from.is_some() { "resuming its snapshot" } else { "booting" };
        println!("appliance: sandbox {}: VMM pid {} started, {how} (cid {cid})", spec.sandbox_id, vm.pid);
        if let Ok(mut vms) = self.vms.lock() {
            vms.insert(spec.sandbox_id.clone(), Arc::clone(&vm));
        }
        Ok(vm)
    }

    /// A resumed guest's vsock connections broke with the restore: reconnects to its agent and
    /// hands it the time and fresh entropy (its clock stood still, and two guests resumed from
    /// one snapshot must not share random output), and `hostname` if it is to change.
    fn resume_guest(vm: &Arc<Vm>, hostname: Option<&str>) -> Result<(), RuntimeError> {
        let ended = Arc::clone(vm);
        let mut agent = agent::wait_ready(vm.cid, RESUME_READY_LIMIT, &|| ended.has_ended())?;
        agent::resumed(&mut agent)?;
        match hostname.map(|name| agent.set_hostname(name)) {
            // An agent that predates the request (in an older checkpoint) keeps its old name.
            Some(Err(agent_protocol::AgentError::Remote { message, .. })) => {
                println!("appliance: cid {}: the resumed guest keeps its hostname: {message}", vm.cid);
                Ok(())
            }
            Some(Err(e)) => Err(agent::to_runtime(e)),
            Some(Ok(())) | None => Ok(()),
        }
    }

    /// Starts the sandbox in `dir` (its root disk already the checkpoint's) from checkpoint
    /// `source`: resumes it (`full`) or boots from its disk (`disk_only`); returns the disk's size
    /// in MiB. On an error a started VMM is left for the caller to stop.
    fn start_from_checkpoint(
        &self,
        spec: &BootSpec,
        dir: &Path,
        cid: u32,
        source: &Path,
        kind: CheckpointKind,
    ) -> Result<u32, RuntimeError> {
        let disk_mb = disk_mb_of(&dir.join(vm::ROOT_DISK))?;
        match kind {
            CheckpointKind::Full => {
                let vm = self.spawn_vm(spec, dir, cid, Some(source))?;
                // The guest was another sandbox's (a fork, or a template's snapshot) or this one's
                // (a restore): either way it gets this sandbox's name.
                let name = vm::guest_hostname(&spec.sandbox_id);
                Self::resume_guest(&vm, Some(&name))
                    .map_err(|e| RuntimeError::Failed(format!("{e}; guest console:\n{}", vm.console_tail(12))))?;
            }
            CheckpointKind::DiskOnly => {
                self.start_vm(spec, dir, cid)?;
            }
        }
        Ok(disk_mb)
    }
}

/// Stops what a template snapshot's VMM left running when the appliance stopped, and removes its
/// directory.
fn clear_work_dir(work: &Path) {
    if let Ok(entries) = fs::read_dir(work) {
        for entry in entries.flatten() {
            if let Some(vm) = vm::adopt(&entry.path(), |_| {}) {
                vm.kill();
                vm.wait_ended(KILL_WAIT);
            }
        }
    }
    let _ = fs::remove_dir_all(work);
}

/// Kills sandbox `id`'s VMM and waits for it to be gone.
fn kill_and_wait(id: &str, vm: &Vm) -> Result<(), RuntimeError> {
    vm.kill();
    if vm.wait_ended(KILL_WAIT) {
        Ok(())
    } else {
        Err(RuntimeError::Failed(format!("sandbox {id}: VMM pid {} did not die", vm.pid)))
    }
}

/// A root disk's size in MiB.
fn disk_mb_of(disk: &Path) -> Result<u32, RuntimeError> {
    fs::metadata(disk)
        .map(|m| u32::try_from(m.len() >> 20).unwrap_or(u32::MAX))
        .map_err(|e| RuntimeError::Failed(format!("cannot read {}: {e}", disk.display())))
}

impl VmmRuntime {
    /// Waits for the agent, then trusts the appliance CA and routes HTTP(S) through the
    /// agent's egress forwarder.
    fn prepare_guest(&self, vm: &Arc<Vm>, cid: u32) -> Result<(), RuntimeError> {
        let ended = Arc::clone(vm);
        let mut agent = agent::wait_ready(cid, AGENT_READY_LIMIT, &|| ended.has_ended())?;
        agent.install_ca(self.config.ca_cert_pem.as_bytes()).map_err(agent::to_runtime)?;
        // Programs in the sandbox find the egress forwarder the agent runs here.
        let proxy_url = format!("http://{}", agent_protocol::EGRESS_LISTEN);
        let proxy: Vec<(String, String)> = ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"]
            .iter()
            .map(|name| (name.to_string(), proxy_url.clone()))
            .chain(["NO_PROXY", "no_proxy"].iter().map(|name| (name.to_string(), "localhost,127.0.0.1".to_string())))
            .collect();
        agent.set_env(&proxy, &[]).map_err(agent::to_runtime)
    }
}

impl SandboxRuntime for VmmRuntime {
    fn boot(&self, spec: &BootSpec) -> Result<Booted, RuntimeError> {
        self.start_new(&spec.sandbox_id, "boot", |dir, cid| self.boot_into(spec, dir, cid))
    }

    fn restart(&self, spec: &BootSpec) -> Result<Booted, RuntimeError> {
        let id = &spec.sandbox_id;
        let old = self.vm(id)?;
        kill_and_wait(id, &old)?;
        // The VMM appends to the console log: what the guest printed before stays in `logs`.
        let disk_mb = disk_mb_of(&old.dir.join(vm::ROOT_DISK))?;
        // The same CID: the proxy's registration of its tokens is by CID and stays valid.
        match self.start_vm(spec, &old.dir, old.cid) {
            Ok(_) => Ok(Booted { cid: old.cid, disk_mb }),
            Err(e) => {
                // Its new VMM (if one started) is stopped; the caller records the sandbox stopped.
                let _ = self.stop(id);
                Err(e)
            }
        }
    }

    fn hibernate(&self, sandbox_id: &str) -> Result<Snapshot, RuntimeError> {
        let vm = self.vm(sandbox_id)?;
        let failed = |e: String| RuntimeError::Failed(format!("sandbox {sandbox_id}: {e}"));
        let snapshot = vm.hibernate(HIBERNATE_WAIT).map_err(failed)?;
        // The VMM is gone; the snapshot counts once it and the disk it goes with are durable. On a
        // failure here the ended VMM stays listed, so the sandbox's end is noticed and `stop`
        // removes its directory.
        snapshot_dir::keep(&vm.dir, &vm.dir.join(vm::ROOT_DISK)).map_err(|e| failed(e.to_string()))?;
        let lock = || RuntimeError::Failed("runtime state poisoned".into());
        self.parked
            .lock()
            .map_err(|_| lock())?
            .insert(sandbox_id.to_string(), Parked { dir: vm.dir.clone(), cid: vm.cid });
        self.vms.lock().map_err(|_| lock())?.remove(sandbox_id);
        Ok(snapshot)
    }

    fn wake(&self, spec: &BootSpec) -> Result<Booted, RuntimeError> {
        let id = &spec.sandbox_id;
        let parked =
            self.parked.lock().map_err(|_| RuntimeError::Failed("runtime state poisoned".into()))?.get(id).cloned();
        let Parked { dir, cid } =
            parked.ok_or_else(|| RuntimeError::NotFound(format!("sandbox {id} has no hibernation snapshot")))?;
        let failed = |e: std::io::Error| RuntimeError::Failed(format!("sandbox {id}: {e}"));
        let disk_mb = disk_mb_of(&dir.join(vm::ROOT_DISK))?;
        let resumed = snapshot_dir::take_for_resume(&dir).map_err(failed)?;
        // From here it is a VMM (or nothing): `stop` finds it either way and removes its directory.
        let started = self.spawn_vm(spec, &dir, cid, Some(&resumed));
        if let Ok(mut parked) = self.parked.lock() {
            if started.is_ok() {
                parked.remove(id);
            }
        }
        let ready = started.and_then(|vm| {
            Self::resume_guest(&vm, None)
                .map_err(|e| RuntimeError::Failed(format!("{e}; guest console:\n{}", vm.console_tail(12))))
        });
        match ready {
            Ok(()) => Ok(Booted { cid, disk_mb }),
            Err(e) => {
                if let Err(stop_error) = self.stop(id) {
                    println!("appliance: sandbox {id}: cleanup after a failed wake: {stop_error}");
                }
                Err(e)
            }
        }
    }

    fn checkpoint(&self, sandbox_id: &str, checkpoint_id: &str, kind: CheckpointKind) -> Result<u64, RuntimeError> {
        let vm = self.vm(sandbox_id)?;
        vm.checkpoint(CHECKPOINT_WAIT).map_err(|e| RuntimeError::Failed(format!("sandbox {sandbox_id}: {e}")))?;
        self.checkpoints.keep(checkpoint_id, &vm.dir.join(snapshot_dir::NEXT), kind)
    }

    fn restore_checkpoint(
        &self,
        spec: &BootSpec,
        checkpoint_id: &str,
        kind: CheckpointKind,
    ) -> Result<Booted, RuntimeError> {
        let id = &spec.sandbox_id;
        let source = self.checkpoints.path(checkpoint_id)?;
        let old = self.vm(id)?;
        kill_and_wait(id, &old)?;
        // From here the sandbox is what the checkpoint was, or nothing.
        let disk = old.dir.join(vm::ROOT_DISK);
        let restored = fs::remove_file(&disk)
            .map_err(|e| RuntimeError::Failed(format!("sandbox {id}: cannot replace its root disk: {e}")))
            .and_then(|()| templates::reflink(&source.join(snapshot_dir::DISK), &disk))
            .and_then(|()| snapshot_dir::clean_after_vmm(&old.dir).map_err(|e| RuntimeError::Failed(e.to_string())))
            .and_then(|()| self.start_from_checkpoint(spec, &old.dir, old.cid, &source, kind));
        match restored {
            Ok(disk_mb) => Ok(Booted { cid: old.cid, disk_mb }),
            Err(e) => {
                if let Err(stop_error) = self.stop(id) {
                    println!("appliance: sandbox {id}: cleanup after a failed restore: {stop_error}");
                }
                Err(e)
            }
        }
    }

    fn fork(&self, spec: &BootSpec, checkpoint_id: &str, kind: CheckpointKind) -> Result<Booted, RuntimeError> {
        let source = self.checkpoints.path(checkpoint_id)?;
        self.start_new(&spec.sandbox_id, "fork", |dir, cid| {
            templates::reflink(&source.join(snapshot_dir::DISK), &dir.join(vm::ROOT_DISK))
                .and_then(|()| self.start_from_checkpoint(spec, dir, cid, &source, kind))
        })
    }

    fn delete_checkpoint(&self, checkpoint_id: &str) -> Result<(), RuntimeError> {
        self.checkpoints.remove(checkpoint_id)
    }

    fn checkpoint_ids(&self) -> Vec<String> {
        self.checkpoints.ids()
    }

    fn templates(&self) -> Vec<TemplateDisk> {
        self.templates.list()
    }

    fn install_template(&self, name: &str, disk: &Path, content_id: &str) -> Result<(), RuntimeError> {
        self.templates.install(name, disk, content_id)?;
        // Before the answer, so that the first create already resumes it (as for shipped ones).
        if let Err(e) = self.snapshot_template(name) {
            println!("appliance: template {name}: no snapshot ({e}); its sandboxes boot their kernel");
        }
        Ok(())
    }

    fn remove_template(&self, name: &str) -> Result<(), RuntimeError> {
        self.templates.remove(name)?;
        self.template_snapshots.withdraw(name);
        self.template_snapshots.remove_stale(name, "");
        Ok(())
    }

    fn copy_root_disk(&self, sandbox_id: &str, to: &Path) -> Result<(), RuntimeError> {
        if let Some(parked) = self.parked.lock().ok().and_then(|p| p.get(sandbox_id).cloned()) {
            // Hibernated: nothing writes to its disk until it wakes.
            return templates::reflink(&parked.dir.join(vm::ROOT_DISK), to);
        }
        let vm = self.vm(sandbox_id)?;
        // What the guest wrote is on its disk, not only in its page cache; then the VMM copies the
        // disk while the guest stands still.
        agent::connect(vm.cid)?.sync_disks().map_err(|e| in_sandbox(sandbox_id)(agent::to_runtime(e)))?;
        vm.checkpoint(CHECKPOINT_WAIT).map_err(|e| RuntimeError::Failed(format!("sandbox {sandbox_id}: {e}")))?;
        CheckpointFiles::take_disk(&vm.dir.join(snapshot_dir::NEXT), to)
    }

    fn hibernated_ids(&self) -> Vec<String> {
        self.parked.lock().map(|p| p.keys().cloned().collect()).unwrap_or_default()
    }

    fn set_env(&self, sandbox_id: &str, envs: &EnvVars) -> Result<(), RuntimeError> {
        use zeroize::Zeroize;
        let mut pairs: Vec<(String, String)> = envs.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
        let result = self.agent(sandbox_id).and_then(|mut a| a.set_env(&pairs, &[]).map_err(agent::to_runtime));
        for (_, value) in &mut pairs {
            value.zeroize();
        }
        result.map_err(in_sandbox(sandbox_id))
    }

    fn stop(&self, sandbox_id: &str) -> Result<(), RuntimeError> {
        let poisoned = || RuntimeError::Failed("runtime state poisoned".into());
        let vm = self.vms.lock().map_err(|_| poisoned())?.remove(sandbox_id);
        // A hibernated sandbox (or one whose wake failed before its VMM started) has no VMM.
        let parked = self.parked.lock().map_err(|_| poisoned())?.remove(sandbox_id);
        let (dir, cid) = match (&vm, parked) {
            (Some(vm), _) => {
                kill_and_wait(sandbox_id, vm)?;
                (vm.dir.clone(), vm.cid)
            }
            (None, Some(parked)) => (parked.dir, parked.cid),
            (None, None) => return Ok(()),
        };
        self.cids.release(cid);
        self.keep_console(sandbox_id, &dir);
        // The snapshot goes with the directory.
        fs::remove_dir_all(&dir).map_err(|e| RuntimeError::Failed(format!("cannot remove {}: {e}", dir.display())))
    }

    fn is_alive(&self, sandbox_id: &str) -> bool {
        self.vm(sandbox_id).is_ok()
    }

    fn running_ids(&self) -> Vec<String> {
        self.vms
            .lock()
            .map(|vms| vms.iter().filter(|(_, vm)| !vm.has_ended()).map(|(id, _)| id.clone()).collect())
            .unwrap_or_default()
    }

    fn exec_run(&self, sandbox_id: &str, request: &ExecRequest) -> Result<ExecOutput, RuntimeError> {
        agent::run(&mut self.agent(sandbox_id)?, request).map_err(in_sandbox(sandbox_id))
    }

    fn exec_start(&self, sandbox_id: &str, request: &ExecRequest) -> Result<String, RuntimeError> {
        agent::session_start(&mut self.agent(sandbox_id)?, request).map_err(in_sandbox(sandbox_id))
    }

    fn exec_list(&self, sandbox_id: &str) -> Result<Vec<ExecSessionInfo>, RuntimeError> {
        agent::session_list(&mut self.agent(sandbox_id)?).map_err(in_sandbox(sandbox_id))
    }

    fn exec_kill(&self, sandbox_id: &str, session_id: &str, signal: i32) -> Result<(), RuntimeError> {
        let id = agent::session_id(session_id)?;
        self.agent(sandbox_id)?.session_kill(id, signal).map_err(agent::to_runtime).map_err(in_sandbox(sandbox_id))
    }

    fn exec_attach(&self, sandbox_id: &str, session_id: &str) -> Result<ExecAttachment, RuntimeError> {
        let id = agent::session_id(session_id)?;
        agent::attach(self.agent(sandbox_id)?, id).map_err(in_sandbox(sandbox_id))
    }

    fn pty_start(&self, sandbox_id: &str, request: &PtyRequest) -> Result<String, RuntimeError> {
        agent::pty_start(&mut self.agent(sandbox_id)?, request).map_err(in_sandbox(sandbox_id))
    }

    fn pty_resize(&self, sandbox_id: &str, session_id: &str, cols: u16, rows: u16) -> Result<(), RuntimeError> {
        let id = agent::session_id(session_id)?;
        let size = agent_protocol::WindowSize { cols, rows };
        self.agent(sandbox_id)?.session_resize(id, size).map_err(agent::to_runtime).map_err(in_sandbox(sandbox_id))
    }

    fn read_file_to(&self, sandbox_id: &str, path: &str, sink: &mut dyn Write) -> Result<u64, RuntimeError> {
        self.agent(sandbox_id)?
            .read_file_to(path, MAX_FILE_SIZE, sink)
            .map_err(agent::to_runtime)
            .map_err(in_sandbox(sandbox_id))
    }

    fn write_file_from(&self, sandbox_id: &str, path: &str, source: &mut dyn Read) -> Result<u64, RuntimeError> {
        let spec = agent_protocol::message::WriteSpec { path: path.to_string(), mode: None, create_parents: true };
        self.agent(sandbox_id)?
            .write_file_from(&spec, source)
            .map_err(agent::to_runtime)
            .map_err(in_sandbox(sandbox_id))
    }

    fn remove_file(&self, sandbox_id: &str, path: &str) -> Result<(), RuntimeError> {
        self.agent(sandbox_id)?.remove(path, true).map_err(agent::to_runtime).map_err(in_sandbox(sandbox_id))
    }

    fn list_dir(&self, sandbox_id: &str, path: &str) -> Result<Vec<DirEntry>, RuntimeError> {
        agent::list_dir(&mut self.agent(sandbox_id)?, path).map_err(in_sandbox(sandbox_id))
    }

    fn make_dir(&self, sandbox_id: &str, path: &str) -> Result<(), RuntimeError> {
        self.agent(sandbox_id)?.mkdir(path).map_err(agent::to_runtime).map_err(in_sandbox(sandbox_id))
    }

    fn stat_file(&self, sandbox_id: &str, path: &str) -> Result<FileInfo, RuntimeError> {
        let st = self.agent(sandbox_id)?.stat(path).map_err(agent::to_runtime).map_err(in_sandbox(sandbox_id))?;
        Ok(FileInfo {
            name: st.name,
            path: st.path,
            is_dir: st.is_dir,
            is_symlink: st.is_symlink,
            size: st.size,
            mode: st.mode,
            modified_ms: st.modified_ms,
        })
    }

    fn rename_file(&self, sandbox_id: &str, from: &str, to: &str) -> Result<(), RuntimeError> {
        self.agent(sandbox_id)?.rename(from, to).map_err(agent::to_runtime).map_err(in_sandbox(sandbox_id))
    }

    fn console_tail(&self, sandbox_id: &str, max_bytes: u64) -> Result<Vec<u8>, RuntimeError> {
        let max = max_bytes.min(console_keep::KEEP_BYTES);
        let live = self
            .vms
            .lock()
            .ok()
            .and_then(|vms| vms.get(sandbox_id).map(|vm| vm.dir.clone()))
            .or_else(|| self.parked.lock().ok().and_then(|p| p.get(sandbox_id).map(|p| p.dir.clone())))
            .map(|dir| dir.join(vm::CONSOLE_LOG));
        let path = match live {
            Some(path) => path,
            None => console_keep::kept_path(&self.consoles_dir, sandbox_id)
                .ok_or_else(|| RuntimeError::Invalid(format!("{sandbox_id:?} is not a sandbox id")))?,
        };
        console_keep::read_tail(&path, max)
            .map_err(|e| RuntimeError::Failed(format!("cannot read the console log of sandbox {sandbox_id}: {e}")))
    }

    fn forget(&self, sandbox_id: &str) {
        if let Err(e) = console_keep::forget(&self.consoles_dir, sandbox_id) {
            println!("appliance: sandbox {sandbox_id}: cannot remove its kept console log: {e}");
        }
    }

    fn memory_dump(&self, sandbox_id: &str) -> Result<(String, u64), RuntimeError> {
        let vm = self.vm(sandbox_id)?;
        let path = vm.dir.join(vm::MEMORY_DUMP);
        let bytes = vm.dump_memory(DUMP_WAIT).map_err(RuntimeError::Failed)?;
        Ok((path.display().to_string(), bytes))
    }

    fn exit_description(&self, sandbox_id: &str) -> Option<(bool, String)> {
        self.vms.lock().ok()?.get(sandbox_id)?.exit()
    }

    fn resource_gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        let (vmms, resident) = self.vms.lock().map_or((0, 0), |v| {
            (v.len() as u64, v.values().filter(|vm| !vm.has_ended()).map(|vm| vm::resident_bytes(vm.pid)).sum())
        });
        let hibernated = self.parked.lock().map_or(0, |p| p.len() as u64);
        let disks = fs::read_dir(&self.sandboxes_dir).map_or(0, |d| d.count() as u64);
        vec![
            ("appliance_vmm_processes", "VMM processes the runtime tracks.", vmms),
            (
                "appliance_vmm_resident_bytes",
                "Resident memory of the VMM processes (guest RAM they touched included).",
                resident,
            ),
            ("appliance_vsock_cids_in_use", "Guest vsock CIDs held by sandboxes.", self.cids.in_use() as u64),
            ("appliance_sandbox_disks", "Sandbox directories (root disk clones) on the data disk.", disks),
            (
                "appliance_hibernated_sandboxes",
                "Hibernated sandboxes: a snapshot on the data disk, no VMM.",
                hibernated,
            ),
            (
                "appliance_template_snapshots_ready",
                "Templates whose creates resume a snapshot instead of booting a kernel.",
                self.template_snapshots.ready_count(),
            ),
        ]
    }
}

/// A guest's misbehaviour is reported with the sandbox it came from (the API answers 502 with it).
fn in_sandbox(id: &str) -> impl Fn(RuntimeError) -> RuntimeError + '_ {
    move |e| match e {
        RuntimeError::Guest(m) => RuntimeError::Guest(format!("sandbox {id}: {m}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime over a scratch data directory, with stand-ins for the VMM (exits at once) and
    /// the kernel, and sandbox directories as a crash left them.
    fn runtime_after_a_crash(tag: &str, sandboxes: &[(&str, &[&str])]) -> (VmmRuntime, PathBuf) {
        let root = std::env::temp_dir().join(format!("appliance-vmm-runtime-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let templates = root.join("shipped");
        fs::create_dir_all(&templates).expect("mkdir");
        fs::write(templates.join("base.ext4"), vec![0u8; 4096]).expect("template");
        fs::write(templates.join("base.id"), "1").expect("template id");
        fs::write(root.join("kernel"), b"kernel").expect("kernel");
        fs::write(root.join("initrd"), b"initrd").expect("initrd");
        for (n, (id, files)) in sandboxes.iter().enumerate() {
            let dir = root.join("data").join("sandboxes").join(id);
            fs::create_dir_all(&dir).expect("mkdir");
            let mut config = vmm_contract::VmConfig::new(root.join("kernel"));
            config.vsock_cid = Some(20 + n as u64);
            fs::write(dir.join("vm.json"), config.to_json()).expect("config");
            // No process runs this config: its VMM is gone.
            fs::write(dir.join("vmm.pid"), "999999999").expect("pid");
            fs::write(dir.join(vm::CONSOLE_LOG), b"guest said hello\n").expect("console");
            for file in *files {
                let path = dir.join(file);
                fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
                fs::write(path, b"bytes").expect("file");
            }
        }
        let config = RuntimeConfig {
            vmm_bin: PathBuf::from("/bin/true"),
            guest_kernel: root.join("kernel"),
            guest_initrd: root.join("initrd"),
            templates_source: Some(templates),
            data_dir: root.join("data"),
            ca_cert_pem: String::new(),
        };
        (VmmRuntime::start(config).expect("start"), root.join("data").join("sandboxes"))
    }

    #[test]
    fn a_restart_keeps_complete_snapshots_and_removes_half_written_ones() {
        let complete: &[&str] = &["hibernated/state", "hibernated/memory", "snapshot.next/state", "resumed/memory"];
        let half: &[&str] = &["snapshot.next/state", "snapshot.next/memory"];
        let (runtime, dir) = runtime_after_a_crash("recover", &[("kept", complete), ("half", half)]);
        assert_eq!(runtime.hibernated_ids(), vec!["kept".to_string()]);
        assert!(runtime.running_ids().is_empty());
        let kept = dir.join("kept");
        assert!(snapshot_dir::is_complete(&kept));
        assert!(!kept.join(snapshot_dir::NEXT).exists(), "a half-written snapshot is removed");
        assert!(!kept.join(snapshot_dir::RESUMED).exists(), "no VMM maps the resumed one any more");
        assert!(!dir.join("half").exists(), "a sandbox with only a half-written snapshot is gone");
        // Its CID stays held while it is hibernated, and its console readable.
        assert_eq!(runtime.cids.in_use(), 1);
        assert_eq!(runtime.console_tail("kept", 1024).expect("console"), b"guest said hello\n");

        // Deleting it drops the snapshot with the directory and frees the CID.
        runtime.stop("kept").expect("stop");
        assert!(!kept.exists());
        assert!(runtime.hibernated_ids().is_empty());
        assert_eq!(runtime.cids.in_use(), 0);
    }

    #[test]
    fn a_hibernated_vmm_leaves_a_durable_snapshot_under_its_name_and_holds_its_cid() {
        let (runtime, dir) = runtime_after_a_crash("hibernate", &[]);
        let sandbox = dir.join("live");
        fs::create_dir_all(&sandbox).expect("mkdir");
        fs::write(sandbox.join(vm::ROOT_DISK), b"disk").expect("disk");
        let vmm = vm::tests::fake_vmm(&sandbox, Some(&vm::tests::WRITTEN), Some(5));
        let spec = vm::VmSpec {
            sandbox_id: "live",
            dir: &sandbox,
            vmm_bin: &vmm,
            kernel: Path::new("/k"),
            initrd: Path::new("/i"),
            vcpus: 1,
            memory_mib: 128,
            cid: 31,
            restore_from: None,
        };
        let vm = vm::spawn(&spec, |_| {}).expect("spawn");
        runtime.cids.claim(31);
        runtime.vms.lock().expect("lock").insert("live".into(), vm);
        std::thread::sleep(Duration::from_millis(200));

        let snapshot = runtime.hibernate("live").expect("hibernated");
        assert_eq!(snapshot.memory_bytes, 2);
        assert_eq!(runtime.hibernated_ids(), vec!["live".to_string()]);
        assert!(runtime.running_ids().is_empty() && !runtime.is_alive("live"));
        assert!(snapshot_dir::is_complete(&sandbox));
        assert!(!sandbox.join(snapshot_dir::NEXT).exists());
        assert_eq!(runtime.cids.in_use(), 1, "it wakes with the same CID");
        // Hibernated, it cannot be hibernated again; it can be dropped.
        assert!(matches!(runtime.hibernate("live"), Err(RuntimeError::NotFound(_))));
        runtime.stop("live").expect("stop");
        assert!(!sandbox.exists());
        assert_eq!(runtime.cids.in_use(), 0);
    }

    #[test]
    fn a_wake_that_fails_leaves_no_vmm_no_snapshot_and_no_cid() {
        let complete: &[&str] = &["hibernated/state", "hibernated/memory", "root.ext4"];
        let (runtime, dir) = runtime_after_a_crash("wake-fails", &[("sleeper", complete)]);
        let spec = BootSpec {
            sandbox_id: "sleeper".into(),
            template: "base".into(),
            cpu_count: 1,
            memory_mb: 128,
            disk_mb: None,
        };
        // The stand-in VMM exits at once, so the resumed guest's agent never answers.
        let err = runtime.wake(&spec).expect_err("no guest to resume");
        assert!(matches!(err, RuntimeError::Failed(_)), "{err:?}");
        assert!(!dir.join("sleeper").exists());
        assert!(runtime.hibernated_ids().is_empty() && runtime.running_ids().is_empty());
        assert_eq!(runtime.cids.in_use(), 0);
        // Nothing is left to wake.
        assert!(matches!(runtime.wake(&spec), Err(RuntimeError::NotFound(_))));
    }
}

//! Builds the microVM from a configuration (or a snapshot), confines the process, runs the
//! vCPUs and serves device I/O and control requests (memory dumps, snapshots) on the main
//! thread until the guest stops the machine or a hibernation does.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vmm_contract::{Control, Event};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::arch;
use crate::config::{Derived, DeviceSpec, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::console::ConsoleLog;
use crate::devices::legacy::LegacyDevices;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use crate::devices::virtio::vhost::VhostVsock;
use crate::devices::virtio::vsock::{Vsock, VHOST_QUEUES};
use crate::exit::{ExitReason, ExitSignal};
use crate::jail;
use crate::layout::COM1_IRQ;
use crate::memory::{create_guest_memory, dump_guest_memory, map_guest_memory_from, GuestMemory};
use crate::seccomp::{self, Role};
use crate::snapshot;
use crate::timeline;
use crate::vstate::pause::{install_kick_handler, Pause};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vcpu_state::{msr_save_order, VcpuState};
use crate::vstate::vm::create_vm;

/// How long a guest that printed a panic banner gets to reboot before we stop it.
const PANIC_GRACE: Duration = Duration::from_secs(3);
const VCPU_STACK: usize = 256 << 10;

/// Everything opened by path before the process gives up its view of the filesystem.
struct OpenedFiles {
    /// Not opened when a snapshot is restored: the kernel is in its memory.
    kernel: Option<File>,
    initrd: Option<File>,
    disks: Vec<File>,
    console: File,
    memory_dump: Option<File>,
    events: Option<File>,
    vhost_vsock: Option<File>,
    snapshot_to: Option<snapshot::Target>,
    /// The snapshot to resume: its state and memory files.
    restore_from: Option<(File, File)>,
}

/// Creates (or empties) a file the VMM writes, readable by its owner only.
fn create_private(path: &std::path::Path, what: &str) -> Result<File, String> {
    File::options()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot open {what} {}: {e}", path.display()))
}

fn open_files(cfg: &VmConfig) -> Result<OpenedFiles, String> {
    let booting = cfg.restore_from.is_none();
    let kernel = if booting {
        Some(File::open(&cfg.kernel).map_err(|e| format!("cannot open kernel {}: {e}", cfg.kernel.display()))?)
    } else {
        None
    };
    let initrd = match (&cfg.initrd, booting) {
        (Some(p), true) => Some(File::open(p).map_err(|e| format!("cannot open initrd {}: {e}", p.display()))?),
        _ => None,
    };
    let disks = cfg
        .disks
        .iter()
        .map(|d| {
            File::options()
                .read(true)
                .write(!d.read_only)
                .open(&d.path)
                .map_err(|e| format!("cannot open disk {}: {e}", d.path.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let console_path = cfg.console_log.clone().unwrap_or_else(|| "/dev/null".into());
    let console = File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&console_path)
        .map_err(|e| format!("cannot open console log {}: {e}", console_path.display()))?;
    let memory_dump = match &cfg.memory_dump {
        Some(p) => Some(
            File::options()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .map_err(|e| format!("cannot open memory dump file {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let events = match &cfg.events {
        Some(p) => Some(
            File::options()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(p)
                .map_err(|e| format!("cannot open the events file {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let vhost_vsock = match cfg.vsock_cid {
        Some(_) => Some(
            File::options()
                .read(true)
                .write(true)
                .open("/dev/vhost-vsock")
                .map_err(|e| format!("cannot open /dev/vhost-vsock (is vhost_vsock loaded?): {e}"))?,
        ),
        None => None,
    };
    let snapshot_to = match &cfg.snapshot_to {
        Some(t) => Some(snapshot::Target {
            state: create_private(&t.state, "the snapshot state file")?,
            memory: create_private(&t.memory, "the snapshot memory file")?,
            disk: match (&t.disk, disks.first()) {
                (Some(p), Some(root)) => Some((
                    create_private(p, "the snapshot disk file")?,
                    root.try_clone().map_err(|e| format!("cannot reuse the root disk: {e}"))?,
                )),
                _ => None,
            },
        }),
        None => None,
    };
    let restore_from = match &cfg.restore_from {
        Some(r) => Some((
            File::open(&r.state).map_err(|e| format!("cannot open the snapshot state {}: {e}", r.state.display()))?,
            File::open(&r.memory)
                .map_err(|e| format!("cannot open the snapshot memory {}: {e}", r.memory.display()))?,
        )),
        None => None,
    };
    Ok(OpenedFiles { kernel, initrd, disks, console, memory_dump, events, vhost_vsock, snapshot_to, restore_from })
}

fn eventfd() -> Result<EventFd, String> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| format!("cannot create an eventfd: {e}"))
}

/// A device whose queue notifications the main thread serves.
struct Served {
    kick: EventFd,
    transport: Arc<Mutex<MmioTransport>>,
}

/// The bus's virtio transports, and those of them whose queues the main thread serves.
type BuiltDevices = (Vec<Arc<Mutex<MmioTransport>>>, Vec<Served>);

fn build_devices(
    vm: &VmFd,
    mem: &Arc<GuestMemory>,
    cfg: &VmConfig,
    files: &mut OpenedFiles,
) -> Result<BuiltDevices, String> {
    let mut transports = Vec::new();
    let mut served = Vec::new();
    let mut disks = std::mem::take(&mut files.disks).into_iter();
    for (i, (spec, window)) in cfg.devices().into_iter().zip(cfg.device_windows()).enumerate() {
        let notify = IoEventAddress::Mmio(window.base + NOTIFY_OFFSET);
        let irq = eventfd()?;
        vm.register_irqfd(&irq, window.irq).map_err(|e| format!("KVM_IRQFD failed: {e}"))?;
        let irq_for_transport = irq.try_clone().map_err(|e| format!("cannot clone an eventfd: {e}"))?;
        match spec {
            DeviceSpec::Disk(d) => {
                let file = disks.next().ok_or("disk list changed while building devices")?;
                let name = format!("vd{}", (b'a' + i as u8) as char);
                let block =
                    Block::new(file, d.read_only, &name).map_err(|e| format!("disk {}: {e}", d.path.display()))?;
                let kick = eventfd()?;
                vm.register_ioevent(&kick, &notify, 0u32).map_err(|e| format!("KVM_IOEVENTFD failed: {e}"))?;
                let t = Arc::new(Mutex::new(MmioTransport::new(Box::new(block), mem.clone(), irq_for_transport)));
                served.push(Served { kick, transport: t.clone() });
                transports.push(t);
            }
            DeviceSpec::Vsock(cid) => {
                let file = files.vhost_vsock.take().ok_or("vhost-vsock is not open")?;
                let backend = VhostVsock::new(file, cid)?;
                let kicks = [eventfd()?, eventfd()?];
                for (q, kick) in kicks.iter().enumerate().take(VHOST_QUEUES) {
                    vm.register_ioevent(kick, &notify, q as u32).map_err(|e| format!("KVM_IOEVENTFD failed: {e}"))?;
                }
                let vsock = Vsock::new(cid, backend, kicks, irq)?;
                transports.push(Arc::new(Mutex::new(MmioTransport::new(
                    Box::new(vsock),
                    mem.clone(),
                    irq_for_transport,
                ))));
            }
        }
    }
    Ok((transports, served))
}

/// How the vCPUs start: at the kernel's entry point, or where a snapshot left them.
enum VcpuStart<'a> {
    Boot(u64),
    Restore(&'a [VcpuState]),
}

fn create_vcpus(kvm: &Kvm, vm: &VmFd, count: u8, start: &VcpuStart) -> Result<Vec<Vcpu>, String> {
    let max = kvm.get_max_vcpus();
    if count as usize > max {
        return Err(format!("this host allows at most {max} vCPUs per VM"));
    }
    let supported =
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| format!("KVM_GET_SUPPORTED_CPUID failed: {e}"))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let msr_indices = msr_save_order(
        kvm.get_msr_index_list().map_err(|e| format!("KVM_GET_MSR_INDEX_LIST failed: {e}"))?.as_slice().to_vec(),
    );
    (0..count)
        .map(|id| {
            let fd = vm.create_vcpu(u64::from(id)).map_err(|e| format!("KVM_CREATE_VCPU {id} failed: {e}"))?;
            let mut cpuid = supported.clone();
            arch::cpuid::patch_for_vcpu(cpuid.as_mut_slice(), id, count, tsc_deadline);
            fd.set_cpuid2(&cpuid).map_err(|e| format!("KVM_SET_CPUID2 failed: {e}"))?;
            match start {
                VcpuStart::Boot(entry) => arch::regs::configure_vcpu(&fd, id == 0, *entry)?,
                VcpuStart::Restore(states) => {
                    states.get(usize::from(id)).ok_or(format!("the snapshot has no vCPU {id}"))?.restore(&fd)?;
                }
            }
            Ok(Vcpu { id, fd, msr_indices: msr_indices.clone() })
        })
        .collect()
}

/// Blocks the signals that carry `Control` requests (so they're only seen through the returned
/// signalfd); threads started later inherit the mask.
fn control_signal_fd() -> Result<RawFd, String> {
    // SAFETY: sigset manipulation on a local set, then syscalls that only read it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        for control in [Control::DumpMemory, Control::Checkpoint, Control::Hibernate] {
            libc::sigaddset(&raw mut set, control.signal());
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) != 0 {
            return Err("cannot block the control signals".into());
        }
        let fd = libc::signalfd(-1, &raw const set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(format!("signalfd failed: {}", std::io::Error::last_os_error()));
        }
        Ok(fd)
    }
}

/// Watches `fd` for input under `token`.
fn watch(epoll: &Epoll, fd: RawFd, token: u64) -> Result<(), String> {
    epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
        .map_err(|e| format!("epoll_ctl failed: {e}"))
}

/// Waits for events (up to `timeout`, or forever); leaves the ready tokens in `out`.
fn wait(epoll: &Epoll, timeout: Option<Duration>, out: &mut Vec<u64>) -> Result<(), String> {
    let mut events = [EpollEvent::default(); 16];
    let ms = timeout.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32);
    out.clear();
    match epoll.wait(ms, &mut events) {
        Ok(n) => {
            out.extend(events[..n].iter().map(EpollEvent::data));
            Ok(())
        }
        // EINTR: a signal arrived; the caller just looks again.
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(format!("epoll_wait failed: {e}")),
    }
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_CONTROL: u64 = 1;
const TOKEN_QUEUE_BASE: u64 = 2;

/// Boots the VM described by `cfg` (or resumes the snapshot it names) and runs it to the end.
/// Errors before the guest runs come back as `Err`; once it runs, every outcome is an
/// `ExitReason` (with the VMM error text available from the returned message).
pub fn run(cfg: &VmConfig) -> Result<(ExitReason, Option<String>), String> {
    let mut files = open_files(cfg)?;
    let restore = match &files.restore_from {
        Some((state, _)) => Some(snapshot::load(state, cfg).map_err(|e| format!("cannot restore: {e}"))?),
        None => None,
    };
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    // Opened while paths still resolve (the jail comes later).
    let resumed = match &files.restore_from {
        Some((_, memory)) => Some(snapshot::resumed_memory::ResumedMemory::open(memory)?),
        None => None,
    };
    let mem = Arc::new(match &files.restore_from {
        Some((_, memory)) => map_guest_memory_from(memory, cfg.memory_bytes())?,
        None => create_guest_memory(cfg.memory_bytes())?,
    });
    // Guest RAM stays mapped until the process exits, whatever gets dropped on the way:
    // KVM's memory slots point at it.
    std::mem::forget(Arc::clone(&mem));
    let vm = create_vm(&kvm, &mem)?;
    timeline::mark("memory and VM created");
    let vcpu_start = match (&restore, files.kernel.as_mut()) {
        (Some(machine), _) => VcpuStart::Restore(&machine.vcpus),
        (None, Some(kernel)) => VcpuStart::Boot(arch::load_and_configure(
            &mem,
            kernel,
            files.initrd.as_mut(),
            &cfg.kernel_cmdline(),
            cfg.memory_bytes(),
            cfg.vcpus,
        )?),
        (None, None) => return Err("no kernel to boot".into()),
    };
    timeline::mark(if restore.is_some() { "snapshot state read" } else { "kernel loaded" });

    let exit = Arc::new(ExitSignal::new().map_err(|e| format!("cannot create an eventfd: {e}"))?);
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(|e| format!("KVM_IRQFD failed: {e}"))?;
    let serial_irq_again = serial_irq.try_clone().map_err(|e| format!("cannot clone an eventfd: {e}"))?;
    let console = files.console.try_clone().map_err(|e| format!("cannot reuse the console log: {e}"))?;
    let console = ConsoleLog::new(console, exit.clone());
    let legacy = match &restore {
        Some(machine) => LegacyDevices::restored(&machine.serial, serial_irq, console, exit.clone())?,
        None => LegacyDevices::new(serial_irq, console, exit.clone()),
    };
    let (virtio, served) = build_devices(&vm, &mem, cfg, &mut files)?;
    if let Some(machine) = &restore {
        for (transport, saved) in virtio.iter().zip(&machine.devices) {
            transport.lock().map_err(|_| "a device lock is poisoned")?.restore(saved)?;
        }
    }
    let bus = Arc::new(Bus { legacy, virtio });
    if let Some(machine) = &restore {
        // The interrupt controllers, timer and clock before the vCPUs whose local APICs and
        // kvmclock refer to them.
        machine.vm.restore(&vm)?;
    }
    let vcpus = create_vcpus(&kvm, &vm, cfg.vcpus, &vcpu_start)?;
    if restore.is_some() {
        // Interrupts lost on their way into the old VM (see `signal_after_restore`) are raised
        // again, now that the interrupt controllers hold their saved state. The serial driver
        // reads the UART's interrupt register and carries on if transmission was waiting.
        for transport in &bus.virtio {
            transport.lock().map_err(|_| "a device lock is poisoned")?.signal_after_restore();
        }
        let _ = serial_irq_again.write(1);
        eprintln!("vmm: resumed from a snapshot");
    }
    timeline::mark("devices and vCPUs set up");

    let epoll = Epoll::new().map_err(|e| format!("epoll_create1 failed: {e}"))?;
    watch(&epoll, exit.event.as_raw_fd(), TOKEN_EXIT)?;
    let control_fd = control_signal_fd()?;
    watch(&epoll, control_fd, TOKEN_CONTROL)?;
    for (i, s) in served.iter().enumerate() {
        watch(&epoll, s.kick.as_raw_fd(), TOKEN_QUEUE_BASE + i as u64)?;
    }

    seccomp::install_sigsys_handler()?;
    install_kick_handler()?;
    let pause = Arc::new(Pause::new(vcpus.len()));
    jail::enter()?;
    timeline::mark("jailed");
    for vcpu in vcpus {
        let (bus, exit, pause) = (bus.clone(), exit.clone(), pause.clone());
        std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id))
            .stack_size(VCPU_STACK)
            .spawn(move || {
                pause.register(vcpu.id);
                match seccomp::install(Role::Vcpu) {
                    Ok(()) => vcpu.run(bus, exit, pause),
                    Err(e) => exit.fail(e),
                }
            })
            .map_err(|e| format!("cannot start a vCPU thread: {e}"))?;
    }
    seccomp::install(Role::Main)?;

    let machine = snapshot::Machine { cfg, vm: &vm, mem: &mem, bus: &bus, pause: &pause, resumed: resumed.as_ref() };
    let requests = Requests {
        control_fd,
        dump: files.memory_dump.as_ref(),
        snapshot_to: files.snapshot_to.as_ref(),
        events: files.events.as_ref(),
    };
    let reason = event_loop(&epoll, &exit, &served, &requests, &machine)?;
    bus.legacy.flush_console();
    Ok((reason, exit.error_message()))
}

/// Where `Control` requests arrive, where their results go, and where their outcome is reported.
struct Requests<'a> {
    control_fd: RawFd,
    dump: Option<&'a File>,
    snapshot_to: Option<&'a snapshot::Target>,
    events: Option<&'a File>,
}

impl Requests<'_> {
    /// The control signals that arrived since the last call.
    fn take_signals(&self) -> Vec<libc::c_int> {
        let mut signals = Vec::new();
        let mut info = [0u8; 128]; // struct signalfd_siginfo; ssi_signo is its first u32
                                   // SAFETY: reads at most 128 bytes into a 128-byte buffer.
        while unsafe { libc::read(self.control_fd, info.as_mut_ptr().cast::<libc::c_void>(), info.len()) } > 0 {
            signals.push(u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as libc::c_int);
        }
        signals
    }

    /// Appends `event` to the events file (for the appliance).
    fn report(&self, event: &Event) {
        if let Some(mut events) = self.events {
            if let Err(e) = events.write_all(event.to_line().as_bytes()) {
                eprintln!("vmm: cannot report an event: {e}");
            }
        }
    }

    /// Serves one `Control::DumpMemory` request: writes guest RAM, then reports the outcome.
    fn dump_memory(&self, mem: &GuestMemory) {
        let event = if let Some(f) = self.dump {
            match dump_guest_memory(mem, f) {
                Ok(bytes) => {
                    eprintln!("vmm: guest memory dumped ({} MiB)", bytes >> 20);
                    Event::MemoryDumped { bytes }
                }
                Err(error) => {
                    eprintln!("vmm: memory dump failed: {error}");
                    Event::MemoryDumpFailed { error }
                }
            }
        } else {
            eprintln!("vmm: SIGUSR1 ignored: no memory_dump file configured");
            Event::MemoryDumpFailed { error: "no memory_dump file configured".into() }
        };
        self.report(&event);
    }

    /// Serves a checkpoint or hibernation request; true when the snapshot is written and the
    /// VMM is to stop (a hibernation).
    fn snapshot(&self, kind: snapshot::Kind, machine: &snapshot::Machine) -> bool {
        let result = match self.snapshot_to {
            Some(target) => snapshot::take(kind, machine, target),
            None => Err("no snapshot_to files are configured".into()),
        };
        let event = match result {
            Ok(event) => {
                eprintln!("vmm: snapshot written ({kind:?}): {}", event.to_line().trim_end());
                event
            }
            Err(error) => {
                eprintln!("vmm: snapshot ({kind:?}) failed, the guest runs on: {error}");
                self.report(&Event::SnapshotFailed { error });
                return false;
            }
        };
        self.report(&event);
        kind == snapshot::Kind::Hibernate
    }
}

fn event_loop(
    epoll: &Epoll,
    exit: &ExitSignal,
    served: &[Served],
    requests: &Requests,
    machine: &snapshot::Machine,
) -> Result<ExitReason, String> {
    let mut ready = Vec::new();
    let mut panic_deadline: Option<Instant> = None;
    loop {
        let timeout = panic_deadline.map(|d| d.saturating_duration_since(Instant::now()));
        wait(epoll, timeout, &mut ready)?;
        if let Some(d) = panic_deadline {
            if Instant::now() >= d {
                return Ok(ExitReason::Panic);
            }
        }
        for &token in &ready {
            match token {
                TOKEN_EXIT => {
                    let _ = exit.event.read();
                    if let Some(reason) = exit.reason() {
                        return Ok(reason);
                    }
                    if exit.panic_seen() && panic_deadline.is_none() {
                        panic_deadline = Some(Instant::now() + PANIC_GRACE);
                    }
                }
                TOKEN_CONTROL => {
                    for signal in requests.take_signals() {
                        if signal == Control::DumpMemory.signal() {
                            requests.dump_memory(machine.mem);
                        } else if signal == Control::Checkpoint.signal() {
                            requests.snapshot(snapshot::Kind::Checkpoint, machine);
                        } else if signal == Control::Hibernate.signal()
                            && requests.snapshot(snapshot::Kind::Hibernate, machine)
                        {
                            return Ok(ExitReason::Hibernated);
                        }
                    }
                }
                t => {
                    if let Some(s) = served.get((t - TOKEN_QUEUE_BASE) as usize) {
                        let _ = s.kick.read();
                        timeline::once(timeline::Once::QueueNotify, "first block queue notify");
                        if let Ok(mut transport) = s.transport.lock() {
                            transport.process_queue(0);
                        }
                    }
                }
            }
        }
    }
}

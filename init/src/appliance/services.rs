//! Supervision of the appliance services: start in order, forward their output to the console
//! line by line, restart with exponential backoff, stop in reverse order.
//!
//! The list comes from `/etc/opencomputer/services`, written by the image pipeline: one service
//! per line, `<name> <absolute path> [args...]`, `#` starts a comment.

use crate::sys::console;
use crate::sys::process::{self, ExitStatus};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const SERVICES_FILE: &str = "/etc/opencomputer/services";

/// First restart delay, doubled on every crash up to the cap.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A service that ran this long is considered healthy again: its backoff resets.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Longest line forwarded to the console in one piece.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
}

/// Parses the services file; errors name the line.
pub fn parse_services(text: &str) -> Result<Vec<ServiceSpec>, String> {
    let mut specs: Vec<ServiceSpec> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace().map(str::to_string);
        let (Some(name), Some(program)) = (words.next(), words.next()) else {
            return Err(format!("line {}: expected `<name> <program> [args...]`", index + 1));
        };
        if !program.starts_with('/') {
            return Err(format!("line {}: program {program:?} is not an absolute path", index + 1));
        }
        if specs.iter().any(|s| s.name == name) {
            return Err(format!("line {}: service {name:?} is listed twice", index + 1));
        }
        specs.push(ServiceSpec { name, program, args: words.collect() });
    }
    Ok(specs)
}

enum State {
    Running {
        pid: libc::pid_t,
        since: Instant,
    },
    /// Waiting for its restart time.
    Backoff {
        until: Instant,
    },
    Stopped,
}

struct Service {
    spec: ServiceSpec,
    state: State,
    backoff: Duration,
    output: Option<OutputPipe>,
}

/// The read end of a service's stdout+stderr pipe, with the unfinished last line.
struct OutputPipe {
    reader: io::PipeReader,
    partial: Vec<u8>,
}

pub struct Supervisor {
    services: Vec<Service>,
    stopping: bool,
}

impl Supervisor {
    pub fn new(specs: Vec<ServiceSpec>) -> Supervisor {
        let services = specs
            .into_iter()
            .map(|spec| Service { spec, state: State::Stopped, backoff: BACKOFF_START, output: None })
            .collect();
        Supervisor { services, stopping: false }
    }

    pub fn start_all(&mut self) {
        for index in 0..self.services.len() {
            self.start(index);
        }
    }

    fn start(&mut self, index: usize) {
        let service = &mut self.services[index];
        match spawn(&service.spec) {
            Ok((pid, reader)) => {
                crate::log!("started {} (pid {pid})", service.spec.name);
                service.state = State::Running { pid, since: Instant::now() };
                service.output = Some(OutputPipe { reader, partial: Vec::new() });
            }
            Err(e) => {
                crate::log!("cannot start {}: {e}; retrying in {:?}", service.spec.name, service.backoff);
                service.state = State::Backoff { until: Instant::now() + service.backoff };
                service.backoff = (service.backoff * 2).min(BACKOFF_CAP);
            }
        }
    }

    /// Records a reaped child. Returns false if it was not one of ours (an orphan PID 1 adopted).
    pub fn on_exit(&mut self, pid: libc::pid_t, status: ExitStatus) -> bool {
        let Some(service) =
            self.services.iter_mut().find(|s| matches!(s.state, State::Running { pid: p, .. } if p == pid))
        else {
            return false;
        };
        if let Some(mut pipe) = service.output.take() {
            drain(&service.spec.name, &mut pipe, true);
        }
        if self.stopping {
            crate::log!("{} stopped ({status})", service.spec.name);
            service.state = State::Stopped;
            return true;
        }
        if let State::Running { since, .. } = service.state {
            if since.elapsed() >= STABLE_AFTER {
                service.backoff = BACKOFF_START;
            }
        }
        crate::log!("{} exited ({status}); restarting in {:?}", service.spec.name, service.backoff);
        service.state = State::Backoff { until: Instant::now() + service.backoff };
        service.backoff = (service.backoff * 2).min(BACKOFF_CAP);
        true
    }

    /// Starts every service whose backoff has expired.
    pub fn restart_due(&mut self) {
        let now = Instant::now();
        for index in 0..self.services.len() {
            if matches!(self.services[index].state, State::Backoff { until } if until <= now) && !self.stopping {
                self.start(index);
            }
        }
    }

    /// How long the main loop may sleep before a restart is due (None: nothing scheduled).
    pub fn next_deadline(&self) -> Option<Duration> {
        let now = Instant::now();
        self.services
            .iter()
            .filter_map(|s| match s.state {
                State::Backoff { until } => Some(until.saturating_duration_since(now)),
                _ => None,
            })
            .min()
    }

    pub fn output_fds(&self) -> Vec<RawFd> {
        self.services.iter().filter_map(|s| s.output.as_ref().map(|p| p.reader.as_raw_fd())).collect()
    }

    /// Forwards whatever the service behind `fd` has written.
    pub fn forward_output(&mut self, fd: RawFd) {
        for service in &mut self.services {
            if let Some(pipe) = service.output.as_mut().filter(|p| p.reader.as_raw_fd() == fd) {
                if drain(&service.spec.name, pipe, false) {
                    // Writer closed: the process is exiting; the reaper takes it from here.
                    service.output = None;
                }
            }
        }
    }

    #[cfg(test)]
    fn pid_of(&self, name: &str) -> Option<libc::pid_t> {
        self.services.iter().find(|s| s.spec.name == name).and_then(|s| match s.state {
            State::Running { pid, .. } => Some(pid),
            _ => None,
        })
    }

    /// Stops services in reverse start order: SIGTERM to the process group, then SIGKILL after
    /// `grace`. Reaps while waiting so exits are logged.
    pub fn stop_all(&mut self, grace: Duration) {
        self.stopping = true;
        for index in (0..self.services.len()).rev() {
            let State::Running { pid, .. } = self.services[index].state else {
                self.services[index].state = State::Stopped;
                continue;
            };
            let name = self.services[index].spec.name.clone();
            crate::log!("stopping {name} (pid {pid})");
            let _ = process::kill_group(pid, libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while matches!(self.services[index].state, State::Running { .. }) {
                if Instant::now() >= deadline {
                    crate::log!("{name} ignored SIGTERM for {grace:?}; killing it");
                    let _ = process::kill_group(pid, libc::SIGKILL);
                }
                let fds = self.output_fds();
                if let Ok(ready) = process::poll_readable(&fds, 100) {
                    for fd in ready {
                        self.forward_output(fd);
                    }
                }
                for (child, status) in process::reap_all() {
                    self.on_exit(child, status);
                }
            }
        }
    }
}

fn spawn(spec: &ServiceSpec) -> io::Result<(libc::pid_t, io::PipeReader)> {
    let (reader, writer) = io::pipe()?;
    process::set_nonblocking(reader.as_raw_fd())?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        // Own process group: stopping a service also stops whatever it started.
        .process_group(0);
    // SAFETY: the closure only calls pthread_sigmask, which is async-signal-safe, between
    // fork and exec.
    unsafe { cmd.pre_exec(process::unblock_all_signals) };
    let child = cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", spec.program)))?;
    // The child's handle is dropped on purpose: PID 1 reaps with waitpid(-1) for everyone.
    Ok((child.id() as libc::pid_t, reader))
}

/// Reads what is available and prints complete lines. Returns true at end of file.
fn drain(name: &str, pipe: &mut OutputPipe, flush_partial: bool) -> bool {
    let mut buf = [0u8; 8192];
    let mut eof = false;
    loop {
        match pipe.reader.read(&mut buf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => pipe.partial.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        while let Some(pos) = pipe.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pipe.partial.drain(..=pos).collect();
            emit(name, &line[..line.len() - 1]);
        }
        if pipe.partial.len() >= MAX_LINE {
            let line: Vec<u8> = std::mem::take(&mut pipe.partial);
            emit(name, &line);
        }
    }
    if (eof || flush_partial) && !pipe.partial.is_empty() {
        let line = std::mem::take(&mut pipe.partial);
        emit(name, &line);
    }
    eof
}

/// One console line of a service's output, labelled with the service's name.
fn emit(name: &str, line: &[u8]) {
    console::line(name, without_own_label(name, &String::from_utf8_lossy(line)));
}

/// A service that labels its own lines (`appliance: ...`, useful when it runs outside the
/// appliance) would otherwise show the label twice.
fn without_own_label<'a>(name: &str, text: &'a str) -> &'a str {
    text.strip_prefix(name).and_then(|rest| rest.strip_prefix(": ")).unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_label_is_not_repeated() {
        assert_eq!(without_own_label("appliance", "appliance: store open"), "store open");
        assert_eq!(without_own_label("appliance", "appliances: 2"), "appliances: 2");
        assert_eq!(without_own_label("probe", "appliance: x"), "appliance: x");
    }

    #[test]
    fn parses_services_with_comments_and_args() {
        let specs = parse_services(
            "# the API\nappliance /bin/appliance serve --listen 0.0.0.0:8080\n\n probe /bin/probe # test\n",
        )
        .expect("valid file");
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].name, "appliance");
        assert_eq!(specs[0].args, vec!["serve", "--listen", "0.0.0.0:8080"]);
        assert_eq!(specs[1].program, "/bin/probe");
        assert!(specs[1].args.is_empty());
    }

    #[test]
    fn rejects_relative_programs_missing_fields_and_duplicates() {
        assert!(parse_services("a bin/x").unwrap_err().contains("line 1"));
        assert!(parse_services("lonely").unwrap_err().contains("expected"));
        assert!(parse_services("a /x\na /y").unwrap_err().contains("twice"));
    }

    #[test]
    fn services_start_with_no_signal_blocked_even_though_pid1_blocks_its_own() {
        let signals = process::SignalFd::new(&[libc::SIGTERM, libc::SIGUSR1]).expect("signalfd");
        let spec = ServiceSpec {
            name: "mask".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "grep SigBlk /proc/self/status".into()],
        };
        let (pid, mut reader) = spawn(&spec).expect("spawn");
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        unsafe { libc::waitpid(pid, &raw mut status, 0) };
        let mut out = String::new();
        let _ = reader.read_to_string(&mut out);
        assert_eq!(out.trim(), "SigBlk:\t0000000000000000", "child mask: {out:?}");
        drop(signals);
    }

    #[test]
    fn supervisor_restarts_a_crashed_service_with_growing_backoff() {
        let mut sup =
            Supervisor::new(vec![ServiceSpec { name: "t".into(), program: "/bin/true".into(), args: vec![] }]);
        sup.start_all();
        let pid = sup.pid_of("t").expect("running");
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        unsafe { libc::waitpid(pid, &raw mut status, 0) };
        assert!(sup.on_exit(pid, ExitStatus::Code(0)));
        assert!(sup.pid_of("t").is_none());
        let first = sup.next_deadline().expect("restart scheduled");
        assert!(first <= BACKOFF_START);
        assert!(!sup.on_exit(999_999, ExitStatus::Code(0)), "unknown pid is not ours");
        assert_eq!(sup.services[0].backoff, BACKOFF_START * 2);
    }
}

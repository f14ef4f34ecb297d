//! A software TPM 2.0 (swtpm) for an appliance booted in QEMU, so the appliance seals its master
//! key to a TPM as it would on a server that has one. The TPM's state (its seeds) lives in a
//! directory kept beside the appliance's disk: the sealed key opens only with that state.

use crate::err;
use crate::error::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// swtpm creates its control socket within milliseconds; this is a generous bound.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

pub struct SoftTpm {
    child: Child,
    /// QEMU's `tpm-emulator` backend connects to it (`start`), or TPM commands go to it
    /// (`start_command_server`).
    pub socket: PathBuf,
}

/// Installs swtpm when it is missing.
pub fn ensure_installed() -> Result<()> {
    crate::host::ensure(&[crate::host::tool("swtpm", "swtpm")])
}

impl SoftTpm {
    /// Starts swtpm for QEMU with its state in `state_dir` (created; a new TPM when empty), its
    /// control socket and log in `run_dir`. It ends when QEMU disconnects, or when this value is
    /// dropped.
    pub fn start(state_dir: &Path, run_dir: &Path) -> Result<SoftTpm> {
        let socket = run_dir.join("swtpm.sock");
        let mut cmd = Command::new("swtpm");
        cmd.args(["socket", "--tpm2", "--terminate"])
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", socket.display()));
        SoftTpm::spawn(cmd, state_dir, socket, &run_dir.join("swtpm.log"))
    }

    /// Starts swtpm serving TPM commands on `<run_dir>/<name>.sock` itself (no QEMU): how a test
    /// speaks to a TPM from the host, e.g. a copy of a machine's TPM state after the machine.
    pub fn start_command_server(state_dir: &Path, run_dir: &Path, name: &str) -> Result<SoftTpm> {
        let socket = run_dir.join(format!("{name}.sock"));
        let ctrl = run_dir.join(format!("{name}.ctrl"));
        let _ = std::fs::remove_file(&ctrl);
        let mut cmd = Command::new("swtpm");
        cmd.args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
            .arg("--server")
            .arg(format!("type=unixio,path={}", socket.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", ctrl.display()));
        SoftTpm::spawn(cmd, state_dir, socket, &run_dir.join(format!("{name}.log")))
    }

    fn spawn(mut cmd: Command, state_dir: &Path, socket: PathBuf, log: &Path) -> Result<SoftTpm> {
        std::fs::create_dir_all(state_dir).ctx(|| format!("create {}", state_dir.display()))?;
        let _ = std::fs::remove_file(&socket);
        let child = cmd
            .arg("--tpmstate")
            .arg(format!("dir={}", state_dir.display()))
            .arg("--log")
            .arg(format!("file={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ctx(|| "start swtpm (Debian package swtpm)".into())?;
        let mut tpm = SoftTpm { child, socket };
        let started = Instant::now();
        while !tpm.socket.exists() {
            if let Ok(Some(status)) = tpm.child.try_wait() {
                return Err(err!("swtpm exited with {status} before creating its socket; see {}", log.display()));
            }
            if started.elapsed() > SOCKET_WAIT {
                return Err(err!("swtpm did not create {} within {SOCKET_WAIT:?}", tpm.socket.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(tpm)
    }

    /// QEMU's arguments for a TPM 2.0 (TIS interface) backed by this swtpm.
    pub fn qemu_args(&self) -> Vec<String> {
        vec![
            "-chardev".into(),
            format!("socket,id=chrtpm,path={}", self.socket.display()),
            "-tpmdev".into(),
            "emulator,id=tpm0,chardev=chrtpm".into(),
            "-device".into(),
            "tpm-tis,tpmdev=tpm0".into(),
        ]
    }
}

impl Drop for SoftTpm {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: swtpm saves its state on the way out, and a later swtpm on the
        // same directory must find it.
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child, not reaped yet (waited for below).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

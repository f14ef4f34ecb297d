//! A real software TPM (swtpm) for tests, one process per state directory, spoken to over its
//! command socket. Without swtpm on PATH a test skips, unless OC_REQUIRE_SWTPM=1 (CI) makes
//! that a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use appliance::master_key::tpm::{SocketTransport, Tpm};

/// Whether swtpm can run here; says why a test skips.
pub fn available() -> bool {
    let found = Command::new("swtpm").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        assert!(
            std::env::var("OC_REQUIRE_SWTPM").as_deref() != Ok("1"),
            "OC_REQUIRE_SWTPM=1 but swtpm is not on PATH: install swtpm (Debian package swtpm)"
        );
        println!("skipped: swtpm is not on PATH (install the Debian package swtpm to run this test)");
    }
    found
}

/// One swtpm process over a state directory; stopped (SIGTERM, then waited for) on drop.
pub struct Swtpm {
    child: Child,
    pub socket: PathBuf,
}

impl Swtpm {
    pub fn start(state: &Path) -> Swtpm {
        std::fs::create_dir_all(state).expect("mkdir tpm state");
        let socket = state.join("tpm.sock");
        let ctrl = state.join("ctrl.sock");
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&ctrl);
        let child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=unixio,path={}", socket.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", ctrl.display()))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .stdout(Stdio::null())
            // It notes every client disconnect on stderr; kept out of the test output.
            .stderr(std::fs::File::create(state.join("swtpm.log")).expect("log file"))
            .spawn()
            .expect("spawn swtpm");
        let mut swtpm = Swtpm { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !swtpm.socket.exists() {
            if let Ok(Some(status)) = swtpm.child.try_wait() {
                let log = std::fs::read_to_string(state.join("swtpm.log")).unwrap_or_default();
                panic!("swtpm exited at start: {status}\n{log}");
            }
            assert!(Instant::now() < deadline, "swtpm socket did not appear");
            std::thread::sleep(Duration::from_millis(10));
        }
        swtpm
    }

    pub fn tpm(&self) -> Tpm<SocketTransport> {
        Tpm::new(SocketTransport::connect(&self.socket).expect("connect swtpm"))
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        // SIGTERM lets swtpm save its state; a restart on the same directory relies on it.
        // SAFETY: kill(2) with our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

//! A real software TPM (swtpm) for tests, one process per state directory, spoken to over its
//! command socket. Without swtpm on PATH a test skips, unless OC_REQUIRE_SWTPM=1 (CI) makes
//! that a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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

/// One swtpm process over a state directory, serving TPM commands on a socket in it; stopped
/// (SIGTERM, so it saves its state) on drop.
pub struct Swtpm {
    _process: image::swtpm::SoftTpm,
    pub socket: PathBuf,
}

impl Swtpm {
    pub fn start(state: &Path) -> Swtpm {
        let process = image::swtpm::SoftTpm::start_command_server(state, state, "tpm").expect("start swtpm");
        Swtpm { socket: process.socket.clone(), _process: process }
    }

    pub fn tpm(&self) -> Tpm<SocketTransport> {
        Tpm::new(SocketTransport::connect(&self.socket).expect("connect swtpm"))
    }
}

//! Host tools: find them, install the missing ones with apt-get (saying so), and run commands
//! with their output captured for error messages.

use crate::err;
use crate::error::Result;
use std::path::Path;
use std::process::{Command, Stdio};

/// A command the pipeline needs and the Debian package that provides it.
pub struct Tool {
    pub command: &'static str,
    pub package: &'static str,
}

pub const fn tool(command: &'static str, package: &'static str) -> Tool {
    Tool { command, package }
}

pub fn have(command: &str) -> bool {
    if command.contains('/') {
        return Path::new(command).exists();
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path.split(':').chain(["/usr/sbin", "/sbin"]).any(|dir| Path::new(dir).join(command).is_file());
    found
}

/// Installs the packages for every missing tool in one apt-get call.
pub fn ensure(tools: &[Tool]) -> Result<()> {
    let mut missing: Vec<&str> = tools.iter().filter(|t| !have(t.command)).map(|t| t.package).collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

/// Installs Debian packages that are not installed yet (for libraries, which have no command).
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !package_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_install(packages: &[&str]) -> Result<()> {
    eprintln!("[image] installing missing host packages with apt-get: {}", packages.join(" "));
    let is_root = std::env::var("USER").is_ok_and(|u| u == "root") || uid_is_root();
    if !is_root {
        return Err(err!(
            "missing host packages: {}. Install them with: sudo apt-get install {}",
            packages.join(" "),
            packages.join(" ")
        ));
    }
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends", "--allow-downgrades"])
        .args(pin_qemu_release(packages));
    if run_quiet(&mut install).is_err() {
        // The package lists may be missing or stale on a fresh machine.
        run_quiet(Command::new("apt-get").args(["update", "-qq"]))?;
        run_quiet(&mut install)?;
    }
    Ok(())
}

/// QEMU's packages must all come from one release: some machines carry a newer `qemu-utils`
/// (a backport installed without its repository), which makes apt refuse the distribution's
/// `qemu-system-x86` ("held broken packages"). So every QEMU package, and `qemu-utils` when it is
/// installed, is asked for from the running distribution's release (`pkg/<codename>`); apt may
/// then replace the odd `qemu-utils` with the release's own.
fn pin_qemu_release(packages: &[&str]) -> Vec<String> {
    let codename = distribution_codename();
    let mut args: Vec<String> = packages
        .iter()
        .map(|p| match &codename {
            Some(release) if p.starts_with("qemu-") => format!("{p}/{release}"),
            _ => (*p).to_string(),
        })
        .collect();
    let wants_qemu = packages.iter().any(|p| p.starts_with("qemu-"));
    if let (Some(release), true) = (&codename, wants_qemu) {
        if !packages.contains(&"qemu-utils") && package_installed("qemu-utils") {
            args.push(format!("qemu-utils/{release}"));
        }
    }
    args
}

/// `VERSION_CODENAME` from /etc/os-release (e.g. `bookworm`).
fn distribution_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

fn uid_is_root() -> bool {
    // SAFETY: getuid has no arguments and cannot fail.
    unsafe { libc::getuid() == 0 }
}

/// Runs a command, returning stdout; on failure the error carries the command and the end of
/// its stdout and stderr (some tools, xfs_repair among them, report problems on stdout).
pub fn run_quiet(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let output = cmd.stdin(Stdio::null()).output().map_err(|e| err!("cannot run {shown}: {e}"))?;
    if !output.status.success() {
        let tail = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(bytes);
            let lines: Vec<&str> = text.lines().rev().take(20).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        return Err(err!("{shown} failed ({}):\n{}{}", output.status, tail(&output.stdout), tail(&output.stderr)));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

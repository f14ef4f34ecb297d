//! The sandbox guest kernel: built from Debian's `linux-source-6.1` with the configuration
//! fragment kept in `image/guest-kernel.config` (everything built in, tuned for fast nested
//! boots). `make allnoconfig KCONFIG_ALLCONFIG=<fragment>` starts from nothing, so the fragment
//! is the whole configuration; every option it sets is verified in the result.

use crate::cache::{self, Entry};
use crate::debian;
use crate::err;
use crate::error::{Context, Result};
use crate::host::{self, run_quiet, tool};
use crate::progress::{fmt_duration, Outcome, Step};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// Bump when the build commands below change in a way that changes the output.
const RECIPE: &[u8] = b"allnoconfig+fragment, make bzImage, keep stripped vmlinux, fixed build identity, v3";

pub struct GuestKernel {
    pub bzimage: PathBuf,
    /// The uncompressed ELF kernel without symbols: our VMM jumps straight to its 64-bit
    /// entry, skipping the in-guest decompression that costs a nested guest dearly.
    pub vmlinux: PathBuf,
    pub config: PathBuf,
    pub source_version: String,
}

pub fn fragment_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-kernel.config")
}

pub fn build() -> Result<GuestKernel> {
    let step = Step::start("guest kernel");
    let fragment_file = fragment_path();
    let fragment = std::fs::read_to_string(&fragment_file).ctx(|| format!("read {}", fragment_file.display()))?;
    let version = debian::candidate_version(SOURCE_PACKAGE)?;
    let key = cache::key(&[("source", version.as_bytes()), ("fragment", fragment.as_bytes()), ("recipe", RECIPE)]);
    let entry = Entry::new("guest-kernel", &key);
    let outcome = if entry.is_complete() {
        Outcome::Cached
    } else {
        host::ensure(&[
            tool("make", "make"),
            tool("gcc", "gcc"),
            tool("flex", "flex"),
            tool("bison", "bison"),
            tool("bc", "bc"),
            tool("xz", "xz-utils"),
            tool("perl", "perl"),
            tool("objcopy", "binutils"),
        ])?;
        host::ensure_packages(&["libelf-dev", "libssl-dev"])?;
        let source = unpacked_source(&version, &step)?;
        entry.fill(|dir| compile(&source, &fragment_file, &fragment, dir, &step))?;
        Outcome::Built
    };
    let kernel = GuestKernel {
        bzimage: entry.path("bzImage"),
        vmlinux: entry.path("vmlinux"),
        config: entry.path("config"),
        source_version: version,
    };
    let size = std::fs::metadata(&kernel.bzimage).map_or(0, |m| m.len());
    step.finish(
        outcome,
        &format!("linux-source {}, bzImage {}", kernel.source_version, crate::progress::fmt_size(size)),
    );
    Ok(kernel)
}

/// The unpacked kernel source, cached by package version (unpacking takes a minute).
fn unpacked_source(version: &str, step: &Step) -> Result<PathBuf> {
    let entry = Entry::new("linux-source", &cache::key(&[("version", version.as_bytes())]));
    if !entry.is_complete() {
        step.note(&format!("downloading and unpacking {SOURCE_PACKAGE} {version}"));
        entry.fill(|dir| {
            let deb = debian::download(SOURCE_PACKAGE, version, &dir.join("deb"))?;
            debian::unpack(&deb, &dir.join("deb/tree"))?;
            let tarball = find_tarball(&dir.join("deb/tree/usr/src"))?;
            run_quiet(Command::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(dir))?;
            std::fs::remove_dir_all(dir.join("deb")).ctx(|| "remove unpacked .deb".into())
        })?;
    }
    let tree = std::fs::read_dir(&entry.dir)
        .ctx(|| format!("list {}", entry.dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("Makefile").exists())
        .ok_or_else(|| err!("no kernel source tree in {}", entry.dir.display()))?;
    Ok(tree)
}

fn find_tarball(dir: &Path) -> Result<PathBuf> {
    std::fs::read_dir(dir)
        .ctx(|| format!("list {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".tar.xz"))
        .ok_or_else(|| err!("no .tar.xz in {}", dir.display()))
}

fn compile(source: &Path, fragment_file: &Path, fragment: &str, out: &Path, step: &Step) -> Result<()> {
    let build = out.join("build");
    std::fs::create_dir_all(&build).ctx(|| format!("create {}", build.display()))?;
    let log = out.join("build.log");
    let jobs = std::thread::available_parallelism().map_or(2, std::num::NonZero::get).to_string();
    let make = |args: &[&str]| -> Command {
        let mut cmd = Command::new("make");
        cmd.arg("-C").arg(source).arg(format!("O={}", build.display())).arg("ARCH=x86_64").args(args);
        // The version string (`uname -v`, the boot banner) would carry the build's clock, user
        // and host name; fixed, two builds of the same inputs give the same kernel.
        cmd.env("KBUILD_BUILD_TIMESTAMP", "Sat Jan  1 00:00:00 UTC 2000")
            .env("KBUILD_BUILD_USER", "opencomputer")
            .env("KBUILD_BUILD_HOST", "opencomputer")
            .env("KBUILD_BUILD_VERSION", "1");
        cmd
    };
    let mut configure = make(&["allnoconfig"]);
    configure.arg(format!("KCONFIG_ALLCONFIG={}", fragment_file.display()));
    run_logged(&mut configure, &log, step)?;
    let config = std::fs::read_to_string(build.join(".config")).ctx(|| "read generated .config".into())?;
    verify_fragment(fragment, &config)?;
    step.note(&format!("configured; compiling with {jobs} jobs (log: {})", log.display()));
    run_logged(&mut make(&["-j", &jobs, "bzImage"]), &log, step)?;
    std::fs::copy(build.join("arch/x86/boot/bzImage"), out.join("bzImage")).ctx(|| "copy bzImage".into())?;
    // The same stripping the kernel's own build applies before compressing (vmlinux.bin):
    // symbols and .comment go, the program headers and the PVH note stay.
    run_logged(
        Command::new("objcopy").args(["-R", ".comment", "-S"]).arg(build.join("vmlinux")).arg(out.join("vmlinux")),
        &log,
        step,
    )?;
    std::fs::copy(build.join(".config"), out.join("config")).ctx(|| "copy .config".into())?;
    std::fs::remove_dir_all(&build).ctx(|| "remove build dir".into())?;
    Ok(())
}

/// Runs a long command with its output appended to `log`, printing a heartbeat every minute.
fn run_logged(cmd: &mut Command, log: &Path, step: &Step) -> Result<()> {
    let file =
        std::fs::OpenOptions::new().create(true).append(true).open(log).ctx(|| format!("open {}", log.display()))?;
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().ctx(|| "dup log".into())?)
        .stderr(file)
        .spawn()
        .ctx(|| format!("start {shown}"))?;
    let started = Instant::now();
    let mut next_note = Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().ctx(|| format!("wait for {shown}"))? {
            if status.success() {
                return Ok(());
            }
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(err!("{shown} failed ({status}); end of {}:\n{}", log.display(), tail.join("\n")));
        }
        if started.elapsed() >= next_note {
            step.note(&format!("still running, {} so far", fmt_duration(started.elapsed())));
            next_note += Duration::from_secs(60);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every `CONFIG_X=v` of the fragment must appear verbatim in the result, and every
/// `# CONFIG_X is not set` must not be enabled: Kconfig silently drops options whose
/// dependencies are missing, and a dropped option is a kernel that does not boot.
pub fn verify_fragment(fragment: &str, config: &str) -> Result<()> {
    let mut problems = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if config.lines().any(|l| l == format!("{name}=y") || l == format!("{name}=m")) {
                    problems.push(format!("{name} should be off but is enabled"));
                }
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.starts_with("CONFIG_") || !line.contains('=') {
            problems.push(format!("not a config line: {line:?}"));
        } else if !config.lines().any(|l| l == line) {
            let name = line.split('=').next().unwrap_or(line);
            let actual = config.lines().find(|l| l.starts_with(&format!("{name}="))).unwrap_or("(unset)");
            problems.push(format!("{line} requested, got {actual}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(err!("guest kernel configuration does not match image/guest-kernel.config:\n  {}", problems.join("\n  ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_options_must_survive_kconfig() {
        let config = "CONFIG_A=y\nCONFIG_B=\"text\"\n# CONFIG_C is not set\nCONFIG_D=y\n";
        assert!(verify_fragment("# comment\nCONFIG_A=y\nCONFIG_B=\"text\"\n# CONFIG_C is not set\n", config).is_ok());
        let dropped = verify_fragment("CONFIG_C=y\n", config).unwrap_err();
        assert!(dropped.0.contains("CONFIG_C=y requested, got (unset)"));
        let enabled = verify_fragment("# CONFIG_D is not set\n", config).unwrap_err();
        assert!(enabled.0.contains("CONFIG_D should be off"));
        assert!(verify_fragment("garbage\n", config).is_err());
    }
}

//! Sandbox templates: root filesystems built from Debian packages with mmdebstrap, with our
//! sandbox init and agent installed, packed as ext4 disk images that the appliance clones
//! copy-on-write for each sandbox.

use crate::cache::{self, Entry};
use crate::error::{Context, Result};
use crate::ext4;
use crate::host::{self, run_quiet, tool};
use crate::progress::{fmt_size, Outcome, Step};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `base` template (alias `default`).
pub const BASE_PACKAGES: &[&str] = &["bash", "coreutils", "curl", "ca-certificates", "python3", "git", "procps"];
pub const SUITE: &str = "bookworm";
/// Where the sandbox PID 1 lives inside every template.
pub const SANDBOX_INIT_PATH: &str = "/sbin/oc-init";
/// Size of the template disk (sparse): what a sandbox can grow its root filesystem to.
const DISK_SIZE: &str = "2G";
/// Fixed filesystem identity, so the same inputs give the same image.
const FS_UUID: &str = "5a1db0c5-0c0c-4e1e-9b2a-0a7c0ffee000";
const HASH_SEED: &str = "0c0ffee0-5a1d-4b0c-8e3a-5eed00000000";
const CA_BUNDLE_FILE: &str = "ca-certificates.crt";
/// Files mmdebstrap copies from the build host (or leaves out) that a sandbox gets its own
/// version of: a sandbox resolves no names itself (its traffic goes through the appliance's
/// proxy, which resolves them), its hostname comes from its kernel command line, and
/// `localhost` must resolve without a DNS server.
const SANDBOX_FILES: &[(&str, &str)] = &[
    ("etc/resolv.conf", "# Names are resolved by the appliance's proxy (HTTPS_PROXY), not here.\n"),
    ("etc/hostname", "sandbox\n"),
    ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
];

pub struct Template {
    pub name: &'static str,
    pub disk: PathBuf,
    /// What the disk was built from (a cache key): changes whenever its content may change.
    pub id: String,
    /// The distribution's bundle of public CA roots, which the appliance's proxy trusts upstream.
    pub ca_bundle: PathBuf,
    /// The root filesystem archive the disk was made from (for the manifest's package list).
    pub rootfs_tar: PathBuf,
}

impl Template {
    /// (package, version) of every package installed in the template, from its dpkg status.
    pub fn installed_packages(&self) -> Result<Vec<(String, String)>> {
        let status = run_quiet(Command::new("tar").arg("-xOf").arg(&self.rootfs_tar).arg("./var/lib/dpkg/status"))?;
        Ok(parse_dpkg_status(&status))
    }
}

/// Installed (package, version) pairs from a dpkg status file, sorted by name.
pub fn parse_dpkg_status(status: &str) -> Vec<(String, String)> {
    let mut packages = Vec::new();
    for stanza in status.split("\n\n") {
        let field = |name: &str| stanza.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string());
        let installed = field("Status:").is_some_and(|s| s.ends_with(" installed"));
        if let (true, Some(package), Some(version)) = (installed, field("Package:"), field("Version:")) {
            packages.push((package, version));
        }
    }
    packages.sort();
    packages
}

/// Builds (or takes from the cache) the `base` template with `sandbox_init` installed.
pub fn build_base(sandbox_init: &Path) -> Result<Template> {
    let step = Step::start("template base");
    host::ensure(&[tool("mmdebstrap", "mmdebstrap"), tool("mkfs.ext4", "e2fsprogs")])?;
    let packages = BASE_PACKAGES.join(",");
    let rootfs_key = cache::key(&[
        ("suite", SUITE.as_bytes()),
        ("packages", packages.as_bytes()),
        ("recipe", b"minbase, SOURCE_DATE_EPOCH, v2"),
    ]);
    let rootfs = Entry::new("rootfs-base", &rootfs_key);
    let mut outcome = Outcome::Cached;
    if !rootfs.is_complete() {
        step.note(&format!("mmdebstrap {SUITE} with {packages} (a few minutes)"));
        rootfs.fill(|dir| {
            run_quiet(
                Command::new("mmdebstrap")
                    .args(["--variant=minbase", "--quiet", "--mode=root", &format!("--include={packages}"), SUITE])
                    .arg(dir.join("rootfs.tar"))
                    // Reproducible output: fixed file times, no logs or caches that record the
                    // run, and Python byte code checked by the source's hash instead of its time.
                    .env("SOURCE_DATE_EPOCH", crate::SOURCE_DATE_EPOCH.to_string()),
            )
            .map(|_| ())
        })?;
        outcome = Outcome::Built;
    }
    let init_bytes = std::fs::read(sandbox_init).ctx(|| format!("read {}", sandbox_init.display()))?;
    let disk_key = cache::key(&[
        ("rootfs", rootfs_key.as_bytes()),
        ("init", &init_bytes),
        ("size", DISK_SIZE.as_bytes()),
        ("recipe", b"ext4 v4"),
    ]);
    let disk = Entry::new("template-base", &disk_key);
    if !disk.is_complete() {
        disk.fill(|dir| pack(&rootfs.path("rootfs.tar"), sandbox_init, dir))?;
        outcome = Outcome::Built;
    }
    let template = Template {
        name: "base",
        disk: disk.path("base.ext4"),
        id: disk_key,
        ca_bundle: disk.path(CA_BUNDLE_FILE),
        rootfs_tar: rootfs.path("rootfs.tar"),
    };
    let used = std::fs::metadata(rootfs.path("rootfs.tar")).map_or(0, |m| m.len());
    step.finish(outcome, &format!("{} of files in a {DISK_SIZE} sparse ext4 disk", fmt_size(used)));
    Ok(template)
}

/// Unpacks the root filesystem, installs the sandbox init, makes the ext4 image and keeps a
/// copy of the CA roots bundle beside it.
fn pack(rootfs_tar: &Path, sandbox_init: &Path, dir: &Path) -> Result<()> {
    let out = dir.join("base.ext4");
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging).ctx(|| format!("create {}", staging.display()))?;
    run_quiet(Command::new("tar").arg("-xpf").arg(rootfs_tar).arg("-C").arg(&staging).arg("--numeric-owner"))?;
    // What the root filesystem brought keeps its times (Python's caches record them); what is
    // written below gets the newest of them, not the build's clock.
    let newest = ext4::newest_mtime(&staging)?;
    for (path, content) in SANDBOX_FILES {
        let target = staging.join(path);
        // resolv.conf may be a symlink into the build host's resolver; replace, not follow.
        let _ = std::fs::remove_file(&target);
        std::fs::write(&target, content).ctx(|| format!("write {}", target.display()))?;
    }
    let init_target = staging.join(SANDBOX_INIT_PATH.trim_start_matches('/'));
    std::fs::copy(sandbox_init, &init_target).ctx(|| format!("install {}", init_target.display()))?;
    run_quiet(Command::new("chmod").arg("0755").arg(&init_target))?;
    let roots = staging.join("etc/ssl/certs/ca-certificates.crt");
    std::fs::copy(&roots, dir.join(CA_BUNDLE_FILE)).ctx(|| format!("copy {}", roots.display()))?;
    let identity = ext4::Identity { label: "base", uuid: FS_UUID, hash_seed: HASH_SEED };
    ext4::from_dir(&staging, &out, DISK_SIZE, &identity, &[], newest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_gives_installed_packages_only() {
        let status = "Package: bash\nStatus: install ok installed\nVersion: 5.2.15-2+b2\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                      Package: apt\nStatus: install ok installed\nVersion: 2.6.1\n";
        assert_eq!(
            parse_dpkg_status(status),
            vec![("apt".to_string(), "2.6.1".to_string()), ("bash".to_string(), "5.2.15-2+b2".to_string())]
        );
    }
}

//! Sandbox templates: root filesystems built from Debian packages with mmdebstrap, packed as
//! ext4 disk images that the appliance clones copy-on-write for each sandbox. They hold no init
//! of ours: every sandbox boots our PID 1 and agent from the sandbox initramfs (sandbox_initrd),
//! so a template disk does not change when init does. The image ships `base`, `python` and
//! `node` (`TEMPLATES`); each root filesystem and each disk is a cache entry keyed by a hash of
//! its inputs.

use crate::cache::{self, Entry};
use crate::error::{Context, Result};
use crate::ext4;
use crate::host::{self, run_quiet, tool};
use crate::progress::{fmt_duration, fmt_size, Outcome, Step};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// What every template installs (the `base` template, alias `default`, is just this).
pub const BASE_PACKAGES: &[&str] = &["bash", "coreutils", "curl", "ca-certificates", "python3", "git", "procps"];
pub const SUITE: &str = "bookworm";
/// Size of a template disk (sparse): what a sandbox can grow its root filesystem to.
const DISK_SIZE: &str = "2G";

/// One sandbox template: its name (the API's `templateID`), the Debian packages it installs
/// beyond `BASE_PACKAGES`, and the fixed identity of its ext4 filesystem, so the same inputs
/// give the same disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TemplateSpec {
    pub name: &'static str,
    pub extra_packages: &'static [&'static str],
    pub fs_uuid: &'static str,
    pub hash_seed: &'static str,
}

/// Debian's minimal userland with bash, curl, git and Python.
pub const BASE: TemplateSpec = TemplateSpec {
    name: "base",
    extra_packages: &[],
    fs_uuid: "5a1db0c5-0c0c-4e1e-9b2a-0a7c0ffee000",
    hash_seed: "0c0ffee0-5a1d-4b0c-8e3a-5eed00000000",
};
/// `base` plus pip and venv (`python3 -m venv` needs python3-venv's ensurepip wheels).
pub const PYTHON: TemplateSpec = TemplateSpec {
    name: "python",
    extra_packages: &["python3-pip", "python3-venv"],
    fs_uuid: "5a1db0c5-0c0c-4e1e-9b2a-0a7c0ffee002",
    hash_seed: "0c0ffee0-5a1d-4b0c-8e3a-5eed00000002",
};
/// `base` plus Debian's Node.js and npm (npm brings node-gyp and with it gcc and make).
pub const NODE: TemplateSpec = TemplateSpec {
    name: "node",
    extra_packages: &["nodejs", "npm"],
    fs_uuid: "5a1db0c5-0c0c-4e1e-9b2a-0a7c0ffee003",
    hash_seed: "0c0ffee0-5a1d-4b0c-8e3a-5eed00000003",
};
/// Every template the image ships (the system disk's `...001` identity is taken).
pub const TEMPLATES: &[TemplateSpec] = &[BASE, PYTHON, NODE];

impl TemplateSpec {
    /// Everything mmdebstrap installs beyond minbase, as its `--include=` takes it.
    pub fn packages(&self) -> String {
        let all: Vec<&str> = BASE_PACKAGES.iter().chain(self.extra_packages).copied().collect();
        all.join(",")
    }

    /// The disk's file name in its cache entry (the system disk names it the same).
    fn disk_file(&self) -> String {
        format!("{}.ext4", self.name)
    }

    /// The root filesystem's cache key: the Debian inputs only (for `base` the same key as
    /// before templates had specs, so a warm cache keeps its root filesystem).
    pub fn rootfs_key(&self) -> String {
        cache::key(&[
            ("suite", SUITE.as_bytes()),
            ("packages", self.packages().as_bytes()),
            ("recipe", b"minbase, SOURCE_DATE_EPOCH, v2"),
        ])
    }

    /// The disk's cache key, which is also the template's id on the system disk: the root
    /// filesystem, the disk size and the filesystem identity (no init: the sandbox initramfs
    /// brings it).
    pub fn disk_key(&self, rootfs_key: &str) -> String {
        cache::key(&[
            ("rootfs", rootfs_key.as_bytes()),
            ("size", DISK_SIZE.as_bytes()),
            ("name", self.name.as_bytes()),
            ("uuid", self.fs_uuid.as_bytes()),
            ("hash seed", self.hash_seed.as_bytes()),
            ("recipe", b"ext4 v5 (no init)"),
        ])
    }
}

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

/// Builds (or takes from the cache) every template of `TEMPLATES`, in that order (`base` first).
pub fn build_all() -> Result<Vec<Template>> {
    host::ensure(&[tool("mmdebstrap", "mmdebstrap"), tool("mkfs.ext4", "e2fsprogs")])?;
    TEMPLATES.iter().map(build).collect()
}

/// Builds (or takes from the cache) one template: its root filesystem (mmdebstrap), then its
/// ext4 disk.
fn build(spec: &TemplateSpec) -> Result<Template> {
    let step = Step::start(format!("template {}", spec.name));
    let packages = spec.packages();
    let rootfs_key = spec.rootfs_key();
    let rootfs = Entry::new(&format!("rootfs-{}", spec.name), &rootfs_key);
    let mut done = Vec::new();
    if !rootfs.is_complete() {
        step.note(&format!("mmdebstrap {SUITE} with {packages} (a few minutes)"));
        let started = Instant::now();
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
        done.push(format!("mmdebstrap {}", fmt_duration(started.elapsed())));
    }
    let disk_key = spec.disk_key(&rootfs_key);
    let disk = Entry::new(&format!("template-{}", spec.name), &disk_key);
    if !disk.is_complete() {
        step.note("packing the ext4 disk");
        let started = Instant::now();
        disk.fill(|dir| pack(spec, &rootfs.path("rootfs.tar"), dir))?;
        done.push(format!("ext4 {}", fmt_duration(started.elapsed())));
    }
    let template = Template {
        name: spec.name,
        disk: disk.path(&spec.disk_file()),
        id: disk_key,
        ca_bundle: disk.path(CA_BUNDLE_FILE),
        rootfs_tar: rootfs.path("rootfs.tar"),
    };
    let files = std::fs::metadata(&template.rootfs_tar).map_or(0, |m| m.len());
    let allocated = std::fs::metadata(&template.disk).map_or(0, |m| m.blocks() * 512);
    let outcome = if done.is_empty() { Outcome::Cached } else { Outcome::Built };
    let timings = if done.is_empty() { String::new() } else { format!(" ({})", done.join(", ")) };
    step.finish(
        outcome,
        &format!(
            "{} of files, {} allocated in a {DISK_SIZE} sparse ext4 disk{timings}",
            fmt_size(files),
            fmt_size(allocated)
        ),
    );
    Ok(template)
}

/// Unpacks the root filesystem, writes the sandbox's own name files, makes the ext4 image and
/// keeps a copy of the CA roots bundle beside it.
fn pack(spec: &TemplateSpec, rootfs_tar: &Path, dir: &Path) -> Result<()> {
    let out = dir.join(spec.disk_file());
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
    let roots = staging.join("etc/ssl/certs/ca-certificates.crt");
    std::fs::copy(&roots, dir.join(CA_BUNDLE_FILE)).ctx(|| format!("copy {}", roots.display()))?;
    let identity = ext4::Identity { label: spec.name, uuid: spec.fs_uuid, hash_seed: spec.hash_seed };
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

    #[test]
    fn the_image_ships_base_python_and_node_each_with_its_own_identity() {
        let names: Vec<&str> = TEMPLATES.iter().map(|t| t.name).collect();
        assert_eq!(names, ["base", "python", "node"], "base first: the CA bundle comes from it");
        assert_eq!(BASE.packages(), BASE_PACKAGES.join(","));
        assert!(PYTHON.packages().ends_with(",python3,git,procps,python3-pip,python3-venv"));
        assert!(NODE.packages().ends_with(",procps,nodejs,npm"));
        for (i, a) in TEMPLATES.iter().enumerate() {
            // The name is the disk's file name on the system disk and its ext4 label (<= 16 bytes).
            assert!(a.name.len() <= 16 && a.name.bytes().all(|b| b.is_ascii_lowercase()), "{}", a.name);
            assert!(a.packages().starts_with(&BASE_PACKAGES.join(",")), "{} extends base", a.name);
            for b in &TEMPLATES[i + 1..] {
                assert_ne!(a.name, b.name);
                assert_ne!(a.fs_uuid, b.fs_uuid, "{} and {}", a.name, b.name);
                assert_ne!(a.hash_seed, b.hash_seed, "{} and {}", a.name, b.name);
            }
            // The system disk has its own identity.
            assert!(!a.fs_uuid.ends_with("ffee001") && !a.hash_seed.ends_with("00000001"), "{}", a.name);
        }
    }

    #[test]
    fn cache_keys_differ_per_template_and_follow_their_inputs() {
        // base's root filesystem keeps the key it had before there were specs.
        let before = cache::key(&[
            ("suite", b"bookworm"),
            ("packages", b"bash,coreutils,curl,ca-certificates,python3,git,procps"),
            ("recipe", b"minbase, SOURCE_DATE_EPOCH, v2"),
        ]);
        assert_eq!(BASE.rootfs_key(), before);
        let rootfs: Vec<String> = TEMPLATES.iter().map(TemplateSpec::rootfs_key).collect();
        let disks: Vec<String> = TEMPLATES.iter().map(|t| t.disk_key(&t.rootfs_key())).collect();
        for keys in [&rootfs, &disks] {
            let mut unique = keys.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), TEMPLATES.len(), "{keys:?}");
        }
        // A disk's key (its id on the system disk) follows its root filesystem and its template,
        // even for one root filesystem; the sandbox init is not an input (the initramfs has it).
        assert_ne!(PYTHON.disk_key("r"), PYTHON.disk_key("other rootfs"));
        assert_ne!(PYTHON.disk_key("r"), NODE.disk_key("r"));
        assert_eq!(NODE.disk_key("r"), NODE.disk_key("r"));
    }
}

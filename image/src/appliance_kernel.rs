//! The appliance kernel: Debian's stock kernel (for real server hardware) and the modules the
//! appliance needs, resolved with their dependencies from depmod's output.

use crate::cache::{self, Entry};
use crate::debian;
use crate::err;
use crate::error::{Context, Result};
use crate::host::run_quiet;
use crate::modules::{self, ModuleIndex};
use crate::progress::{Outcome, Step};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the appliance loads at boot. Dependencies are not listed here: they are resolved.
pub const WANTED_MODULES: &[&str] = &[
    // KVM for the sandboxes (vendor modules fail harmlessly on the other vendor's CPUs).
    "kvm",
    "kvm_amd",
    "kvm_intel",
    // The host side of sandbox vsock.
    "vhost_vsock",
    // Virtual hardware when the appliance itself runs in a VM.
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "qemu_fw_cfg",
    // The data filesystem (XFS, for reflink clones of templates).
    "xfs",
    // The read-only system disk with the sandbox templates.
    "ext4",
    // The EFI system partition (FAT), where the operator's configuration file lives, with the
    // code pages its file names are decoded with (no modprobe to load them on demand).
    "vfat",
    "nls_cp437",
    "nls_ascii",
    // Common server NICs and disks.
    "e1000",
    "e1000e",
    "igb",
    "nvme",
    "ahci",
    "sd_mod",
    // The ACPI power button, read through evdev, for clean shutdowns.
    "button",
    "evdev",
];

pub struct ApplianceKernel {
    pub version: String,
    /// Debian package and version it came from.
    pub package: String,
    pub vmlinuz: PathBuf,
    /// Directory holding `lib/modules/<version>/...` for the selected modules.
    pub modules_root: PathBuf,
    /// Paths (as seen inside the image) in load order.
    pub load_order: Vec<String>,
}

pub fn build() -> Result<ApplianceKernel> {
    let step = Step::start("appliance kernel");
    let image_pkg = debian::metapackage_target("linux-image-amd64", "linux-image-")?;
    // The -unsigned package has the same kernel without the Secure Boot signature wrapper.
    let package = format!("{image_pkg}-unsigned");
    let version = debian::candidate_version(&package)?;
    let wanted = WANTED_MODULES.join(",");
    let key = cache::key(&[
        ("package", package.as_bytes()),
        ("version", version.as_bytes()),
        ("modules", wanted.as_bytes()),
        ("recipe", b"v1"),
    ]);
    let entry = Entry::new("appliance-kernel", &key);
    let outcome = if entry.is_complete() {
        Outcome::Cached
    } else {
        entry.fill(|dir| fill(dir, &package, &version, &step))?;
        Outcome::Built
    };
    let kver = std::fs::read_to_string(entry.path("kernel-version")).ctx(|| "read cached kernel version".into())?;
    let order = std::fs::read_to_string(entry.path("load-order")).ctx(|| "read cached module order".into())?;
    let kernel = ApplianceKernel {
        version: kver.trim().to_string(),
        package: format!("{package} {version}"),
        vmlinuz: entry.path("vmlinuz"),
        modules_root: entry.path("root"),
        load_order: order.lines().map(str::to_string).collect(),
    };
    step.finish(outcome, &format!("{package} {version}, {} modules", kernel.load_order.len()));
    Ok(kernel)
}

fn fill(dir: &Path, package: &str, version: &str, step: &Step) -> Result<()> {
    let scratch = dir.join("scratch");
    let deb = debian::download(package, version, &scratch)?;
    step.note("downloaded; unpacking");
    let tree = scratch.join("tree");
    debian::unpack(&deb, &tree)?;
    let kver = only_entry(&tree.join("lib/modules"))?;
    // The package ships no modules.dep: depmod generates it (that is what installing would do).
    run_quiet(Command::new("depmod").arg("-b").arg(&tree).arg(&kver))?;
    let mod_dir = tree.join("lib/modules").join(&kver);
    let read = |name: &str| std::fs::read_to_string(mod_dir.join(name)).ctx(|| format!("read {name}"));
    let index = ModuleIndex::parse(&read("modules.dep")?, &read("modules.softdep")?, &read("modules.alias")?)?;
    let builtin = modules::parse_builtin(&read("modules.builtin")?);
    let order = index.load_order(WANTED_MODULES, &builtin)?;

    let out_mod_dir = dir.join("root/lib/modules").join(&kver);
    let mut image_paths = Vec::new();
    for rel in &order {
        let source = mod_dir.join(rel);
        // Modules are stored uncompressed so PID 1 needs no decompressor.
        let target_rel = rel.trim_end_matches(".xz").trim_end_matches(".zst").to_string();
        let target = out_mod_dir.join(&target_rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).ctx(|| format!("create {}", parent.display()))?;
        }
        if Path::new(&rel).extension().is_some_and(|e| e == "ko") {
            std::fs::copy(&source, &target).ctx(|| format!("copy {}", source.display()))?;
        } else {
            return Err(err!("compressed module {rel}: this kernel package's format is not supported yet"));
        }
        image_paths.push(format!("/lib/modules/{kver}/{target_rel}"));
    }
    let vmlinuz = tree.join("boot").join(format!("vmlinuz-{kver}"));
    std::fs::copy(&vmlinuz, dir.join("vmlinuz")).ctx(|| format!("copy {}", vmlinuz.display()))?;
    std::fs::copy(tree.join("boot").join(format!("config-{kver}")), dir.join("config"))
        .ctx(|| "copy kernel config".into())?;
    std::fs::write(dir.join("kernel-version"), &kver).ctx(|| "write kernel version".into())?;
    std::fs::write(dir.join("load-order"), image_paths.join("\n") + "\n").ctx(|| "write load order".into())?;
    std::fs::remove_dir_all(&scratch).ctx(|| "remove scratch".into())?;
    Ok(())
}

fn only_entry(dir: &Path) -> Result<String> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .ctx(|| format!("list {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(err!("expected one kernel version in {}, found {names:?}", dir.display())),
    }
}

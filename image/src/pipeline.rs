//! The whole build: binaries, kernels, borrowed userland and the initramfs, for one image
//! variant. The test variant adds a probe service used only by the end-to-end tests; the bench
//! variant adds a benchmark runner and QEMU to compare our VMM against; the product variant
//! carries no test entry points.

use crate::appliance_kernel;
use crate::err;
use crate::error::{Context, Result};
use crate::guest_kernel;
use crate::host::{self, tool};
use crate::initramfs::Tree;
use crate::progress::{fmt_size, Outcome, Step};
use crate::system_disk;
use crate::template;
use crate::userland;
use crate::workspace;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Product,
    Test,
    Bench,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Product => "product",
            Variant::Test => "test",
            Variant::Bench => "bench",
        }
    }
}

/// Where QEMU (or firmware) finds what the build produced.
#[derive(Clone, Debug)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    /// Read-only disk with the sandbox templates (see system_disk).
    pub system_disk: PathBuf,
    /// What went in, for the disk image's manifest.
    pub inputs: BuildInputs,
    /// The version in its os-release.
    pub version: String,
}

#[derive(Clone, Debug)]
pub struct BuildInputs {
    pub variant: Variant,
    /// The appliance kernel's release (uname -r) and its Debian package and version.
    pub appliance_kernel: String,
    pub guest_kernel: String,
    pub templates: Vec<TemplateInfo>,
}

#[derive(Clone, Debug)]
pub struct TemplateInfo {
    pub name: String,
    pub id: String,
    pub packages: Vec<(String, String)>,
}

/// The name under which QEMU passes the admin API key (fw_cfg), read by the appliance service.
pub const ADMIN_KEY_FW_CFG: &str = "opt/opencomputer/admin-key";
/// The name under which QEMU passes the operator's proxy settings (read by the appliance).
pub const PROXY_CONFIG_FW_CFG: &str = "opt/opencomputer/proxy-config";
/// The name under which QEMU passes API TLS settings (the JSON of init_handoff::API_TLS_FILE);
/// `image run --plain-http` uses it to turn HTTPS off.
pub const API_TLS_FW_CFG: &str = "opt/opencomputer/api-tls";
/// Where init hands the appliance service its admin key, proxy settings and API TLS settings (a
/// tmpfs), taken from fw_cfg or the configuration file on the EFI partition
/// (init/src/appliance/operator.rs). The TLS file is absent unless the operator set TLS keys.
pub const ADMIN_KEY_RUN_FILE: &str = init_handoff::ADMIN_KEY_FILE;
pub const API_TLS_RUN_FILE: &str = init_handoff::API_TLS_FILE;
pub const UPGRADE_KEYS_RUN_FILE: &str = init_handoff::UPGRADE_KEYS_FILE;
pub const PROXY_CONFIG_RUN_FILE: &str = init_handoff::PROXY_CONFIG_FILE;
pub const API_PORT_IN_GUEST: u16 = init_handoff::API_PORT;
/// The API server's plain loopback listener inside the guest, which init health-checks.
pub const LOOPBACK_API_PORT_IN_GUEST: u16 = init_handoff::LOOPBACK_API_PORT;
/// The compressed guest kernel (bench variant only: QEMU boots it).
pub const GUEST_BZIMAGE_PATH: &str = "/usr/share/opencomputer/guest/bzImage";
/// The uncompressed ELF guest kernel: what the appliance hands our VMM (it boots faster).
pub const GUEST_KERNEL_PATH: &str = "/usr/share/opencomputer/guest/vmlinux";
/// The sandbox initramfs (sandbox_initrd): our sandbox PID 1, which every sandbox boots from
/// before it switches to its root disk, so no template needs (or can bring) its own.
pub const GUEST_INITRD_PATH: &str = "/usr/share/opencomputer/guest/initrd.cpio";
/// Public CA roots for the proxy's upstream connections (Debian's bundle, from the template).
pub const CA_ROOTS_PATH: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Where init mounts the system disk (read-only).
pub const SYSTEM_MOUNT: &str = "/system";

/// On the command line of the disk image's unified kernel image: tells init it booted from the
/// GPT boot disk (which then gets its data partition and its configuration file from there).
pub const DISK_BOOT_ARG: &str = "oc.boot=disk";

/// The version an image reports (os-release, `GET /api/system`): `OC_IMAGE_VERSION` if set,
/// else the workspace version. A rebuilt image for an upgrade gets its own.
pub fn image_version() -> String {
    std::env::var("OC_IMAGE_VERSION")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
}

pub fn build(variant: Variant) -> Result<Artifacts> {
    build_versioned(variant, &image_version())
}

/// The artifacts of `variant`, reporting `version` in their os-release.
pub fn build_versioned(variant: Variant, version: &str) -> Result<Artifacts> {
    let started = Instant::now();
    let step = Step::start("host tools");
    host::ensure(&[
        tool("zstd", "zstd"),
        tool("depmod", "kmod"),
        tool("dpkg-deb", "dpkg"),
        tool("mkfs.xfs", "xfsprogs"),
        tool("mke2fs", "e2fsprogs"),
        tool("ldd", "libc-bin"),
    ])?;
    step.finish(Outcome::Done, "");

    let kernel = appliance_kernel::build()?;
    let guest = guest_kernel::build()?;
    let mut bins: Vec<workspace::Bin> = vec![("init", "init"), ("appliance", "appliance"), ("vmm", "vmm")];
    match variant {
        Variant::Product => {}
        Variant::Test => bins.push(("qemu-test", "oc-probe")),
        Variant::Bench => bins.push(("qemu-test", "oc-bench")),
    }
    let built = workspace::build(&bins)?;
    let templates = template::build_all()?;
    let system_disk = system_disk::build(&templates)?;
    let out_dir = workspace::target_dir().join("image").join(variant.name());
    std::fs::create_dir_all(&out_dir).ctx(|| format!("create {}", out_dir.display()))?;
    let sandbox_initrd = sandbox_initrd(&built[0], &out_dir)?;

    // The image trusts upgrades signed by the key that signs it (see signing.rs).
    let signing_key = crate::signing::SigningKey::load()?;
    eprintln!("[image] signing key: {} ({})", signing_key.public_hex(), signing_key.source.display());

    let step = Step::start(format!("initramfs ({})", variant.name()));
    let mut tree = Tree::new();
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", "/data", "/root", "/etc", "/var"] {
        tree.dir(dir)?;
    }
    // The kernel opens /dev/console for PID 1 before anything is mounted.
    tree.char_device("/dev/console", 5, 1, 0o600)?;
    tree.host_file("/init", &built[0], 0o755)?;
    tree.host_file("/bin/appliance", &built[1], 0o755)?;
    tree.host_file("/bin/vmm", &built[2], 0o755)?;
    match variant {
        Variant::Product => {}
        Variant::Test => tree.host_file("/bin/oc-probe", &built[3], 0o755)?,
        Variant::Bench => {
            tree.host_file("/bin/oc-bench", &built[3], 0o755)?;
            add_comparison_qemu(&mut tree)?;
        }
    }
    tree.host_tree("/", &kernel.modules_root)?;
    tree.bytes("/lib/modules/load-order", kernel.load_order.join("\n") + "\n", 0o644)?;
    tree.host_file(GUEST_KERNEL_PATH, &guest.vmlinux, 0o644)?;
    tree.host_file(GUEST_INITRD_PATH, &sandbox_initrd, 0o644)?;
    if variant == Variant::Bench {
        // QEMU's -kernel takes the compressed kernel; the benchmark boots both forms.
        tree.host_file(GUEST_BZIMAGE_PATH, &guest.bzimage, 0o644)?;
    }
    for (program, image_path) in HOST_PROGRAMS {
        for (source, image_path) in userland::with_libraries(&which(program)?, image_path)? {
            tree.host_file(&image_path, &source, 0o755)?;
        }
    }
    tree.bytes("/etc/opencomputer/services", services_file(variant), 0o644)?;
    let trusted = format!(
        "# Ed25519 public keys whose signatures this image accepts on upgrade images (hex)\n{}\n",
        signing_key.public_hex()
    );
    tree.bytes(crate::signing::TRUSTED_KEYS_PATH, trusted, 0o644)?;
    // Debian's CA bundle is the same in every template; base's is taken.
    let base = templates.iter().find(|t| t.name == template::BASE.name).ok_or_else(|| err!("no base template"))?;
    tree.host_file(CA_ROOTS_PATH, &base.ca_bundle, 0o644)?;
    tree.dir(SYSTEM_MOUNT)?;
    tree.bytes("/etc/hostname", "opencomputer\n", 0o644)?;
    tree.bytes("/etc/os-release", crate::uki::os_release(version), 0o644)?;
    tree.bytes("/etc/passwd", "root:x:0:0:root:/root:/bin/false\n", 0o644)?;
    tree.bytes("/etc/group", "root:x:0:\n", 0o644)?;

    let initramfs = out_dir.join("initramfs.cpio.zst");
    let (raw, compressed) = tree.write_compressed(&initramfs)?;
    let vmlinuz = out_dir.join("vmlinuz");
    std::fs::copy(&kernel.vmlinuz, &vmlinuz).ctx(|| format!("copy kernel to {}", vmlinuz.display()))?;
    step.finish(
        Outcome::Built,
        &format!("{} ({} uncompressed) at {}", fmt_size(compressed), fmt_size(raw), initramfs.display()),
    );

    eprintln!(
        "[image] build finished in {} (kernel {})",
        crate::progress::fmt_duration(started.elapsed()),
        kernel.version
    );
    let inputs = BuildInputs {
        variant,
        appliance_kernel: format!("{} ({})", kernel.version, kernel.package),
        guest_kernel: format!("linux-source {} with image/guest-kernel.config", guest.source_version),
        templates: templates
            .iter()
            .map(|t| Ok(TemplateInfo { name: t.name.to_string(), id: t.id.clone(), packages: t.installed_packages()? }))
            .collect::<Result<_>>()?,
    };
    Ok(Artifacts {
        kernel: vmlinuz,
        initramfs,
        cmdline: kernel_cmdline(),
        system_disk,
        inputs,
        version: version.to_string(),
    })
}

/// Host programs the appliance runs, carried with their shared libraries: mkfs.xfs formats a
/// blank data disk; xfs_growfs grows it after the data partition grew; mke2fs makes template
/// disks from imported archives (`-t ext4 -d DIR FILE SIZE`). The image has no /etc/mke2fs.conf:
/// mke2fs then uses its built-in profile, which makes the same ext4 as Debian's file (checked
/// inside the test image by its probe, qemu-test/src/bin/oc-probe.rs).
const HOST_PROGRAMS: [(&str, &str); 3] =
    [("mkfs.xfs", "/sbin/mkfs.xfs"), ("xfs_growfs", "/sbin/xfs_growfs"), ("mke2fs", "/sbin/mke2fs")];

/// Writes the sandbox initramfs (sandbox_initrd) for the `init` binary into `out_dir`.
fn sandbox_initrd(init: &std::path::Path, out_dir: &std::path::Path) -> Result<PathBuf> {
    let step = Step::start("sandbox initramfs");
    let path = out_dir.join("sandbox-initrd.cpio");
    let size = crate::sandbox_initrd::write(init, &path)?;
    step.finish(Outcome::Built, &format!("{} (uncompressed) at {}", fmt_size(size), path.display()));
    Ok(path)
}

fn kernel_cmdline() -> String {
    // panic=10: a kernel panic reboots instead of hanging the appliance. No oc.* settings: on
    // the kernel command line they would override the operator's opencomputer.conf.
    "console=ttyS0,115200 panic=10".to_string()
}

fn services_file(variant: Variant) -> String {
    const TRUSTED_KEYS: &str = crate::signing::TRUSTED_KEYS_PATH;
    let mut text = String::from("# name program args... (started in order, stopped in reverse)\n");
    text.push_str(&format!(
        "appliance /bin/appliance serve --listen 0.0.0.0:{API_PORT_IN_GUEST} \
         --loopback-listen 127.0.0.1:{LOOPBACK_API_PORT_IN_GUEST} --data-dir /data --vmm-bin /bin/vmm \
         --admin-key-file {ADMIN_KEY_RUN_FILE} --proxy-config {PROXY_CONFIG_RUN_FILE} \
         --tls-settings {API_TLS_RUN_FILE} --upgrade-keys {TRUSTED_KEYS} --upgrade-keys-extra {UPGRADE_KEYS_RUN_FILE} \
         --guest-kernel {GUEST_KERNEL_PATH} --guest-initrd {GUEST_INITRD_PATH} --templates-dir {SYSTEM_MOUNT}/templates \
         --ca-roots {CA_ROOTS_PATH} --master-key-store auto \
         --power-control --require-data-mount\n"
    ));
    match variant {
        Variant::Product => {}
        Variant::Test => text.push_str("probe /bin/oc-probe\n"),
        // Idle unless the kernel command line asks for a benchmark (oc.bench=vmm).
        Variant::Bench => text.push_str("bench /bin/oc-bench\n"),
    }
    text
}

/// Where the bench variant keeps QEMU, the general-purpose VMM `qemu-test bench vmm` compares ours with.
pub const COMPARISON_QEMU_PATH: &str = "/usr/bin/qemu-system-x86_64";
/// Firmware `-M microvm` loads: qboot (named bios-microvm.bin by QEMU) and the option ROM that
/// boots a `-kernel` image. QEMU looks for them in ../share/qemu beside its binary.
const COMPARISON_QEMU_FIRMWARE: &[(&str, &str)] = &[
    ("/usr/share/qemu/qboot.rom", "/usr/share/qemu/bios-microvm.bin"),
    ("/usr/share/qemu/qboot.rom", "/usr/share/qemu/qboot.rom"),
    ("/usr/share/qemu/linuxboot_dma.bin", "/usr/share/qemu/linuxboot_dma.bin"),
    // The option ROM that enters an ELF vmlinux through its PVH note.
    ("/usr/share/qemu/pvh.bin", "/usr/share/qemu/pvh.bin"),
];

/// Debian's QEMU with its shared libraries and microvm firmware (bench variant only).
fn add_comparison_qemu(tree: &mut Tree) -> Result<()> {
    host::ensure(&[tool("qemu-system-x86_64", "qemu-system-x86")])?;
    let qemu = which("qemu-system-x86_64")?;
    for (source, image_path) in userland::with_libraries(&qemu, COMPARISON_QEMU_PATH)? {
        tree.host_file(&image_path, &source, 0o755)?;
    }
    for (source, image_path) in COMPARISON_QEMU_FIRMWARE {
        let source =
            std::fs::canonicalize(source).ctx(|| format!("find QEMU firmware {source} (package qemu-system-data)"))?;
        tree.host_file(image_path, &source, 0o644)?;
    }
    Ok(())
}

fn which(command: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found =
        path.split(':').chain(["/usr/sbin", "/sbin"]).map(|dir| PathBuf::from(dir).join(command)).find(|p| p.is_file());
    found.ok_or_else(|| err!("{command} not found on this host"))
}

//! Builds the real sandbox side for `appliance serve`: the appliance CA, the sealing proxy on
//! vsock and the VMM runtime. If any of it cannot start, the API still serves (projects,
//! secrets, health) and sandbox routes answer 503 with the reason.

use std::path::PathBuf;
use std::sync::Arc;

use proxy::SealRegistry;

use crate::crypto::Keyring;
use crate::lifecycle::Backend;
use crate::sealing::{self, OperatorEgress, RegistryPublisher};
use crate::store::Store;
use crate::vmm_runtime::{RuntimeConfig, VmmRuntime};

/// The uncompressed ELF kernel (the VMM also boots a bzImage, more slowly when nested).
pub const DEFAULT_GUEST_KERNEL: &str = "/usr/share/opencomputer/guest/vmlinux";
/// The sandbox initramfs: our sandbox PID 1, which mounts the sandbox's root disk and runs the
/// agent (templates carry no init of their own).
pub const DEFAULT_GUEST_INITRD: &str = "/usr/share/opencomputer/guest/initrd.cpio";
pub const DEFAULT_CA_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
pub const DEFAULT_PROXY_CONFIG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/opencomputer/proxy-config/raw";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxOptions {
    pub vmm_bin: PathBuf,
    pub guest_kernel: PathBuf,
    pub guest_initrd: PathBuf,
    /// Read-only templates shipped with the image.
    pub templates_dir: Option<PathBuf>,
    /// Public roots for upstream TLS.
    pub ca_roots: PathBuf,
    /// Operator proxy settings (JSON); a missing file means defaults.
    pub proxy_config: Option<PathBuf>,
}

/// Everything after the store is open: CA, proxy, runtime.
pub fn build(options: &SandboxOptions, data_dir: PathBuf, store: &Store, keyring: &Keyring) -> Result<Backend, String> {
    let ca = sealing::load_or_create_ca(store, keyring)?;
    let ca_cert_pem = ca.cert_pem.clone();
    let operator = OperatorEgress::load(options.proxy_config.as_deref())?;
    let config = sealing::proxy_config(ca, options.ca_roots.clone(), operator)?;
    let registry = Arc::new(SealRegistry::new());
    let egress = sealing::start_proxy(config, Arc::clone(&registry))?;
    let runtime = VmmRuntime::start(RuntimeConfig {
        vmm_bin: options.vmm_bin.clone(),
        guest_kernel: options.guest_kernel.clone(),
        guest_initrd: options.guest_initrd.clone(),
        templates_source: options.templates_dir.clone(),
        data_dir,
        ca_cert_pem,
    })?;
    let runtime = Arc::new(runtime);
    runtime.snapshot_templates();
    Ok(Backend { runtime, publisher: Arc::new(RegistryPublisher::new(registry)), egress })
}

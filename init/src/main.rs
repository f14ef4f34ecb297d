//! The PID 1 binary: the kernel starts it as /init of the appliance's initramfs, or as /oc-init
//! of the sandbox initramfs (`rdinit=/oc-init`). With `sandbox` among its arguments (kernel
//! command line `... -- sandbox`) it runs the sandbox role, otherwise the appliance role.

fn main() {
    init::sys::power::reboot_on_panic();
    if std::env::args().skip(1).any(|arg| arg == "sandbox") {
        init::sandbox::run()
    } else {
        init::appliance::run()
    }
}

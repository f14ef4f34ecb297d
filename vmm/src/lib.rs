//! `vmm`: the purpose-built virtual machine monitor that runs one sandbox microVM per process.
//! It must never touch anything beyond its own guest's memory, disks and vsock device, and a
//! misbehaving guest must only ever be able to crash its own VMM process.
//!
//! The program is `main.rs` calling [`main`]; the library exists so that the fuzz targets
//! (vmm/fuzz) reach the guest-facing parsers through [`fuzzing`], and exposes nothing else.
//!
//! `vmm run` exit status: 0 guest powered off, 3 guest rebooted, 4 guest panicked (the
//! kernel's "Kernel panic - not syncing" banner on the console, then its reboot), 5 snapshot
//! written on a hibernation request, 1 VMM error, 2 bad usage or configuration. The last stderr line says which, in words.

mod arch;
mod config;
mod devices;
mod exit;
mod jail;
mod layout;
mod memory;
mod seccomp;
mod selfcheck;
mod snapshot;
mod timeline;
mod vmm;
mod vstate;

/// What the fuzz targets drive: guest memory, the virtqueue and the block device, i.e. the
/// code that parses what a hostile guest writes into its rings. Not an API for anything else.
pub mod fuzzing {
    pub use crate::devices::virtio::block::Block;
    pub use crate::devices::virtio::queue::{Descriptor, DescriptorChain, Queue, QueueError};
    pub use crate::devices::virtio::VirtioDevice;
    pub use crate::memory::{create_guest_memory, GuestMemory};
}

use std::process::ExitCode;

use exit::{STATUS_USAGE, STATUS_VMM_ERROR};

/// The `vmm` command: `args` are its arguments without the program name.
pub fn main(args: Vec<String>) -> ExitCode {
    match args.first().map(String::as_str) {
        Some("selfcheck") => match selfcheck::run() {
            Ok(check) => {
                println!("{}", check.to_json());
                ExitCode::SUCCESS
            }
            Err(message) => {
                println!("{}", selfcheck::error_json(&message));
                ExitCode::FAILURE
            }
        },
        Some("run") => run(&args[1..]),
        Some("check-snapshot") => check_snapshot(&args[1..]),
        _ => {
            eprintln!("{}", config::USAGE);
            ExitCode::from(STATUS_USAGE)
        }
    }
}

fn check_snapshot(args: &[String]) -> ExitCode {
    let [state, memory] = args else {
        eprintln!("{}", config::USAGE);
        return ExitCode::from(STATUS_USAGE);
    };
    match snapshot::check_files(state.as_ref(), memory.as_ref()) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> ExitCode {
    timeline::init_from_env();
    timeline::mark("start");
    let cfg = match config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e}\n{}", config::USAGE);
            return ExitCode::from(STATUS_USAGE);
        }
    };
    let code = match vmm::run(&cfg) {
        Ok((reason, error)) => {
            match error {
                Some(e) => eprintln!("vmm: {}: {e}", reason.describe()),
                None => eprintln!("vmm: {}", reason.describe()),
            }
            reason.code()
        }
        Err(e) => {
            eprintln!("vmm: VMM error: {e}");
            STATUS_VMM_ERROR
        }
    };
    // Leave at once: vCPU threads are still inside KVM_RUN and die with the process.
    std::process::exit(i32::from(code))
}

//! `vmm`: the purpose-built virtual machine monitor that runs one sandbox microVM per process.
//! It must never touch anything beyond its own guest's memory, disks and vsock device, and a
//! misbehaving guest must only ever be able to crash its own VMM process.
//!
//! `vmm run` exit status: 0 guest powered off, 3 guest rebooted, 4 guest panicked (the
//! kernel's "Kernel panic - not syncing" banner on the console, then its reboot), 1 VMM
//! error, 2 bad usage or configuration. The last stderr line says which, in words.

mod arch;
mod config;
mod devices;
mod exit;
mod jail;
mod layout;
mod memory;
mod seccomp;
mod selfcheck;
mod timeline;
mod vmm;
mod vstate;

use std::process::ExitCode;

use exit::{STATUS_USAGE, STATUS_VMM_ERROR};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
        _ => {
            eprintln!("{}", config::USAGE);
            ExitCode::from(STATUS_USAGE)
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
    std::process::exit(code as i32)
}

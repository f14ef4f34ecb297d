//! The `appliance` binary: `serve` (the control plane PID 1 starts), `bench api` and
//! `rotate-key`. It must never print secret values, and it serves sandbox routes only
//! through the real VMM runtime (503 with the reason when it cannot start).

use std::process::ExitCode;

use appliance::cli::{self, Command};
use appliance::serve::{self, SandboxSide};

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args().skip(1).collect()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("appliance: {e}\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Help => {
            println!("{}", cli::USAGE);
            Ok(())
        }
        Command::Serve(config, sandbox) => {
            appliance::console_log::install();
            let data_dir = config.data_dir.clone();
            let factory = move |store: &appliance::store::Store, keyring: &appliance::crypto::Keyring| {
                appliance::sandbox_side::build(&sandbox, data_dir, store, keyring)
            };
            serve::run(&config, SandboxSide::Build(Box::new(factory)))
        }
        Command::BenchApi(options) => appliance::bench::run(&options).map(|line| println!("{line}")),
        Command::RotateKey { data_dir, store, old_key, new_key } => {
            appliance::master_key::rotate_offline(&data_dir, &store, old_key.as_deref(), new_key.as_deref()).map(|r| {
                println!(
                    "appliance: rotated to master key {}: re-encrypted {} secret(s) and {} CA key(s)",
                    r.new_key_id, r.secrets, r.ca_keys
                );
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("appliance: {e}");
            ExitCode::FAILURE
        }
    }
}

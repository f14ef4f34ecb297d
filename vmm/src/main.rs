//! The `vmm` program; everything lives in the library (src/lib.rs), which also serves the fuzz
//! targets.

use std::process::ExitCode;

fn main() -> ExitCode {
    vmm::main(std::env::args().skip(1).collect())
}

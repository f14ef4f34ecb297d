//! The sandbox role: PID 1 inside each sandbox microVM, and the agent it runs, which serves the
//! appliance's requests (commands, sessions, files, environment, CA trust) over vsock and
//! forwards the sandbox's outbound connections to the host.

mod agent_role;
mod ca;
mod child;
mod egress;
mod env;
mod error;
mod exec;
mod files;
mod grow_root;
mod loopback;
mod paths;
mod pid1;
mod pty;
mod resume;
mod server;
mod sessions;
mod switch_root;
mod users;

pub use ca::{CaPaths, TRUST_VARIABLES};
pub use egress::forward as egress_forward;
pub use egress::serve as egress_serve;
pub use server::{Agent, AgentConfig, PowerHandler};

/// Entry point for `init sandbox` (PID 1) and `init sandbox agent` (the agent process PID 1 starts).
pub fn run() -> ! {
    if std::env::args().skip(1).any(|arg| arg == "agent") {
        agent_role::run()
    }
    if std::process::id() != 1 {
        eprintln!("init sandbox: must run as PID 1 (the kernel command line ends with `-- sandbox`)");
        std::process::exit(2);
    }
    pid1::run()
}

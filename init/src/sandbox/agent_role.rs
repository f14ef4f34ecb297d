//! The agent process inside a sandbox (started by the sandbox's PID 1 as `init sandbox agent`):
//! the egress forwarder on 127.0.0.1:3128 and the agent server on vsock.
//! Ports can be moved with `oc.agent_port=` and `oc.egress_port=` on the kernel command line.

use super::ca::CaPaths;
use super::egress;
use super::server::{default_home, Agent, AgentConfig};
use crate::sys::fs::{cmdline_value, kernel_cmdline};
use agent_protocol::{Power, AGENT_PORT, EGRESS_LISTEN, EGRESS_PORT};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use vsock::{VsockListener, VsockStream, HOST_CID};

fn say(message: &str) {
    crate::sys::console::line("agent", message);
}

pub fn run() -> ! {
    // The power operation signals PID 1: only meaningful (and only safe) under the sandbox's own
    // init, never when someone starts this by hand on another machine.
    // SAFETY: getppid(2) has no arguments and cannot fail.
    if unsafe { libc::getppid() } != 1 {
        eprintln!("init sandbox agent: must be started by the sandbox's PID 1");
        std::process::exit(2);
    }
    // PID 1's mask (the signals it reads from a signalfd) survives exec: clear it, or SIGTERM
    // at shutdown would not stop the agent, nor would any thread started here see signals.
    if let Err(e) = crate::sys::process::unblock_all_signals() {
        say(&format!("cannot clear the signal mask: {e}"));
    }
    let cmdline = kernel_cmdline();
    let port_from =
        |key: &str, default: u32| cmdline_value(&cmdline, key).and_then(|v| v.parse().ok()).unwrap_or(default);
    let agent_port = port_from("oc.agent_port", AGENT_PORT);
    let egress_port = port_from("oc.egress_port", EGRESS_PORT);

    match TcpListener::bind(EGRESS_LISTEN) {
        Ok(listener) => {
            let started = std::thread::Builder::new().name("egress".into()).spawn(move || {
                egress::serve(listener, move || {
                    VsockStream::connect(HOST_CID, egress_port, Some(Duration::from_secs(5)))
                })
            });
            if let Err(e) = started {
                say(&format!("cannot start the egress forwarder: {e}"));
            }
        }
        Err(e) => say(&format!("egress listener {EGRESS_LISTEN}: {e}; programs have no way out")),
    }

    let listener = match VsockListener::bind(agent_port) {
        Ok(listener) => listener,
        Err(e) => {
            // PID 1 restarts the agent after a pause.
            say(&format!("{e}"));
            std::process::exit(1);
        }
    };
    say(&format!("listening on vsock port {agent_port}; egress {EGRESS_LISTEN} -> host port {egress_port}"));
    let config = AgentConfig::new(default_home(), CaPaths::debian(), Arc::new(signal_init));
    Agent::new(config).serve(listener)
}

/// Asks PID 1 to power off or reboot (its signal convention).
fn signal_init(action: Power) -> std::io::Result<()> {
    let signal = match action {
        Power::Off => libc::SIGUSR2,
        Power::Reboot => libc::SIGUSR1,
    };
    // SAFETY: kill(2) with plain integers.
    let ret = unsafe { libc::kill(1, signal) };
    crate::sys::check(ret, || "signal PID 1".into()).map(|_| ())
}

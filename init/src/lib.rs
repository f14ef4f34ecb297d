//! `init`: the Rust PID 1 of the appliance and of every sandbox microVM, and the sandbox agent
//! that PID 1 starts. The formats and contracts it shares with other programs live in their own
//! crates beside it: `agent-protocol`, `boot-disk`, `init-handoff` and `vsock`.
//! It must never exit or hang as PID 1 (a panic prints and reboots), and it must never log or
//! persist a secret value that passes through it.

pub mod appliance;
pub mod sandbox;
pub mod sys;

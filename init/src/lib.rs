//! `init`: the Rust PID 1 of the appliance and of every sandbox microVM, plus the sandbox agent
//! and the agent wire protocol the appliance speaks to it.
//! It must never exit or hang as PID 1 (a panic prints and reboots), and it must never log or
//! persist a secret value that passes through it.

pub mod agent;
pub mod appliance;
pub mod boot;
pub mod gpt;
pub mod layout;
pub mod sandbox;
pub mod sys;

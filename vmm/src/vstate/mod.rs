//! KVM state: the VM (memory slots, interrupt controllers), the vCPU run loops, pausing them,
//! and what a snapshot saves of each.

pub mod pause;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;

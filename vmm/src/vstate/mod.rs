//! KVM state: the VM (memory slots, interrupt controllers) and the vCPU run loops.

pub mod vcpu;
pub mod vm;

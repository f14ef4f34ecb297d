//! Emulated devices and the bus that routes vCPU port and MMIO exits to them.

pub mod bus;
pub mod console;
pub mod legacy;
pub mod virtio;

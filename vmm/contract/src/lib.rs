//! What the appliance and a `vmm` process agree on, in one place so neither side writes the
//! other's format by hand:
//!
//! - [`config`]: the VM configuration file (`vmm run --config vm.json`);
//! - [`exit`]: what the VMM's exit status means;
//! - [`control`]: requests the appliance sends a running VMM (signals, so that a VMM adopted after
//!   an appliance restart can be reached the same way) and the events the VMM reports back (JSON
//!   lines appended to the events file named in the configuration).

pub mod config;
pub mod control;
pub mod exit;

pub use config::{DiskConfig, RestoreSource, SnapshotTarget, VmConfig};
pub use control::{Control, Event};
pub use exit::ExitStatus;

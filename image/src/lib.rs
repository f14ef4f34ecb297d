//! `image`: builds the appliance's boot artifacts (appliance kernel and modules, sandbox guest
//! kernel, initramfs) with cached, hash-keyed steps, and boots them in QEMU for operators and tests.
//! It must never modify the host beyond installing missing build tools with apt-get, and never
//! put anything in the image that was not built from declared inputs.

pub mod api_trust;
pub mod appliance_kernel;
pub mod cache;
pub mod cpio;
pub mod debian;
pub mod disk_image;
pub mod error;
pub mod esp;
pub mod ext4;
pub mod guest_kernel;
pub mod host;
pub mod http;
pub mod initramfs;
pub mod manifest;
pub mod modules;
pub mod pipeline;
pub mod progress;
pub mod qemu;
pub mod run;
pub mod sandbox_initrd;
pub mod signing;
pub mod swtpm;
pub mod system_disk;
pub mod template;
pub mod uki;
pub mod userland;
pub mod workspace;

/// The date files the build itself writes carry in the image (FAT cannot store dates before
/// 1980), so that a build does not depend on when it ran.
pub const SOURCE_DATE_EPOCH: i64 = 946_684_800; // 2000-01-01 00:00:00 UTC

pub use error::{Error, Result};

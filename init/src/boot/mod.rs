//! A/B system slots on the boot disk, shared by PID 1 (which boots a slot and commits a trial
//! boot) and the appliance (which stages an upgrade into the other slot):
//!
//! - `entry`: the unified-kernel-image entries on the EFI partition (`EFI/Linux/`), their names,
//!   systemd-boot's boot-counting suffix and the order systemd-boot picks them in;
//! - `fat`: a read-only FAT32 reader (the ESP inside an uploaded image, the live ESP);
//! - `pe`: the PE sections of a unified kernel image (validation, the slot on its command line);
//! - `disk`: finding partitions by GPT name, mounting the ESP read-write for one change.

pub mod disk;
pub mod entry;
pub mod fat;
pub mod pe;

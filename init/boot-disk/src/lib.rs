//! The boot disk's formats and names, shared by PID 1 (which boots a slot, adds the data
//! partition and commits a trial boot), the appliance (which checks an uploaded image and stages
//! it into the other slot) and the image builder (which writes the whole disk):
//!
//! - `layout`: the GPT partition names and the files on the EFI system partition;
//! - `gpt`: GUID partition tables, read and written;
//! - `fat`: a read-only FAT32 reader (the ESP inside an uploaded image, the live ESP);
//! - `pe`: the PE sections of a unified kernel image (validation, the slot on its command line);
//! - `entry`: the unified-kernel-image boot entries on the ESP (`EFI/Linux/`), their names,
//!   systemd-boot's boot-counting suffix and the order systemd-boot picks them in;
//! - `ext4`: the system partitions' filesystem label;
//! - `signature`: the signature statement an upgrade image travels with (digest, manifest,
//!   version, Ed25519 key);
//! - `disk`: the live machine's boot disk: partitions by GPT name, the ESP mounted read-write
//!   for one change.
//!
//! The readers take bytes from uploaded images, so they must refuse anything malformed without
//! panicking (each has a fuzz target in `init/fuzz`).

pub mod disk;
pub mod entry;
pub mod ext4;
pub mod fat;
pub mod gpt;
pub mod layout;
pub mod pe;
pub mod signature;

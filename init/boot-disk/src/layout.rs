//! The boot disk's layout, shared by the image build (which writes it) and PID 1 (which finds
//! its partitions by these GPT names and adds the data partition on first boot).

/// The EFI system partition: the unified kernel image and the operator's configuration file.
pub const ESP_NAME: &str = "oc-esp";
/// The two system slots: each holds an `oc-system` ext4 (templates); an upgrade goes into the
/// one not running (see boot/entry.rs).
pub const SYSTEM_A_NAME: &str = "oc-system-a";
pub const SYSTEM_B_NAME: &str = "oc-system-b";
/// The data partition PID 1 creates in the free space at the end of the disk.
pub const DATA_NAME: &str = "opencomputer-data";
/// The operator configuration file, at the root of the ESP.
pub const CONFIG_FILE: &str = "opencomputer.conf";
/// The boot loader (systemd-boot) at the removable-media path UEFI firmware boots by default.
pub const BOOTLOADER_PATH: &str = "EFI/BOOT/BOOTX64.EFI";
/// systemd-boot's configuration on the ESP.
pub const LOADER_CONF: &str = "loader/loader.conf";

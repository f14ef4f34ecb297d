//! Every guest-physical address, port and interrupt line the VMM uses, in one place.
//!
//! The x86 Linux boot protocol fixes some of these (the zero page must be below 1 MiB,
//! the 64-bit entry point is 0x200 past the protected-mode kernel); the rest are our choice
//! and only need to stay out of each other's way.

/// Global descriptor table the vCPUs start with (null, null, code 0x10, data 0x18, tss 0x20).
pub const GDT_ADDR: u64 = 0x500;
/// An empty interrupt descriptor table; the kernel installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// The `boot_params` structure ("zero page") handed to the kernel in %rsi.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: one PML4, one PDPT and one page directory of 2 MiB pages.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line, NUL-terminated.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we hand over (the kernel's own limit on x86 is 2048 by default,
/// bigger when the kernel says so in `cmdline_size`).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of the low RAM block the e820 map reports (the classic EBDA boundary).
pub const EBDA_START: u64 = 0x9fc00;
/// The PC BIOS area below 1 MiB. Nothing is there (no firmware, no ACPI tables), but the e820
/// map keeps reporting it reserved, as on a PC, so the guest's view of memory is unchanged.
pub const BIOS_AREA_START: u64 = 0xe0000;
pub const BIOS_AREA_END: u64 = 0x100000;
/// Where high RAM starts and where the protected-mode kernel is loaded.
pub const HIGH_RAM_START: u64 = 0x100000;

/// Guest RAM stops here and continues above 4 GiB; the hole holds device MMIO,
/// the IOAPIC and the local APIC.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The first virtio-mmio device window; each device gets `VIRTIO_MMIO_SIZE` bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first virtio interrupt line; device `i` uses `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Interrupt lines the IOAPIC offers; virtio devices must fit below this.
pub const IOAPIC_PINS: u32 = 24;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// Serial port COM1 and its interrupt line.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_PORT_COUNT: u16 = 8;
pub const COM1_IRQ: u32 = 4;
/// The i8042 keyboard controller's data and command ports (a write of 0xfe to the
/// command port resets the CPU, which is how Linux reboots with `reboot=k`).
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// KVM needs three pages of guest-physical space for the TSS on Intel hosts.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// Most vCPUs a VM may have (the MP table uses one-byte APIC ids; leave room for the IOAPIC id).
pub const MAX_VCPUS: u8 = 254;

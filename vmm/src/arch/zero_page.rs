//! The Linux x86 "zero page" (`struct boot_params`) with its e820 memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use crate::layout::{
    BIOS_AREA_END, BIOS_AREA_START, CMDLINE_ADDR, EBDA_START, HIGH_RAM_START, MMIO_GAP_END, MMIO_GAP_START,
};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Magic values of a valid setup header (boot protocol, Documentation/x86/boot.rst).
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// The smallest guest our memory layout fits in: the low-memory boot structures plus room
/// for a kernel above 1 MiB.
pub const MIN_GUEST_MEMORY: u64 = 16 << 20;

/// The e820 map for `mem_bytes` of RAM laid out as `memory::ram_ranges` lays it out.
pub fn e820_map(mem_bytes: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, type_: u32| boot_e820_entry { addr, size, r#type: type_ };
    let mut map =
        vec![entry(0, EBDA_START, E820_RAM), entry(BIOS_AREA_START, BIOS_AREA_END - BIOS_AREA_START, E820_RESERVED)];
    let low_end = mem_bytes.min(MMIO_GAP_START);
    map.push(entry(HIGH_RAM_START, low_end - HIGH_RAM_START, E820_RAM));
    if mem_bytes > MMIO_GAP_START {
        map.push(entry(MMIO_GAP_END, mem_bytes - MMIO_GAP_START, E820_RAM));
    }
    map
}

/// Builds the zero page from the kernel's own setup header (as read from the bzImage).
pub fn build(header: setup_header, mem_bytes: u64, cmdline_len: usize) -> Result<boot_params, String> {
    if header.boot_flag != BOOT_FLAG_MAGIC || header.header != HDRS_MAGIC {
        return Err("the kernel image has no valid Linux setup header".into());
    }
    if mem_bytes < MIN_GUEST_MEMORY {
        return Err(format!("guest memory must be at least {} MiB", MIN_GUEST_MEMORY >> 20));
    }
    let mut params = boot_params { hdr: header, ..Default::default() };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    let map = e820_map(mem_bytes);
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use vm_memory::{ByteValued, Bytes, GuestAddress};

    fn kernel_header() -> setup_header {
        setup_header { boot_flag: BOOT_FLAG_MAGIC, header: HDRS_MAGIC, version: 0x20f, ..Default::default() }
    }

    #[test]
    fn e820_for_small_guest_has_low_ram_reserved_bios_area_and_high_ram() {
        let map = e820_map(256 << 20);
        let plain: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            plain,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0xe0000, 0x20000, E820_RESERVED),
                (0x100000, (256 << 20) - 0x100000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_skips_the_mmio_gap_for_big_guests() {
        let map = e820_map(5 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!({ map[3].addr }, MMIO_GAP_END);
        let ram: u64 = map.iter().filter(|e| e.r#type == E820_RAM).map(|e| e.size).sum();
        // All RAM except the 1 MiB legacy area below HIGH_RAM_START minus the low block.
        assert_eq!(ram, (5 << 30) - (HIGH_RAM_START - EBDA_START));
    }

    #[test]
    fn zero_page_round_trips_through_guest_memory() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let params = build(kernel_header(), 64 << 20, 42).unwrap();
        mem.write_obj(params, GuestAddress(crate::layout::ZERO_PAGE_ADDR)).unwrap();
        let raw: boot_params = mem.read_obj(GuestAddress(crate::layout::ZERO_PAGE_ADDR)).unwrap();
        let bytes = raw.as_slice();
        // Offsets fixed by the boot protocol: e820_entries at 0x1e8, cmd_line_ptr at 0x228,
        // the table at 0x2d0, acpi_rsdp_addr at 0x70 (none: no ACPI), the setup header magic at 0x202.
        assert_eq!(bytes[0x1e8], 3);
        assert_eq!(u32::from_le_bytes(bytes[0x228..0x22c].try_into().unwrap()), CMDLINE_ADDR as u32);
        assert_eq!(u64::from_le_bytes(bytes[0x70..0x78].try_into().unwrap()), 0);
        assert_eq!(u32::from_le_bytes(bytes[0x202..0x206].try_into().unwrap()), HDRS_MAGIC);
        assert_eq!(bytes[0x210], LOADER_TYPE_UNDEFINED);
        let third = 0x2d0 + 2 * 20;
        assert_eq!(u64::from_le_bytes(bytes[third..third + 8].try_into().unwrap()), HIGH_RAM_START);
        assert_eq!(u32::from_le_bytes(bytes[third + 16..third + 20].try_into().unwrap()), E820_RAM);
    }

    #[test]
    fn rejects_images_without_a_setup_header_and_tiny_guests() {
        assert!(build(setup_header::default(), 64 << 20, 1).is_err());
        assert!(build(kernel_header(), 8 << 20, 1).is_err());
    }
}

//! x86-64 guest setup: loading the kernel (ELF vmlinux or bzImage), the zero page, the MP table, boot page
//! tables and the initial vCPU state.

pub mod cpuid;
pub mod gdt;
pub mod loader;
pub mod mptable;
pub mod regs;
pub mod zero_page;

use std::fs::File;

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{CMDLINE_ADDR, ZERO_PAGE_ADDR};
use crate::memory::GuestMemory;

/// Before boot protocol 2.03 the kernel doesn't say how high an initrd may go.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Places the initrd as high in low RAM as the kernel allows; returns (address, size).
fn load_initrd(
    mem: &GuestMemory,
    initrd: &mut File,
    header: &linux_loader::loader::bootparam::setup_header,
    mem_bytes: u64,
    kernel_end: u64,
) -> Result<(u64, u64), String> {
    let size = initrd.metadata().map_err(|e| format!("cannot size the initrd: {e}"))?.len();
    let addr_max = if header.version >= 0x203 { u64::from(header.initrd_addr_max) } else { DEFAULT_INITRD_ADDR_MAX };
    let top = (addr_max + 1).min(mem_bytes.min(crate::layout::MMIO_GAP_START));
    let addr = top.checked_sub(size).map(|a| a & !0xfff).filter(|a| *a >= kernel_end);
    let addr =
        addr.ok_or_else(|| format!("the initrd ({size} bytes) does not fit in guest memory above the kernel"))?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, size as usize)
        .map_err(|e| format!("cannot read the initrd: {e}"))?;
    Ok((addr, size))
}

/// Loads `kernel` (an ELF vmlinux or a bzImage), writes every boot structure and returns
/// the entry point.
pub fn load_and_configure(
    mem: &GuestMemory,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cmdline: &str,
    mem_bytes: u64,
    vcpus: u8,
) -> Result<u64, String> {
    let loaded = loader::load(mem, kernel)?;
    crate::timeline::mark(match loaded.format {
        loader::Format::Elf => "ELF vmlinux read into guest memory",
        loader::Format::BzImage => "bzImage read into guest memory",
    });
    let header = loaded.header;
    if cmdline.len() > loaded.cmdline_max {
        return Err(format!(
            "kernel command line is {} bytes; this kernel takes at most {}",
            cmdline.len(),
            loaded.cmdline_max
        ));
    }
    if cmdline.as_bytes().contains(&0) {
        return Err("kernel command line contains a NUL byte".into());
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| format!("cannot write the kernel command line: {e}"))?;
    // Our sandbox kernel has no ACPI: the MP table is how it finds its CPUs and the IOAPIC.
    mptable::write(mem, vcpus)?;
    let mut params = zero_page::build(header, mem_bytes, cmdline.len())?;
    if let Some(initrd) = initrd {
        let (addr, size) = load_initrd(mem, initrd, &header, mem_bytes, loaded.end)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR)).map_err(|e| format!("cannot write the zero page: {e}"))?;
    regs::write_boot_tables(mem)?;
    Ok(loaded.entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use linux_loader::loader::bootparam::boot_params;
    use std::io::Write;

    const XLF_KERNEL_64: u16 = 1;

    /// A synthetic bzImage: a setup header saying "64-bit entry, protocol 2.15, two setup
    /// sectors", then `payload` as the protected-mode kernel.
    fn fake_bzimage(xloadflags: u16, payload: &[u8]) -> File {
        let mut img = vec![0u8; 3 * 512];
        img[0x1f1] = 2; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        img.extend_from_slice(payload);
        let path =
            std::env::temp_dir().join(format!("vmm-bz-{}-{:?}", std::process::id(), std::thread::current().id()));
        let mut f = File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        f.write_all(&img).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn temp_file(bytes: &[u8]) -> File {
        let path =
            std::env::temp_dir().join(format!("vmm-rd-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::write(&path, bytes).unwrap();
        let f = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn kernel_cmdline_initrd_and_zero_page_land_where_the_kernel_looks() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let mut kernel = fake_bzimage(XLF_KERNEL_64, b"KERNEL-PAYLOAD");
        let mut initrd = temp_file(&[0x42; 5000]);
        let entry =
            load_and_configure(&mem, &mut kernel, Some(&mut initrd), "console=ttyS0 quiet", 64 << 20, 2).unwrap();
        assert_eq!(entry, 0x100200);
        let mut payload = [0u8; 14];
        mem.read_slice(&mut payload, GuestAddress(0x100000)).unwrap();
        assert_eq!(&payload, b"KERNEL-PAYLOAD");
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let hdr = params.hdr;
        assert_eq!(u64::from(hdr.cmd_line_ptr), CMDLINE_ADDR);
        let mut line = [0u8; 20];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&line, b"console=ttyS0 quiet\0");
        // The initrd sits page-aligned at the top of RAM, intact.
        let (image, size) = (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size));
        assert_eq!(size, 5000);
        assert_eq!(image % 4096, 0);
        assert!(image + size <= 64 << 20 && image + size > (64 << 20) - 4096 - 5000);
        let mut rd = vec![0u8; 5000];
        mem.read_slice(&mut rd, GuestAddress(image)).unwrap();
        assert!(rd.iter().all(|&b| b == 0x42));
        assert_eq!(params.e820_entries, 3);
        assert_eq!({ params.acpi_rsdp_addr }, 0);
    }

    #[test]
    fn images_without_64_bit_entry_or_with_long_cmdlines_are_refused() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let err = load_and_configure(&mem, &mut fake_bzimage(0, b"x"), None, "console=ttyS0", 64 << 20, 1).unwrap_err();
        assert!(err.contains("64-bit"), "{err}");
        let long = "a".repeat(2048);
        let err =
            load_and_configure(&mem, &mut fake_bzimage(XLF_KERNEL_64, b"x"), None, &long, 64 << 20, 1).unwrap_err();
        assert!(err.contains("at most 2047"), "{err}");
        let err = load_and_configure(&mem, &mut temp_file(b"not a kernel at all"), None, "", 64 << 20, 1).unwrap_err();
        assert!(err.contains("bzImage or an ELF"), "{err}");
    }

    #[test]
    fn no_rsdp_exists_anywhere_the_kernel_scans() {
        let mem = create_guest_memory(64 << 20).unwrap();
        load_and_configure(&mem, &mut fake_bzimage(XLF_KERNEL_64, b"x"), None, "", 64 << 20, 1).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ params.acpi_rsdp_addr }, 0);
        let mut bios = vec![0u8; 0x20000];
        mem.read_slice(&mut bios, GuestAddress(0xe0000)).unwrap();
        assert!(!bios.windows(8).any(|w| w == b"RSD PTR "));
        // The MP table is there instead.
        let mut fp = [0u8; 4];
        mem.read_slice(&mut fp, GuestAddress(mptable::MPTABLE_ADDR)).unwrap();
        assert_eq!(&fp, b"_MP_");
    }

    #[test]
    fn an_elf_kernel_is_entered_at_its_entry_with_a_zero_page_and_page_tables() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let image = loader::tests::fake_vmlinux(0x100_0000, 0x100_0000, b"VMLINUX", 0x20_0000);
        let mut kernel = loader::tests::file_with(&image);
        let mut initrd = temp_file(&[0x17; 3000]);
        let cmdline = format!("console=ttyS0 {}", "x".repeat(600));
        let entry = load_and_configure(&mem, &mut kernel, Some(&mut initrd), &cmdline, 64 << 20, 1).unwrap();
        assert_eq!(entry, 0x100_0000);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let hdr = params.hdr;
        // What the kernel's startup code reads back: the magic, the loader, the command line,
        // the memory map and the initrd (above the kernel's end, in low RAM).
        assert_eq!(({ hdr.boot_flag }, { hdr.header }, hdr.type_of_loader), (0xaa55, 0x5372_6448, 0xff));
        assert_eq!(u64::from(hdr.cmd_line_ptr), CMDLINE_ADDR);
        assert_eq!({ hdr.cmdline_size } as usize, cmdline.len());
        assert_eq!(params.e820_entries, 3);
        assert!(u64::from(hdr.ramdisk_image) >= 0x120_0000 && { hdr.ramdisk_size } == 3000);
        let mut line = vec![0u8; cmdline.len() + 1];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&line[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(line[cmdline.len()], 0);
        // The identity map covers the entry point.
        let pde: u64 = mem.read_obj(GuestAddress(crate::layout::PD_ADDR + 8 * (entry >> 21))).unwrap();
        assert_eq!(pde & !0x1f_ffff, entry & !0x1f_ffff);
        // An ELF kernel takes up to 2047 bytes of command line.
        let long = "a".repeat(2048);
        let err =
            load_and_configure(&mem, &mut loader::tests::file_with(&image), None, &long, 64 << 20, 1).unwrap_err();
        assert!(err.contains("at most 2047"), "{err}");
    }

    #[test]
    fn an_initrd_bigger_than_ram_is_refused() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut initrd = temp_file(&vec![0u8; 17 << 20]);
        let err = load_and_configure(&mem, &mut fake_bzimage(XLF_KERNEL_64, b"x"), Some(&mut initrd), "", 16 << 20, 1)
            .unwrap_err();
        assert!(err.contains("does not fit"), "{err}");
    }
}

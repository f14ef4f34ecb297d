//! Puts the kernel image into guest memory and says where to enter it, for the two formats we
//! boot through the Linux 64-bit boot protocol:
//!
//! - an uncompressed ELF `vmlinux`: its segments go to their physical addresses and the vCPU
//!   starts at the ELF entry (the kernel's own `startup_64`). Nothing is decompressed or
//!   relocated inside the guest, which matters when every guest instruction and first page
//!   touch is expensive (nested virtualization). The setup header the kernel reads back from
//!   the zero page is ours, since an ELF has none.
//! - a bzImage: the protected-mode part goes to 1 MiB and the vCPU starts at its 64-bit entry,
//!   which decompresses the real kernel in the guest.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::GuestAddress;

use crate::layout::{CMDLINE_MAX_SIZE, HIGH_RAM_START};
use crate::memory::GuestMemory;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// Offset of the 64-bit entry point from the start of the protected-mode kernel.
const ENTRY_64_OFFSET: u64 = 0x200;
/// xloadflags bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// First boot protocol version that reports the maximum command-line size.
const PROTOCOL_WITH_CMDLINE_SIZE: u16 = 0x206;
/// Command-line limit of a kernel that doesn't report one (x86 COMMAND_LINE_SIZE).
const ELF_CMDLINE_SIZE: usize = 2048;
/// Setup-header magic values the kernel checks (Documentation/arch/x86/boot.rst).
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// The alignment x86-64 kernels are built for (CONFIG_PHYSICAL_ALIGN default).
const KERNEL_ALIGNMENT: u32 = 0x20_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Elf,
    BzImage,
}

/// A kernel in guest memory.
pub struct LoadedKernel {
    pub format: Format,
    /// Where the boot vCPU starts, in 64-bit mode.
    pub entry: u64,
    /// First guest-physical byte after the kernel (an initrd must go above it).
    pub end: u64,
    /// The setup header for the zero page: the bzImage's own, or one made for an ELF.
    pub header: setup_header,
    /// Longest command line (without its NUL) this kernel accepts.
    pub cmdline_max: usize,
}

/// Tells the formats apart by their first bytes.
pub fn detect(kernel: &mut File) -> Result<Format, String> {
    let mut magic = [0u8; 4];
    kernel.seek(SeekFrom::Start(0)).map_err(|e| format!("cannot read the kernel: {e}"))?;
    let n = kernel.read(&mut magic).map_err(|e| format!("cannot read the kernel: {e}"))?;
    Ok(if n == magic.len() && &magic == ELF_MAGIC { Format::Elf } else { Format::BzImage })
}

pub fn load(mem: &GuestMemory, kernel: &mut File) -> Result<LoadedKernel, String> {
    match detect(kernel)? {
        Format::Elf => load_elf(mem, kernel),
        Format::BzImage => load_bzimage(mem, kernel),
    }
}

fn load_elf(mem: &GuestMemory, kernel: &mut File) -> Result<LoadedKernel, String> {
    // No offset: segments go to their p_paddr, where the kernel was linked to run.
    let loaded = Elf::load(mem, None, kernel, Some(GuestAddress(HIGH_RAM_START)))
        .map_err(|e| format!("cannot load the ELF kernel (an x86-64 vmlinux is required): {e}"))?;
    let header = setup_header {
        boot_flag: BOOT_FLAG_MAGIC,
        header: HDRS_MAGIC,
        kernel_alignment: KERNEL_ALIGNMENT,
        ..Default::default()
    };
    Ok(LoadedKernel {
        format: Format::Elf,
        entry: loaded.kernel_load.0,
        end: loaded.kernel_end,
        header,
        cmdline_max: ELF_CMDLINE_SIZE.min(CMDLINE_MAX_SIZE) - 1,
    })
}

fn load_bzimage(mem: &GuestMemory, kernel: &mut File) -> Result<LoadedKernel, String> {
    let loaded = BzImage::load(mem, None, kernel, Some(GuestAddress(HIGH_RAM_START)))
        .map_err(|e| format!("cannot load the kernel (a bzImage or an ELF vmlinux is required): {e}"))?;
    let header = loaded.setup_header.ok_or("the kernel image has no setup header")?;
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err("the kernel has no 64-bit entry point (boot protocol 2.12+ needed)".into());
    }
    let limit = if header.version >= PROTOCOL_WITH_CMDLINE_SIZE {
        (header.cmdline_size as usize).min(CMDLINE_MAX_SIZE)
    } else {
        255
    };
    Ok(LoadedKernel {
        format: Format::BzImage,
        entry: loaded.kernel_load.0 + ENTRY_64_OFFSET,
        end: loaded.kernel_end,
        header,
        cmdline_max: limit.saturating_sub(1),
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::io::Write;
    use vm_memory::Bytes;

    pub fn file_with(bytes: &[u8]) -> File {
        let path =
            std::env::temp_dir().join(format!("vmm-ld-{}-{:?}", std::process::id(), std::thread::current().id()));
        let mut f = File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        f.write_all(bytes).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    /// A minimal x86-64 ELF executable: one PT_LOAD segment of `payload` at physical address
    /// `paddr` (memory size `memsz`), entry at `entry`.
    pub fn fake_vmlinux(paddr: u64, entry: u64, payload: &[u8], memsz: u64) -> Vec<u8> {
        const EHDR: usize = 64;
        const PHDR: usize = 56;
        let mut img = vec![0u8; EHDR + PHDR];
        img[0..4].copy_from_slice(ELF_MAGIC);
        img[4] = 2; // ELFCLASS64
        img[5] = 1; // little endian
        img[6] = 1; // EV_CURRENT
        img[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        img[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        img[20..24].copy_from_slice(&1u32.to_le_bytes());
        img[24..32].copy_from_slice(&entry.to_le_bytes());
        img[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
        img[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
        img[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
        img[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = EHDR;
        img[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        img[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        img[ph + 8..ph + 16].copy_from_slice(&((EHDR + PHDR) as u64).to_le_bytes()); // p_offset
        img[ph + 16..ph + 24].copy_from_slice(&(paddr | 0xffff_ffff_8000_0000).to_le_bytes()); // p_vaddr
        img[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        img[ph + 32..ph + 40].copy_from_slice(&(payload.len() as u64).to_le_bytes()); // p_filesz
        img[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes()); // p_memsz
        img[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn an_elf_kernel_lands_at_its_physical_address_and_is_entered_at_its_entry() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let image = fake_vmlinux(0x100_0000, 0x100_0040, b"STARTUP_64", 0x3000);
        let loaded = load(&mem, &mut file_with(&image)).unwrap();
        assert_eq!(loaded.format, Format::Elf);
        assert_eq!(loaded.entry, 0x100_0040);
        // The end covers memsz (the kernel's .bss), not only the bytes in the file.
        assert_eq!(loaded.end, 0x100_3000);
        let mut text = [0u8; 10];
        mem.read_slice(&mut text, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(&text, b"STARTUP_64");
        let hdr = loaded.header;
        assert_eq!(({ hdr.boot_flag }, { hdr.header }), (BOOT_FLAG_MAGIC, HDRS_MAGIC));
        assert_eq!(loaded.cmdline_max, 2047);
    }

    #[test]
    fn elf_kernels_that_do_not_fit_or_start_in_low_memory_are_refused() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let beyond = fake_vmlinux(0x100_0000, 0x100_0000, b"x", 1);
        let err = load(&mem, &mut file_with(&beyond)).err().unwrap();
        assert!(err.contains("ELF"), "{err}");
        let low_entry = fake_vmlinux(0x10_0000, 0x8000, b"x", 1);
        assert!(load(&mem, &mut file_with(&low_entry)).is_err());
        let truncated = &fake_vmlinux(0x10_0000, 0x10_0000, b"payload", 7)[..70];
        assert!(load(&mem, &mut file_with(truncated)).is_err());
    }

    #[test]
    fn formats_are_told_apart_by_magic() {
        assert_eq!(detect(&mut file_with(b"\x7fELF\x02\x01")).unwrap(), Format::Elf);
        assert_eq!(detect(&mut file_with(b"MZ")).unwrap(), Format::BzImage);
        assert_eq!(detect(&mut file_with(b"")).unwrap(), Format::BzImage);
    }
}

//! Initial vCPU state for the Linux 64-bit boot protocol: identity-mapped long mode,
//! flat segments, %rsi pointing at the zero page, and the local APIC's LINT pins wired.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{boot_gdt, segment, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use crate::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};
use crate::memory::GuestMemory;

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_HUGE: u64 = 0x80;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// Writes the GDT, an empty IDT and page tables identity-mapping the first 1 GiB.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), String> {
    let err = |what: &str| format!("cannot write the boot {what} into guest memory");
    for (i, entry) in boot_gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64)).map_err(|_| err("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(|_| err("IDT"))?;
    mem.write_obj(PDPT_ADDR | PAGE_PRESENT_RW, GuestAddress(PML4_ADDR)).map_err(|_| err("PML4"))?;
    mem.write_obj(PD_ADDR | PAGE_PRESENT_RW, GuestAddress(PDPT_ADDR)).map_err(|_| err("PDPT"))?;
    for i in 0..512u64 {
        let entry = (i << 21) | PAGE_PRESENT_RW | PAGE_HUGE;
        mem.write_obj(entry, GuestAddress(PD_ADDR + 8 * i)).map_err(|_| err("page directory"))?;
    }
    Ok(())
}

/// Long mode with paging on, segments from the boot GDT.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = boot_gdt();
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment(gdt[(CODE_SELECTOR / 8) as usize], CODE_SELECTOR);
    let data = segment(gdt[(DATA_SELECTOR / 8) as usize], DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[(TSS_SELECTOR / 8) as usize], TSS_SELECTOR);
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// Sets the local APIC's LINT0 to ExtINT and LINT1 to NMI, as firmware would.
pub fn wire_lapic(mut lapic: kvm_lapic_state) -> kvm_lapic_state {
    let set_mode = |regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32| {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            regs[offset + i] = *b as std::os::raw::c_char;
        }
    };
    set_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    lapic
}

/// Programs one vCPU. Only the boot vCPU gets registers; the others wait for INIT/SIPI
/// from the guest, which KVM's in-kernel local APIC handles.
pub fn configure_vcpu(vcpu: &VcpuFd, boot_cpu: bool, entry: u64) -> Result<(), String> {
    let fail = |what: &str, e: kvm_ioctls::Error| format!("cannot set the vCPU's {what}: {e}");
    // The same TSC value written to every vCPU right after creation lets KVM keep their
    // TSCs in sync, so the guest doesn't declare them unstable.
    let entries = [
        kvm_msr_entry { index: MSR_IA32_MISC_ENABLE, data: MISC_ENABLE_FAST_STRING, ..Default::default() },
        kvm_msr_entry { index: MSR_IA32_TSC, data: 0, ..Default::default() },
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|e| format!("cannot build the MSR list: {e:?}"))?;
    let written = vcpu.set_msrs(&msrs).map_err(|e| fail("MSRs", e))?;
    if written != entries.len() {
        return Err(format!("KVM accepted only {written} of {} boot MSRs", entries.len()));
    }
    let lapic = vcpu.get_lapic().map_err(|e| fail("local APIC", e))?;
    vcpu.set_lapic(&wire_lapic(lapic)).map_err(|e| fail("local APIC", e))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| fail("FPU state", e))?;
    if boot_cpu {
        let sregs = vcpu.get_sregs().map_err(|e| fail("special registers", e))?;
        vcpu.set_sregs(&boot_sregs(sregs)).map_err(|e| fail("special registers", e))?;
        vcpu.set_regs(&boot_regs(entry)).map_err(|e| fail("registers", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn page_tables_identity_map_the_first_gigabyte() {
        let mem = create_guest_memory(32 << 20).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        let pdpt: u64 = mem.read_obj(GuestAddress(PDPT_ADDR)).unwrap();
        assert_eq!(pdpt & !0xfff, PD_ADDR);
        // Walk a virtual address by hand: 0x1234_5678 lies in 2 MiB page 0x91.
        let va = 0x1234_5678u64;
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * (va >> 21))).unwrap();
        assert_eq!(pde & 0x83, 0x83);
        assert_eq!((pde & !0x1f_ffff) | (va & 0x1f_ffff), va);
        let last: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * 511)).unwrap();
        assert_eq!(last & !0xfff, 511 << 21);
    }

    #[test]
    fn sregs_enter_long_mode_with_paging() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.ss.selector, 0x18);
        assert_eq!(s.gdt.limit, 39);
    }

    #[test]
    fn regs_point_rsi_at_the_zero_page() {
        let r = boot_regs(0x100200);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100200, ZERO_PAGE_ADDR, 2));
    }

    #[test]
    fn lapic_lint_pins_get_extint_and_nmi() {
        let mut l = kvm_lapic_state::default();
        l.regs[APIC_LVT0] = 0x10u8 as std::os::raw::c_char; // a vector that must survive
        l.regs[APIC_LVT0 + 1] = 0x7; // old mode bits that must be replaced... partly
        let l = wire_lapic(l);
        let word = |o: usize| {
            u32::from_le_bytes([l.regs[o] as u8, l.regs[o + 1] as u8, l.regs[o + 2] as u8, l.regs[o + 3] as u8])
        };
        assert_eq!(word(APIC_LVT0), 0x710);
        assert_eq!(word(APIC_LVT1), 0x400);
    }
}

//! A vCPU's architectural state as KVM exposes it: what a snapshot saves and a restore puts back.
//!
//! Saving happens on the vCPU's own thread while it is out of KVM_RUN; restoring happens before
//! the vCPU first runs. The order of the restore calls matters to KVM (see `restore`).

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// The TSC deadline is relative to the TSC, so it goes back after it.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// How many MSRs one KVM_GET_MSRS/KVM_SET_MSRS call carries (the fam-struct's own cap is 256).
const MSR_BATCH: usize = 64;

// The one unsafe call on this type (KVM_SET_XSAVE) needs a legacy-layout kvm_xsave, which any
// deserialized value is: the struct has one fixed size, whatever bytes fill it.
#[allow(clippy::unsafe_derive_deserialize)]
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
}

impl VcpuState {
    /// Reads the state of a vCPU that is not inside KVM_RUN. `msr_indices` are the MSRs KVM
    /// said it can save (KVM_GET_MSR_INDEX_LIST); those a vCPU refuses to read are left out.
    pub fn save(id: u8, fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, String> {
        let fail = |what: &str, e: kvm_ioctls::Error| format!("vCPU {id}: {what} failed: {e}");
        // KVM_GET_MP_STATE first: it makes KVM process pending INIT/SIPI events, so the rest
        // is read in a settled state.
        let mp_state = fd.get_mp_state().map_err(|e| fail("KVM_GET_MP_STATE", e))?;
        Ok(VcpuState {
            id,
            mp_state,
            regs: fd.get_regs().map_err(|e| fail("KVM_GET_REGS", e))?,
            sregs: fd.get_sregs().map_err(|e| fail("KVM_GET_SREGS", e))?,
            xsave: fd.get_xsave().map_err(|e| fail("KVM_GET_XSAVE", e))?,
            xcrs: fd.get_xcrs().map_err(|e| fail("KVM_GET_XCRS", e))?,
            debugregs: fd.get_debug_regs().map_err(|e| fail("KVM_GET_DEBUGREGS", e))?,
            lapic: fd.get_lapic().map_err(|e| fail("KVM_GET_LAPIC", e))?,
            msrs: read_msrs(fd, msr_indices).map_err(|e| format!("vCPU {id}: {e}"))?,
            events: fd.get_vcpu_events().map_err(|e| fail("KVM_GET_VCPU_EVENTS", e))?,
        })
    }

    /// Puts the state back into a freshly created vCPU (CPUID already set).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), String> {
        let id = self.id;
        let fail = |what: &str, e: kvm_ioctls::Error| format!("vCPU {id}: {what} failed: {e}");
        fd.set_mp_state(self.mp_state).map_err(|e| fail("KVM_SET_MP_STATE", e))?;
        fd.set_regs(&self.regs).map_err(|e| fail("KVM_SET_REGS", e))?;
        // Segment and control registers before the FPU and extended state they enable.
        fd.set_sregs(&self.sregs).map_err(|e| fail("KVM_SET_SREGS", e))?;
        // SAFETY: a kvm_xsave read from KVM_GET_XSAVE: the legacy 4 KiB area, which is all
        // this ioctl reads (the extended KVM_SET_XSAVE2 layout is never used here).
        unsafe { fd.set_xsave(&self.xsave) }.map_err(|e| fail("KVM_SET_XSAVE", e))?;
        fd.set_xcrs(&self.xcrs).map_err(|e| fail("KVM_SET_XCRS", e))?;
        fd.set_debug_regs(&self.debugregs).map_err(|e| fail("KVM_SET_DEBUGREGS", e))?;
        // The local APIC before the MSRs: the TSC deadline timer lives in it.
        fd.set_lapic(&self.lapic).map_err(|e| fail("KVM_SET_LAPIC", e))?;
        write_msrs(fd, &self.msrs).map_err(|e| format!("vCPU {id}: {e}"))?;
        // Pending exceptions and interrupts last, on top of everything they refer to.
        fd.set_vcpu_events(&self.events).map_err(|e| fail("KVM_SET_VCPU_EVENTS", e))?;
        eprintln!("vmm: vCPU {id} restored: {}", self.describe());
        // Tell the guest's kvmclock the vCPU was stopped, so its watchdogs don't call the gap
        // a soft lockup. Old hosts lack it (EINVAL), which costs a warning in the guest only.
        let _ = fd.kvmclock_ctrl();
        Ok(())
    }

    #[cfg(test)]
    pub fn regs(&self) -> &kvm_regs {
        &self.regs
    }
}

impl VcpuState {
    /// One line for the VMM's log: where the vCPU stands and what could keep interrupts from it.
    fn describe(&self) -> String {
        let reg = |offset: usize| {
            let r = &self.lapic.regs[offset..offset + 4];
            u32::from_le_bytes([r[0] as u8, r[1] as u8, r[2] as u8, r[3] as u8])
        };
        let vectors = |base: usize| -> Vec<u32> {
            (0..8u32)
                .flat_map(|w| {
                    let bits = reg(base + 0x10 * w as usize);
                    (0..32).filter(move |b| bits & (1 << b) != 0).map(move |b| w * 32 + b)
                })
                .collect()
        };
        let msr = |index: u32| self.msrs.iter().find(|m| m.index == index).map(|m| m.data);
        format!(
            "rip {:#x} rflags {:#x} mp_state {} tpr {:#x} svr {:#x} lvtt {:#x} isr {:?} irr {:?} \
             interrupt injected {} shadow {} nmi pending {} masked {} tsc {:?} deadline {:?} ({} MSRs)",
            self.regs.rip,
            self.regs.rflags,
            self.mp_state.mp_state,
            reg(0x80),
            reg(0xf0),
            reg(0x320),
            vectors(0x100),
            vectors(0x200),
            self.events.interrupt.injected,
            self.events.interrupt.shadow,
            self.events.nmi.pending,
            self.events.nmi.masked,
            msr(MSR_IA32_TSC),
            msr(MSR_IA32_TSC_DEADLINE),
            self.msrs.len()
        )
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VcpuState {{ id: {}, rip: {:#x}, {} MSRs }}", self.id, self.regs.rip, self.msrs.len())
    }
}

/// The MSRs to save, in the order a restore must write them: the TSC first, its deadline last.
/// The deadline is added when KVM's list leaves it out: without it a restored guest's local
/// APIC timer would never fire again.
pub fn msr_save_order(mut indices: Vec<u32>) -> Vec<u32> {
    if !indices.contains(&MSR_IA32_TSC_DEADLINE) {
        indices.push(MSR_IA32_TSC_DEADLINE);
    }
    let rank = |i: &u32| match *i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    };
    indices.sort_by_key(rank);
    indices
}

fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, String> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> =
            batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let read = fd.get_msrs(&mut msrs).map_err(|e| format!("KVM_GET_MSRS failed: {e}"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        // KVM stops at the first MSR it cannot read: skip that one and go on after it.
        let consumed = if read < batch.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    Ok(out)
}

fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), String> {
    for batch in entries.chunks(MSR_BATCH) {
        let msrs = Msrs::from_entries(batch).map_err(|e| format!("MSR list: {e:?}"))?;
        let written = fd.set_msrs(&msrs).map_err(|e| format!("KVM_SET_MSRS failed: {e}"))?;
        if written < batch.len() {
            return Err(format!("KVM refused MSR {:#x}", batch[written].index));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use crate::vstate::vm::{create_vm, VmState};
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use kvm_ioctls::{Kvm, VcpuExit, VmFd};
    use vm_memory::{Bytes, GuestAddress};

    /// Real mode at 0x1000: `mov al, 0x42; out 0x10, al; inc al; out 0x10, al; jmp $`.
    const PROGRAM: [u8; 9] = [0xb0, 0x42, 0xe6, 0x10, 0xfe, 0xc0, 0xe6, 0x10, 0xeb];

    fn machine(kvm: &Kvm) -> (VmFd, VcpuFd, crate::memory::GuestMemory) {
        let mem = create_guest_memory(1 << 20).unwrap();
        mem.write_slice(&PROGRAM, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xfe], GuestAddress(0x1009)).unwrap(); // jmp $ offset
        let vm = create_vm(kvm, &mem).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        (vm, vcpu, mem)
    }

    fn out_value(vcpu: &mut VcpuFd) -> u8 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(0x10, data) => data[0],
            other => panic!("unexpected exit {other:?}"),
        }
    }

    /// Needs a /dev/kvm that runs real-mode code (this build machine's does; ENVIRONMENT.md).
    #[test]
    fn a_vcpu_and_its_vm_resume_in_another_vm_where_they_stopped() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let indices = msr_save_order(kvm.get_msr_index_list().unwrap().as_slice().to_vec());
        let (vm, mut vcpu, _mem) = machine(&kvm);
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let regs = kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() };
        vcpu.set_regs(&regs).unwrap();
        assert_eq!(out_value(&mut vcpu), 0x42);
        // What park() does before saving: finish the exit without entering the guest.
        vcpu.set_kvm_immediate_exit(1);
        let _ = vcpu.run();
        vcpu.set_kvm_immediate_exit(0);
        let saved = VcpuState::save(0, &vcpu, &indices).unwrap();
        let vm_saved = VmState::save(&vm).unwrap();
        assert_eq!(saved.regs().rip, 0x1004);
        assert!(!saved.msrs.is_empty());
        // Through the file format, as a snapshot carries it.
        let saved: VcpuState = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let vm_saved: VmState = serde_json::from_str(&serde_json::to_string(&vm_saved).unwrap()).unwrap();

        let (vm2, mut vcpu2, _mem2) = machine(&kvm);
        saved.restore(&vcpu2).unwrap();
        vm_saved.restore(&vm2).unwrap();
        let back = VcpuState::save(0, &vcpu2, &indices).unwrap();
        assert_eq!(back.regs().rip, 0x1004);
        assert_eq!(back.regs().rax & 0xff, 0x42);
        assert_eq!(serde_json::to_value(back.sregs).unwrap(), serde_json::to_value(saved.sregs).unwrap());
        assert_eq!(serde_json::to_value(back.lapic).unwrap(), serde_json::to_value(saved.lapic).unwrap());
        assert_eq!(back.msrs.len(), saved.msrs.len());
        // The restored vCPU runs on from the next instruction.
        assert_eq!(out_value(&mut vcpu2), 0x43);
    }

    #[test]
    fn the_tsc_goes_first_and_its_deadline_last() {
        let order = msr_save_order(vec![0x6e0, 0x174, 0x10, 0xc000_0080]);
        assert_eq!(order, vec![0x10, 0x174, 0xc000_0080, 0x6e0]);
        assert_eq!(msr_save_order(vec![0x174, 0x10]), vec![0x10, 0x174, 0x6e0]);
    }
}

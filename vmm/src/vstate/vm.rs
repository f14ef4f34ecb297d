//! The KVM VM: guest memory slots, the in-kernel interrupt controllers and the PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::KVM_TSS_ADDR;
use crate::memory::GuestMemory;

pub fn create_vm(kvm: &Kvm, mem: &GuestMemory) -> Result<VmFd, String> {
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    vm.set_tss_address(KVM_TSS_ADDR as usize).map_err(|e| format!("KVM_SET_TSS_ADDR failed: {e}"))?;
    // The IOAPIC, PIC and local APICs live in the kernel, so irqfds can inject directly.
    vm.create_irq_chip().map_err(|e| format!("KVM_CREATE_IRQCHIP failed: {e}"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(|e| format!("KVM_CREATE_PIT2 failed: {e}"))?;
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes that stays
        // mapped for the whole life of the process (guest memory is never unmapped before
        // exit), so KVM never sees a dangling host address.
        unsafe { vm.set_user_memory_region(r) }.map_err(|e| format!("KVM_SET_USER_MEMORY_REGION failed: {e}"))?;
    }
    Ok(vm)
}

//! The KVM VM: guest memory slots, the in-kernel interrupt controllers and the PIT, and their
//! state in a snapshot.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
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

/// The VM-wide state a snapshot keeps: the guest's clock and the in-kernel interrupt
/// controllers and timer (the local APICs belong to the vCPUs).
#[derive(Serialize, Deserialize)]
pub struct VmState {
    clock: kvm_clock_data,
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
}

const IRQCHIP_PIC_MASTER: u32 = 0;
const IRQCHIP_PIC_SLAVE: u32 = 1;
const IRQCHIP_IOAPIC: u32 = 2;

impl VmState {
    pub fn save(vm: &VmFd) -> Result<VmState, String> {
        let chip = |id: u32| {
            let mut chip = kvm_irqchip { chip_id: id, ..Default::default() };
            vm.get_irqchip(&mut chip).map_err(|e| format!("KVM_GET_IRQCHIP {id} failed: {e}"))?;
            Ok::<_, String>(chip)
        };
        Ok(VmState {
            clock: vm.get_clock().map_err(|e| format!("KVM_GET_CLOCK failed: {e}"))?,
            pic_master: chip(IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(|e| format!("KVM_GET_PIT2 failed: {e}"))?,
        })
    }

    /// Puts the state into a VM made by [`create_vm`] (its irqchip and PIT exist).
    pub fn restore(&self, vm: &VmFd) -> Result<(), String> {
        vm.set_pit2(&self.pit).map_err(|e| format!("KVM_SET_PIT2 failed: {e}"))?;
        // The guest's clock continues from where it stopped rather than jumping by the time
        // the snapshot lay on disk (no KVM_CLOCK_REALTIME): its timers don't all fire at once,
        // and the agent sets the wall clock afterwards.
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        vm.set_clock(&clock).map_err(|e| format!("KVM_SET_CLOCK failed: {e}"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(|e| format!("KVM_SET_IRQCHIP {} failed: {e}", chip.chip_id))?;
        }
        Ok(())
    }
}

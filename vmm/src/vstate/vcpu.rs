//! One vCPU thread: runs KVM_RUN and hands port and MMIO exits to the bus until the guest
//! stops the machine or something goes wrong.

use std::sync::Arc;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::pause::Pause;
use super::vcpu_state::VcpuState;
use crate::devices::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::timeline::{self, Once};

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    /// The MSRs a snapshot saves, in restore order.
    pub msr_indices: Vec<u32>,
}

impl Vcpu {
    /// Runs until the VM must stop; the reason is reported through `exit`. When `pause` asks,
    /// saves this vCPU's state and waits until it may go on.
    pub fn run(mut self, bus: Arc<Bus>, exit: Arc<ExitSignal>, pause: Arc<Pause>) {
        loop {
            if exit.reason().is_some() {
                return;
            }
            if pause.requested() {
                self.park(&pause);
                continue;
            }
            if self.id == 0 {
                timeline::once(Once::KvmRun, "first KVM_RUN");
            }
            let result = self.fd.run();
            if self.id == 0 {
                timeline::once(Once::UserspaceExit, "first exit to userspace");
            }
            match result {
                Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
                Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
                Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
                // A triple fault: what a PC does next is reset, and Linux uses it as its
                // last-resort reboot method.
                Ok(VcpuExit::Shutdown) => exit.request(ExitReason::Reboot),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => exit.request(ExitReason::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => exit.request(ExitReason::Reboot),
                    KVM_SYSTEM_EVENT_CRASH => exit.request(ExitReason::Panic),
                    other => exit.fail(format!("vCPU {}: unknown system event {other}", self.id)),
                },
                // The in-kernel local APIC handles HLT; seeing it here means a halted CPU
                // with nothing left to wake it.
                Ok(VcpuExit::Hlt) => exit.fail(format!("vCPU {} halted for good", self.id)),
                Ok(VcpuExit::FailEntry(reason, cpu)) => exit
                    .fail(format!("vCPU {}: KVM could not enter the guest (reason {reason:#x}, cpu {cpu})", self.id)),
                Ok(VcpuExit::InternalError) => exit.fail(format!("vCPU {}: KVM internal error", self.id)),
                Ok(other) => exit.fail(format!("vCPU {}: unexpected exit {other:?}", self.id)),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => exit.fail(format!("vCPU {}: KVM_RUN failed: {e}", self.id)),
            }
        }
    }

    fn park(&mut self, pause: &Pause) {
        // An I/O exit we just served is only complete once KVM_RUN ran again (an IN's value
        // goes into the guest's register then). With immediate_exit set, KVM finishes it and
        // returns EINTR without entering the guest, so the state read next is consistent.
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        pause.park(self.id, VcpuState::save(self.id, &self.fd, &self.msr_indices));
    }
}

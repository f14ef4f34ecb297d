//! Per-vCPU CPUID: what KVM supports on this host, with each vCPU's APIC id and the
//! processor count patched in so the guest enumerates its CPUs consistently.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;
const EDX_HTT: u32 = 1 << 28;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;

/// Rewrites `entries` (a copy of the supported CPUID) for vCPU `id` of `count`.
/// `tsc_deadline`: KVM emulates the local APIC's TSC-deadline timer mode
/// (KVM_CAP_TSC_DEADLINE_TIMER) but KVM_GET_SUPPORTED_CPUID never lists it, so the VMM must. A
/// guest without it calibrates the APIC timer against the PIT at boot (a busy wait, about
/// 100 ms of guest time).
pub fn patch_for_vcpu(entries: &mut [kvm_cpuid_entry2], id: u8, count: u8, tsc_deadline: bool) {
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    e.edx |= EDX_HTT;
                }
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => e.edx = u32::from(id),
            LEAF_AMD_EXT_APIC_ID => e.eax = u32::from(id),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0xdead_beef, edx: 0x1234, ..Default::default() }
    }

    #[test]
    fn apic_id_and_count_land_in_every_topology_leaf() {
        let mut entries = vec![leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1), leaf(0x1f, 0), leaf(7, 0)];
        patch_for_vcpu(&mut entries, 3, 4, true);
        assert_eq!(entries[0].ebx, 0x0304_beef);
        assert_eq!(entries[0].ecx & ECX_TSC_DEADLINE, ECX_TSC_DEADLINE);
        assert_eq!(entries[0].edx & EDX_HTT, EDX_HTT);
        assert_eq!(entries[0].ecx & ECX_HYPERVISOR, ECX_HYPERVISOR);
        assert_eq!((entries[1].edx, entries[2].edx, entries[3].edx), (3, 3, 3));
        // Unrelated leaves are untouched.
        assert_eq!((entries[4].ebx, entries[4].edx), (0xdead_beef, 0x1234));
    }

    #[test]
    fn tsc_deadline_only_where_kvm_emulates_it() {
        let mut entries = vec![leaf(1, 0)];
        patch_for_vcpu(&mut entries, 0, 1, false);
        assert_eq!(entries[0].ecx & ECX_TSC_DEADLINE, 0);
    }
}

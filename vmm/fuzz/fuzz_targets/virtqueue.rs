//! Drives the virtqueue (`vmm::fuzzing::Queue`) with rings and descriptor chains a hostile
//! guest wrote: every chain it accepts must be one a device may touch without further
//! checks, and nothing may panic or loop. See common.rs for the input layout.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryBackend;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut q, _)) = common::load(data) else { return };
    if !q.is_valid(mem) {
        // Only the sizes a driver may program reach the rings.
        assert!(q.size == 0 || q.size > q.max_size || !q.size.is_power_of_two());
        return;
    }
    // More pops than the ring holds: the queue itself must stop the guest from looping us.
    for _ in 0..=2 * u32::from(q.size) {
        match q.pop(mem) {
            Ok(None) | Err(_) => break,
            Ok(Some((head, chain))) => {
                assert!(head < q.size);
                let written = match chain {
                    Ok(chain) => {
                        assert_eq!(chain.head, head);
                        assert!(!chain.descriptors.is_empty() && chain.descriptors.len() <= q.size as usize);
                        for d in &chain.descriptors {
                            assert!(d.len > 0 && mem.check_range(d.addr, d.len as usize), "{d:?}");
                        }
                        chain.descriptors.iter().filter(|d| d.writable).map(|d| d.len).fold(0u32, u32::saturating_add)
                    }
                    Err(_) => 0,
                };
                if q.add_used(mem, head, written).is_err() {
                    break;
                }
                let _ = q.wants_interrupt(mem);
            }
        }
    }
});

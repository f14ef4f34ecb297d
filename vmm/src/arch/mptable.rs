//! The Intel MultiProcessor Specification 1.4 table: how a guest kernel built without ACPI
//! (our sandbox kernel) learns its CPUs, the IOAPIC and the ISA interrupt routing.
//! Linux finds the floating pointer by scanning the last KiB of base memory.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{EBDA_START, IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};
use crate::memory::GuestMemory;

pub const MPTABLE_ADDR: u64 = EBDA_START;
// Linux scans 639K..640K in 16-byte steps: the pointer must be aligned inside it.
const _: () = assert!(MPTABLE_ADDR >= 639 * 1024 && MPTABLE_ADDR.is_multiple_of(16));
const SPEC_REV: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 signature and FPU|APIC feature flags: only informative for Linux.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The configuration table (header and entries) for `vcpus` CPUs, placed at `addr`.
fn config_table(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus; // after the last local APIC id
    let mut entries = Vec::new();
    let mut count = 0u16;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS as u8 {
        // Flags 0: polarity and trigger mode conform to the (ISA) bus: active high, edge.
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, ISA_BUS_ID, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 takes the legacy PIC's ExtINT, LINT1 the NMI, on every CPU (id 0xff).
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, ISA_BUS_ID, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    count += 2;

    let len = 44 + entries.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&(len as u16).to_le_bytes());
    t.push(SPEC_REV);
    t.push(0); // checksum
    t.extend_from_slice(b"OPNCMP  "); // OEM id, 8 bytes
    t.extend_from_slice(b"OCVMM       "); // product id, 12 bytes
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    t.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// Writes the floating pointer at `MPTABLE_ADDR` followed by the configuration table.
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), String> {
    let table_addr = MPTABLE_ADDR + 16;
    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, rev, checksum, features
    fp[10] = checksum(&fp);
    mem.write_slice(&fp, GuestAddress(MPTABLE_ADDR)).map_err(|e| format!("cannot write the MP table: {e}"))?;
    mem.write_slice(&config_table(vcpus), GuestAddress(table_addr))
        .map_err(|e| format!("cannot write the MP table: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_leads_to_a_valid_table() {
        let mem = create_guest_memory(32 << 20).unwrap();
        write(&mem, 3).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_ADDR)).unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0);
        let table_addr = u64::from(u32::from_le_bytes(fp[4..8].try_into().unwrap()));
        let mut head = [0u8; 44];
        mem.read_slice(&mut head, GuestAddress(table_addr)).unwrap();
        assert_eq!(&head[..4], b"PCMP");
        let len = u16::from_le_bytes([head[4], head[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(table_addr)).unwrap();
        assert_eq!(sum(&table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(u32::from(count), 3 + 1 + 1 + IOAPIC_PINS + 2);
        // Walk the entries: processors come first, CPU 0 is the bootstrap processor.
        let mut at = 44;
        let mut cpus = Vec::new();
        for _ in 0..count {
            let size = if table[at] == ENTRY_PROCESSOR { 20 } else { 8 };
            if table[at] == ENTRY_PROCESSOR {
                cpus.push((table[at + 1], table[at + 3]));
            }
            at += size;
        }
        assert_eq!(at, len, "entry sizes add up to the table length");
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1)]);
    }
}

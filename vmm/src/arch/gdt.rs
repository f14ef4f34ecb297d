//! The boot GDT: flat 64-bit code and data segments at the selectors the Linux 64-bit boot
//! protocol expects (__BOOT_CS = 0x10, __BOOT_DS = 0x18), plus a TSS for KVM's entry checks.

use kvm_bindings::kvm_segment;

/// Access/flag bits (bits 40..55 of a descriptor, without the limit nibble).
const CODE64_FLAGS: u16 = 0xa09b; // G, L, present, DPL 0, code, execute/read, accessed
const DATA_FLAGS: u16 = 0xc093; // G, D/B, present, DPL 0, data, read/write, accessed
const TSS_FLAGS: u16 = 0x808b; // G, present, 64-bit busy TSS

pub const CODE_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;

/// Packs one 8-byte segment descriptor.
pub fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The table, indexed by selector / 8.
pub fn boot_gdt() -> [u64; 5] {
    [0, 0, descriptor(CODE64_FLAGS, 0, 0xfffff), descriptor(DATA_FLAGS, 0, 0xfffff), descriptor(TSS_FLAGS, 0, 0xfffff)]
}

/// The hidden segment-register state KVM wants for a descriptor loaded at `selector`.
pub fn segment(descriptor: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((descriptor >> n) & 1) as u8;
    let base = ((descriptor >> 16) & 0x00ff_ffff) | ((descriptor >> 32) & 0xff00_0000);
    let raw_limit = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
    let g = bit(55);
    let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        s: bit(44),
        dpl: ((descriptor >> 45) & 3) as u8,
        present: bit(47),
        avl: bit(52),
        l: bit(53),
        db: bit(54),
        g,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_flat_long_mode() {
        let gdt = boot_gdt();
        // The well-known encoding of a flat 64-bit kernel code descriptor.
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
        let cs = segment(gdt[2], CODE_SELECTOR);
        assert_eq!(
            (cs.base, cs.limit, cs.type_, cs.l, cs.db, cs.g, cs.present, cs.s),
            (0, 0xffff_ffff, 0xb, 1, 0, 1, 1, 1)
        );
        let ds = segment(gdt[3], DATA_SELECTOR);
        assert_eq!((ds.type_, ds.l, ds.db, ds.s), (3, 0, 1, 1));
        let tr = segment(gdt[4], TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
    }

    #[test]
    fn descriptor_splits_base_and_limit() {
        let d = descriptor(0x0093, 0x1234_5678, 0xabcde);
        let s = segment(d, 0);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.g, 0);
    }
}

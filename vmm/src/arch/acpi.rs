//! Minimal ACPI tables (written only when the configuration asks for ACPI):
//! RSDP -> XSDT -> {FADT -> DSDT, MADT}.
//!
//! The MADT tells the guest its CPUs and IOAPIC. The FADT is hardware-reduced, and a
//! kernel in that mode maps no legacy interrupt by itself, so the DSDT must declare every
//! device that has an interrupt: COM1 and each virtio-mmio window (`LNRO0005`, the id
//! Linux's virtio_mmio driver matches). Its `_S5_` object gives Linux an ACPI power-off:
//! SLP_TYP|SLP_EN written to our sleep-control port. Layouts follow ACPI 6.x.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_TABLES_END, ACPI_TABLES_START, COM1_IRQ,
    COM1_PORT, COM1_PORT_COUNT, IOAPIC_ADDR, LAPIC_ADDR, VIRTIO_MMIO_SIZE,
};
use crate::memory::GuestMemory;

const RSDP_ADDR: u64 = ACPI_TABLES_START;
const XSDT_ADDR: u64 = ACPI_TABLES_START + 0x40;
const FADT_ADDR: u64 = ACPI_TABLES_START + 0x100;
const MADT_ADDR: u64 = ACPI_TABLES_START + 0x300;
/// Last, so the variable-size device list has the rest of the area.
const DSDT_ADDR: u64 = ACPI_TABLES_START + 0x1000;

const HEADER_LEN: usize = 36;
const FADT_LEN: usize = 276;
const FADT_FLAG_PWR_BUTTON: u32 = 1 << 4; // "no fixed power button"
const FADT_FLAG_SLP_BUTTON: u32 = 1 << 5; // "no fixed sleep button"
const FADT_FLAG_HW_REDUCED: u32 = 1 << 20;
/// IA-PC boot flags: no VGA, no MSI, no CMOS RTC (and, by omission, no 8042: Linux then
/// skips probing a keyboard it would only time out on).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 5);
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;
const MADT_TYPE_LAPIC: u8 = 0;
const MADT_TYPE_IOAPIC: u8 = 1;
const MADT_LAPIC_ENABLED: u32 = 1;

/// A virtio-mmio window the DSDT declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub irq: u32,
}

/// Returns the RSDP address after writing all tables for a guest with `vcpus` CPUs.
pub fn write_tables(mem: &GuestMemory, vcpus: u8, devices: &[MmioDevice]) -> Result<u64, String> {
    let tables: [(u64, Vec<u8>); 5] = [
        (RSDP_ADDR, rsdp(XSDT_ADDR)),
        (XSDT_ADDR, xsdt(&[FADT_ADDR, MADT_ADDR])),
        (FADT_ADDR, fadt(DSDT_ADDR)),
        (MADT_ADDR, madt(vcpus)),
        (DSDT_ADDR, dsdt(devices)),
    ];
    for (i, (addr, bytes)) in tables.iter().enumerate() {
        let limit = tables.get(i + 1).map_or(ACPI_TABLES_END, |next| next.0);
        if addr + bytes.len() as u64 > limit {
            return Err(format!("ACPI table at {addr:#x} is too big ({} bytes)", bytes.len()));
        }
        mem.write_slice(bytes, GuestAddress(*addr)).map_err(|e| format!("cannot write ACPI tables: {e}"))?;
    }
    Ok(RSDP_ADDR)
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// A system description table: the common header followed by `body`, checksummed.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, filled below
    t.extend_from_slice(b"OPNCMP"); // OEM id
    t.extend_from_slice(b"OCVMM   "); // OEM table id
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"OCVM"); // creator id
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(b"OPNCMP");
    r.push(2); // revision: ACPI 2.0+ (has the XSDT)
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.push(0); // extended checksum of all 36 bytes
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|a| a.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &body)
}

/// A generic address structure for a one-byte I/O port register.
fn io_port_gas(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = GAS_SYSTEM_IO;
    g[1] = 8; // register bit width
    g[3] = GAS_ACCESS_BYTE;
    g[4..12].copy_from_slice(&(port as u64).to_le_bytes());
    g
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut body = vec![0u8; FADT_LEN - HEADER_LEN];
    // Offsets below are from the table start; `at` converts to body offsets.
    let at = |off: usize| off - HEADER_LEN;
    body[at(109)..at(111)].copy_from_slice(&IAPC_BOOT_ARCH.to_le_bytes());
    let flags = FADT_FLAG_HW_REDUCED | FADT_FLAG_PWR_BUTTON | FADT_FLAG_SLP_BUTTON;
    body[at(112)..at(116)].copy_from_slice(&flags.to_le_bytes());
    body[at(131)] = 5; // FADT minor version (ACPI 6.5)
    body[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes()); // X_DSDT
    body[at(244)..at(256)].copy_from_slice(&io_port_gas(ACPI_SLEEP_CONTROL_PORT));
    body[at(256)..at(268)].copy_from_slice(&io_port_gas(ACPI_SLEEP_STATUS_PORT));
    body[at(268)..at(276)].copy_from_slice(b"OCVMM\0\0\0"); // hypervisor vendor identity
    sdt(b"FACP", 6, &body)
}

/// AML for `Name (_S5_, Package () { 5, 0 })`, the only object the guest needs.
fn s5_aml() -> Vec<u8> {
    const NAME_OP: u8 = 0x08;
    const PACKAGE_OP: u8 = 0x12;
    const BYTE_PREFIX: u8 = 0x0a;
    const ZERO_OP: u8 = 0x00;
    // PkgLength counts itself, NumElements and the two elements (2 + 1 bytes).
    let elements = [BYTE_PREFIX, ACPI_S5_SLEEP_TYPE, ZERO_OP];
    let pkg_len = 1 + 1 + elements.len();
    let mut aml = vec![NAME_OP, b'_', b'S', b'5', b'_', PACKAGE_OP, pkg_len as u8, 2];
    aml.extend_from_slice(&elements);
    aml
}

/// AML PkgLength for a package whose contents (after the length) are `body_len` bytes.
fn pkg_length(body_len: usize) -> Vec<u8> {
    if body_len + 1 < 0x40 {
        vec![(body_len + 1) as u8]
    } else if body_len + 2 < 0x1000 {
        let total = body_len + 2;
        vec![0x40 | (total & 0xf) as u8, (total >> 4) as u8]
    } else {
        let total = body_len + 3;
        vec![0x80 | (total & 0xf) as u8, (total >> 4) as u8, (total >> 12) as u8]
    }
}

/// `op PkgLength body`.
fn aml_package(op: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = op.to_vec();
    v.extend(pkg_length(body.len()));
    v.extend_from_slice(body);
    v
}

/// `Scope (\_SB) { Device (COM1) { _HID PNP0501, _UID 1, _STA 0xF, _CRS { IO 0x3f8/8, IRQ 4 } } }`.
///
/// A hardware-reduced ACPI kernel maps no ISA interrupt by itself: without this device
/// the 8250 driver can't get IRQ 4 and every userspace write to the console fails.
fn com1_aml() -> Vec<u8> {
    const NAME_OP: u8 = 0x08;
    const SCOPE_OP: u8 = 0x10;
    const DEVICE_OP: [u8; 2] = [0x5b, 0x82];
    const BUFFER_OP: u8 = 0x11;
    const DWORD_PREFIX: u8 = 0x0c;
    const BYTE_PREFIX: u8 = 0x0a;
    const ONE_OP: u8 = 0x01;
    let port = COM1_PORT.to_le_bytes();
    let mut resources = vec![0x47, 0x01, port[0], port[1], port[0], port[1], 0x00, COM1_PORT_COUNT as u8];
    resources.extend_from_slice(&[0x22]); // IRQNoFlags: a 16-bit mask follows
    resources.extend_from_slice(&(1u16 << COM1_IRQ).to_le_bytes());
    resources.extend_from_slice(&[0x79, 0x00]); // end tag
    let mut buffer = vec![BYTE_PREFIX, resources.len() as u8];
    buffer.extend_from_slice(&resources);

    let mut device = b"COM1".to_vec();
    device.extend_from_slice(&[NAME_OP, b'_', b'H', b'I', b'D', DWORD_PREFIX, 0x41, 0xd0, 0x05, 0x01]); // EisaId("PNP0501")
    device.extend_from_slice(&[NAME_OP, b'_', b'U', b'I', b'D', ONE_OP]);
    device.extend_from_slice(&[NAME_OP, b'_', b'S', b'T', b'A', BYTE_PREFIX, 0x0f]);
    device.extend_from_slice(&[NAME_OP, b'_', b'C', b'R', b'S']);
    device.extend(aml_package(&[BUFFER_OP], &buffer));
    let mut scope = b"_SB_".to_vec();
    scope.extend(aml_package(&DEVICE_OP, &device));
    aml_package(&[SCOPE_OP], &scope)
}

/// `Scope (\\_SB) { Device (VRnn) { _HID "LNRO0005", _UID n, _CRS { Memory32Fixed (RW,
/// base, 4K), Interrupt (consumer, edge, active high, exclusive) { irq } } } ... }`.
fn virtio_aml(devices: &[MmioDevice]) -> Vec<u8> {
    const NAME_OP: u8 = 0x08;
    const SCOPE_OP: u8 = 0x10;
    const DEVICE_OP: [u8; 2] = [0x5b, 0x82];
    const BUFFER_OP: u8 = 0x11;
    const STRING_PREFIX: u8 = 0x0d;
    const BYTE_PREFIX: u8 = 0x0a;
    let mut scope = b"_SB_".to_vec();
    for (i, d) in devices.iter().enumerate() {
        let mut resources = vec![0x86, 0x09, 0x00, 0x01]; // Memory32Fixed, read/write
        resources.extend_from_slice(&(d.base as u32).to_le_bytes());
        resources.extend_from_slice(&(VIRTIO_MMIO_SIZE as u32).to_le_bytes());
        resources.extend_from_slice(&[0x89, 0x06, 0x00, 0x03, 0x01]); // Interrupt: consumer|edge, 1 entry
        resources.extend_from_slice(&d.irq.to_le_bytes());
        resources.extend_from_slice(&[0x79, 0x00]);
        let mut buffer = vec![BYTE_PREFIX, resources.len() as u8];
        buffer.extend_from_slice(&resources);

        let mut device = format!("VR{:02X}", i).into_bytes();
        device.extend_from_slice(&[NAME_OP, b'_', b'H', b'I', b'D', STRING_PREFIX]);
        device.extend_from_slice(b"LNRO0005\0");
        device.extend_from_slice(&[NAME_OP, b'_', b'U', b'I', b'D', BYTE_PREFIX, i as u8]);
        device.extend_from_slice(&[NAME_OP, b'_', b'C', b'R', b'S']);
        device.extend(aml_package(&[BUFFER_OP], &buffer));
        scope.extend(aml_package(&DEVICE_OP, &device));
    }
    aml_package(&[SCOPE_OP], &scope)
}

fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut aml = s5_aml();
    aml.extend(com1_aml());
    if !devices.is_empty() {
        aml.extend(virtio_aml(devices));
    }
    sdt(b"DSDT", 2, &aml)
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // flags: no dual 8259 setup
    for id in 0..vcpus {
        body.extend_from_slice(&[MADT_TYPE_LAPIC, 8, id, id]);
        body.extend_from_slice(&MADT_LAPIC_ENABLED.to_le_bytes());
    }
    body.extend_from_slice(&[MADT_TYPE_IOAPIC, 12, vcpus, 0]);
    body.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    sdt(b"APIC", 5, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }
    fn table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let len = u32_at(&read(mem, addr, 8), 4) as usize;
        let t = read(mem, addr, len);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum of {:?}", &t[..4]);
        t
    }

    #[test]
    fn guest_can_walk_from_rsdp_to_every_table() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let devices = [MmioDevice { base: 0xd000_0000, irq: 5 }, MmioDevice { base: 0xd000_1000, irq: 6 }];
        let rsdp_addr = write_tables(&mem, 4, &devices).unwrap();
        let rsdp = read(&mem, rsdp_addr, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(rsdp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let xsdt = table(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = table(&mem, u64_at(&xsdt, 36));
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(fadt.len(), FADT_LEN);
        assert_ne!(u32_at(&fadt, 112) & FADT_FLAG_HW_REDUCED, 0);
        // Sleep control register: system I/O, the port the VMM watches.
        assert_eq!(fadt[244], GAS_SYSTEM_IO);
        assert_eq!(u64_at(&fadt, 248), ACPI_SLEEP_CONTROL_PORT as u64);
        assert_eq!(u64_at(&fadt, 260), ACPI_SLEEP_STATUS_PORT as u64);
        let dsdt = table(&mem, u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(&dsdt[36..47], &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 5, 0x00]);
        let com1 = com1_aml();
        assert_eq!(&dsdt[47..47 + com1.len()], com1.as_slice());
        assert_eq!(&dsdt[47 + com1.len()..], virtio_aml(&devices).as_slice());
        let madt = table(&mem, u64_at(&xsdt, 44));
        assert_eq!(&madt[..4], b"APIC");
        let lapics: Vec<u8> = madt[44..]
            .chunks(8)
            .take(4)
            .map(|e| {
                assert_eq!(e[0], 0);
                e[3]
            })
            .collect();
        assert_eq!(lapics, vec![0, 1, 2, 3]);
        let ioapic = &madt[44 + 32..];
        assert_eq!((ioapic[0], ioapic[1]), (MADT_TYPE_IOAPIC, 12));
        assert_eq!(u32_at(ioapic, 4), IOAPIC_ADDR as u32);
    }

    #[test]
    fn com1_device_aml_is_well_formed() {
        let aml = com1_aml();
        // Scope: op, one-byte PkgLength covering everything after the op.
        assert_eq!(aml[0], 0x10);
        assert_eq!(aml[1] as usize, aml.len() - 1);
        assert_eq!(&aml[2..6], b"_SB_");
        // Device: ExtOp DeviceOp, PkgLength, name.
        assert_eq!(&aml[6..8], &[0x5b, 0x82]);
        assert_eq!(aml[8] as usize, aml.len() - 8);
        assert_eq!(&aml[9..13], b"COM1");
        let find = |needle: &[u8]| aml.windows(needle.len()).position(|w| w == needle);
        assert!(find(&[0x41, 0xd0, 0x05, 0x01]).is_some(), "EisaId PNP0501");
        let io = find(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08]).expect("IO descriptor");
        assert_eq!(&aml[io + 8..io + 13], &[0x22, 0x10, 0x00, 0x79, 0x00], "IRQ 4 then end tag");
        // The buffer's declared size matches the descriptors it holds.
        assert_eq!(aml[io - 1], 13);
        assert_eq!(aml[io - 2], 0x0a);
    }

    #[test]
    fn virtio_devices_are_declared_with_window_and_interrupt() {
        let aml = virtio_aml(&[MmioDevice { base: 0xd000_0000, irq: 5 }, MmioDevice { base: 0xd000_1000, irq: 6 }]);
        assert_eq!(aml[0], 0x10);
        // Two-byte PkgLength: low nibble in byte 1, the rest in byte 2, counting itself.
        let scope_len = ((aml[1] & 0x0f) as usize) | ((aml[2] as usize) << 4);
        assert_eq!(aml[1] & 0xc0, 0x40);
        assert_eq!(scope_len, aml.len() - 1);
        assert_eq!(&aml[3..7], b"_SB_");
        let find_all = |needle: &[u8]| aml.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(find_all(b"LNRO0005\0"), 2);
        assert_eq!(find_all(&[0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00]), 1);
        assert_eq!(find_all(&[0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00]), 1);
        assert_eq!(find_all(&[0x89, 0x06, 0x00, 0x03, 0x01, 5, 0, 0, 0, 0x79, 0x00]), 1);
        assert_eq!(find_all(&[0x89, 0x06, 0x00, 0x03, 0x01, 6, 0, 0, 0, 0x79, 0x00]), 1);
        assert_eq!(find_all(b"VR00"), 1);
        assert_eq!(find_all(b"VR01"), 1);
        // Each device's PkgLength covers exactly its own bytes.
        let dev = aml.windows(2).position(|w| w == [0x5b, 0x82]).unwrap();
        let len = aml[dev + 2] as usize;
        assert_eq!(&aml[dev + 2 + len..dev + 2 + len + 2], &[0x5b, 0x82]);
    }

    #[test]
    fn pkg_length_switches_to_two_bytes_at_64() {
        assert_eq!(pkg_length(10), vec![11]);
        assert_eq!(pkg_length(62), vec![63]);
        // 63 body bytes + 2 length bytes = 65 = 0x41: low nibble 1 in byte 0, 0x4 in byte 1.
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
        assert_eq!(pkg_length(4093), vec![0x4f, 0xff]);
        // 4094 + 3 = 4097 = 0x1001.
        assert_eq!(pkg_length(4094), vec![0x81, 0x00, 0x01]);
    }

    #[test]
    fn the_largest_madt_still_fits() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let devices: Vec<MmioDevice> =
            (0..9).map(|i| MmioDevice { base: 0xd000_0000 + i * 0x1000, irq: 5 + i as u32 }).collect();
        assert!(write_tables(&mem, crate::layout::MAX_VCPUS, &devices).is_ok());
    }
}

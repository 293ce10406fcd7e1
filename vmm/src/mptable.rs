//! An Intel MultiProcessor table (MP spec 1.4) so Linux finds every vCPU and the IOAPIC
//! without ACPI. Floating pointer and configuration table sit together in the last KiB of
//! base memory (0x9fc00), which Linux scans and our memory map marks reserved.

use vm_memory::{Bytes, GuestAddress};

use crate::boot::EBDA_START;
use crate::error::VmError;
use crate::memory::GuestMemory;

/// Most vCPUs whose table fits in the 1 KiB block.
pub const MAX_VCPUS: u8 = 32;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const IOAPIC_PINS: u8 = 24;
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6, as a plain signature; feature flags: FPU and on-chip APIC.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | 1;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INT: u8 = 3;
const ENTRY_LOCAL_INT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The configuration table entries after the header; returns (bytes, entry count).
fn entries(vcpus: u8) -> (Vec<u8>, u16) {
    let ioapic_id = vcpus;
    let mut out = Vec::new();
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        out.extend([ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        out.extend(CPU_SIGNATURE.to_le_bytes());
        out.extend(CPU_FEATURES.to_le_bytes());
        out.extend([0u8; 8]);
    }
    out.extend([ENTRY_BUS, 0]);
    out.extend(*b"ISA   ");
    out.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    out.extend(IOAPIC_ADDR.to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // ISA IRQ n arrives on IOAPIC pin n, active/trigger per bus default.
        out.extend([ENTRY_IO_INT, INT_TYPE_INT, 0, 0, 0, pin, ioapic_id, pin]);
    }
    out.extend([ENTRY_LOCAL_INT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    out.extend([ENTRY_LOCAL_INT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let count = u16::from(vcpus) + 2 + u16::from(IOAPIC_PINS) + 2;
    (out, count)
}

/// The floating pointer followed by the configuration table, as placed at `EBDA_START`.
fn table(vcpus: u8) -> Vec<u8> {
    let config_addr = (EBDA_START as usize + FLOATING_LEN) as u32;
    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend(*b"_MP_");
    floating.extend(config_addr.to_le_bytes());
    floating.extend([1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    let (body, count) = entries(vcpus);
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend(*b"PCMP");
    header.extend(((HEADER_LEN + body.len()) as u16).to_le_bytes());
    header.extend([SPEC_REV, 0]);
    header.extend(*b"HUSK    ");
    header.extend(*b"MICROVM     ");
    header.extend([0u8; 6]); // OEM table pointer and size
    header.extend(count.to_le_bytes());
    header.extend(LAPIC_ADDR.to_le_bytes());
    header.extend([0u8; 4]); // extended table length, checksum, reserved
    let mut config = header;
    config.extend(body);
    config[7] = checksum(&config);
    floating.extend(config);
    floating
}

/// Writes the MP table for `vcpus` processors.
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), VmError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(VmError::Config(format!(
            "vCPU count {vcpus} is outside 1..={MAX_VCPUS}"
        )));
    }
    mem.write_slice(&table(vcpus), GuestAddress(EBDA_START))
        .map_err(|e| VmError::Memory(format!("MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_fits_and_checksums() {
        let t = table(MAX_VCPUS);
        assert!(t.len() <= 0x400, "{} bytes", t.len());
        assert_eq!(checksum(&t[..FLOATING_LEN]), 0);
        assert_eq!(checksum(&t[FLOATING_LEN..]), 0);
        let len = u16::from_le_bytes([t[FLOATING_LEN + 4], t[FLOATING_LEN + 5]]) as usize;
        assert_eq!(len, t.len() - FLOATING_LEN);
    }
}

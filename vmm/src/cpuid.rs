//! The CPUID table each vCPU sees: what KVM supports, with this vCPU's APIC id and topology
//! patched in, and the hypervisor bit set so the guest looks for KVM's paravirt leaves
//! (0x4000_0000.., kept as KVM reports them).

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::error::VmError;

const LEAF_FEATURES: u32 = 1;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
/// AMD: ECX[7:0] is the number of cores in the package minus one.
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Leaf 1 ECX: the LAPIC offers a TSC-deadline timer.
const ECX_TSC_DEADLINE: u32 = 1 << 24;

/// KVM's supported CPUID, fetched once per VM. KVM emulates the TSC-deadline timer but does not
/// list it (VMMs opt in); offering it spares the guest its LAPIC timer calibration against the
/// PIT, which costs a noticeable share of boot time under nested virtualisation.
pub fn supported(kvm: &Kvm) -> Result<CpuId, VmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::kvm("get supported cpuid"))?;
    if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        for e in cpuid.as_mut_slice() {
            if e.function == LEAF_FEATURES {
                e.ecx |= ECX_TSC_DEADLINE;
            }
        }
    }
    Ok(cpuid)
}

/// The table for vCPU `index` of `count`, modelled as one socket of `count` single-thread
/// cores, so the APIC id equals the vCPU index.
pub fn for_vcpu(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    let apic_id = u32::from(index);
    // Bits needed to number `count` cores (x2APIC id shift for the core level).
    let core_bits = u32::from(count).next_power_of_two().trailing_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                (e.eax, e.ebx, e.ecx) = match e.index {
                    0 => (0, 1, (LEVEL_SMT << 8)),
                    1 => (core_bits, u32::from(count), (LEVEL_CORE << 8) | 1),
                    i => (0, 0, i),
                };
            }
            LEAF_AMD_SIZES => e.ecx = (e.ecx & !0xff) | (u32::from(count) - 1),
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_topology_are_per_vcpu() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).unwrap();
        let c = for_vcpu(&base, 2, 3);
        let e = c.as_slice();
        assert_eq!(e[0].ebx, 0x0203_0800);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!((e[1].eax, e[1].ebx, e[1].edx), (2, 3, 2));
    }
}

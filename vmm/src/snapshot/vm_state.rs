//! VM-wide KVM state: the in-kernel PICs and IOAPIC, the PIT and the kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::error::VmError;

/// The in-kernel chips in the order saved: PIC master, PIC slave, IOAPIC.
const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// VM-wide state; `None` where the VM had no such device or KVM could not read it (then the
/// snapshot's `skipped` list says why).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Option<Vec<kvm_irqchip>>,
    /// The i8254 PIT.
    pub pit: Option<kvm_pit_state2>,
    /// The kvmclock (guest nanoseconds) at the snapshot.
    pub clock: Option<kvm_clock_data>,
}

/// Reads the VM-wide state of a paused VM; what KVM refuses to give is recorded in `skipped`.
pub fn save(vm_fd: &VmFd, irqchip: bool, skipped: &mut Vec<String>) -> Result<KvmVmState, VmError> {
    let mut state = KvmVmState {
        irqchips: None,
        pit: None,
        clock: None,
    };
    if irqchip {
        // The irqchip is not optional: without it interrupts in flight would be lost.
        state.irqchips = Some(save_irqchips(vm_fd)?);
        state.pit = match vm_fd.get_pit2() {
            Ok(pit) => Some(pit),
            Err(e) => {
                skipped.push(format!("PIT: {e}"));
                None
            }
        };
    }
    state.clock = match vm_fd.get_clock() {
        Ok(clock) => Some(clock),
        Err(e) => {
            skipped.push(format!("kvmclock: {e}"));
            None
        }
    };
    Ok(state)
}

fn save_irqchips(vm_fd: &VmFd) -> Result<Vec<kvm_irqchip>, VmError> {
    CHIPS
        .iter()
        .map(|&chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm_fd
                .get_irqchip(&mut chip)
                .map(|()| chip)
                .map_err(VmError::kvm("get irqchip"))
        })
        .collect()
}

/// Writes the saved state into a new VM that has the same devices.
pub fn restore(vm_fd: &VmFd, state: &KvmVmState) -> Result<(), VmError> {
    for chip in state.irqchips.iter().flatten() {
        vm_fd
            .set_irqchip(chip)
            .map_err(|e| VmError::SnapshotUnsupported(format!("irqchip {}: {e}", chip.chip_id)))?;
    }
    if let Some(pit) = &state.pit {
        vm_fd
            .set_pit2(pit)
            .map_err(|e| VmError::SnapshotUnsupported(format!("PIT: {e}")))?;
    }
    if let Some(saved) = &state.clock {
        // Only the clock value: the guest's time goes on from where it stopped (flags such as
        // KVM_CLOCK_REALTIME would make KVM add the time the snapshot lay on disk).
        let clock = kvm_clock_data {
            clock: saved.clock,
            ..Default::default()
        };
        vm_fd
            .set_clock(&clock)
            .map_err(|e| VmError::SnapshotUnsupported(format!("kvmclock: {e}")))?;
    }
    Ok(())
}

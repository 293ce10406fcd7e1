//! Where a running guest's vCPUs are: for the error of a guest that stopped answering, so the
//! report says whether it spins (and where), sleeps with its timer disarmed, or never comes out
//! of the VMM.

use kvm_bindings::{kvm_lapic_state, Msrs};
use kvm_ioctls::VcpuFd;

use crate::error::VmError;
use crate::pause::VmControl;

/// KVM_MP_STATE_* names, by value.
const MP_STATES: [&str; 9] = [
    "runnable",
    "uninitialized",
    "init-received",
    "halted",
    "sipi-received",
    "stopped",
    "check-stop",
    "operating",
    "load",
];
const RFLAGS_IF: u64 = 1 << 9;
const MSR_TSC: u32 = 0x10;
const MSR_TSC_DEADLINE: u32 = 0x6e0;
// Local APIC register offsets (Intel SDM vol. 3, table 11-1).
const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;
const APIC_LVTT: usize = 0x320;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;
const LVT_MASKED: u32 = 1 << 16;

impl VmControl {
    /// One line per vCPU: run state, instruction and stack pointers, whether interrupts are
    /// on, the highest interrupt pending and in service, and the local APIC timer. Pauses the
    /// VM for the reading (a vCPU that does not leave the guest in time is itself the answer:
    /// the error says so) and lets it run on afterwards.
    pub fn vcpu_report(&self) -> Result<Vec<String>, VmError> {
        let parts = self.parts()?;
        let was_paused = self.is_paused();
        if !was_paused {
            self.pause()?;
        }
        let irqchip = parts.irqchip;
        let lines = self.on_each_vcpu(parts.config.vcpus, move |index, fd| {
            describe(index, fd, irqchip)
        });
        if !was_paused {
            self.resume();
        }
        lines
    }
}

/// One vCPU's line; what KVM will not give is left out rather than failing the report.
fn describe(index: u8, fd: &mut VcpuFd, irqchip: bool) -> String {
    let mut line = format!("vCPU {index}:");
    if let Ok(mp) = fd.get_mp_state() {
        let state = MP_STATES.get(mp.mp_state as usize).copied();
        line += &format!(" {}", state.unwrap_or("unknown-state"));
    }
    if let Ok(r) = fd.get_regs() {
        let on = if r.rflags & RFLAGS_IF != 0 {
            "on"
        } else {
            "off"
        };
        line += &format!(" rip={:#x} rsp={:#x} interrupts {on}", r.rip, r.rsp);
    }
    if let Ok(s) = fd.get_sregs() {
        line += &format!(" cr3={:#x}", s.cr3);
    }
    if irqchip {
        if let Ok(lapic) = fd.get_lapic() {
            line += &lapic_summary(&lapic);
        }
        if let Some((tsc, deadline)) = tsc_and_deadline(fd) {
            line += &format!(" tsc={tsc} tsc-deadline={deadline}");
        }
    }
    line
}

/// The highest vector pending (IRR) and in service (ISR), and the timer's LVT and counts.
fn lapic_summary(lapic: &kvm_lapic_state) -> String {
    let reg = |off: usize| -> u32 {
        let b = &lapic.regs[off..off + 4];
        u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
    };
    // The 256 bits of IRR and ISR sit in eight 32-bit registers, 16 bytes apart.
    let highest = |base: usize| -> String {
        (0..8usize)
            .rev()
            .find_map(|i| {
                let bits = reg(base + i * 16);
                (bits != 0).then(|| format!("{:#x}", i * 32 + 31 - bits.leading_zeros() as usize))
            })
            .unwrap_or_else(|| "none".into())
    };
    let lvtt = reg(APIC_LVTT);
    let masked = if lvtt & LVT_MASKED != 0 {
        " masked"
    } else {
        ""
    };
    format!(
        " irr={} isr={} timer: lvt={lvtt:#x}{masked} initial={} current={}",
        highest(APIC_IRR),
        highest(APIC_ISR),
        reg(APIC_TMICT),
        reg(APIC_TMCCT)
    )
}

/// The guest's TSC and IA32_TSC_DEADLINE (0: disarmed), which Linux's LAPIC timer uses when
/// the CPU has it: a deadline long past is a timer interrupt that never came.
fn tsc_and_deadline(fd: &VcpuFd) -> Option<(u64, u64)> {
    let entry = |index| kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    };
    let mut msrs = Msrs::from_entries(&[entry(MSR_TSC), entry(MSR_TSC_DEADLINE)]).ok()?;
    (fd.get_msrs(&mut msrs).ok()? == 2).then(|| (msrs.as_slice()[0].data, msrs.as_slice()[1].data))
}

//! Where a running guest's vCPUs are: for the error of a guest that stopped answering, so the
//! report says whether it spins (and where), sleeps with its timer disarmed, or never comes out
//! of the VMM.

use std::ops::Range;

use kvm_bindings::{kvm_lapic_state, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{CR0_PG, EFER_LMA};
use crate::error::VmError;
use crate::memory::GuestMemory;
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
/// How many words from the stack pointer up `stack_summary` looks at.
const STACK_WORDS: u64 = 64;
/// Where an x86-64 Linux kernel's text is mapped (the top 2 GiB, below the modules).
const KERNEL_TEXT: Range<u64> = 0xffff_ffff_8000_0000..0xffff_ffff_c000_0000;
const PTE_PRESENT: u64 = 1;
const PTE_HUGE: u64 = 1 << 7;
/// Bits 12..52 of a page-table entry or CR3: the physical address.
const PHYS_MASK: u64 = 0x000f_ffff_ffff_f000;

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
        let seen = self.on_each_vcpu(parts.config.vcpus, move |index, fd| {
            describe(index, fd, irqchip)
        });
        // Read while the guest stands still, so the stack is the one the registers point into.
        let lines = seen.map(|seen| {
            seen.into_iter()
                .map(|(line, paging)| match paging {
                    Some((regs, sregs)) => line + &stack_summary(&parts.mem, &regs, &sregs),
                    None => line,
                })
                .collect()
        });
        if !was_paused {
            self.resume();
        }
        lines
    }
}

/// The kernel text addresses among the top `STACK_WORDS` words of the stack: for a guest that
/// keeps no frame pointers these are the return addresses a backtrace would show (and stale
/// ones), to look up in the kernel's System.map. Empty unless the vCPU is in 64-bit paging.
fn stack_summary(mem: &GuestMemory, regs: &kvm_regs, sregs: &kvm_sregs) -> String {
    let long_mode = sregs.efer & EFER_LMA != 0 && sregs.cr0 & CR0_PG != 0;
    if !long_mode {
        return String::new();
    }
    let text: Vec<String> = (0..STACK_WORDS)
        .filter_map(|i| {
            let pa = translate(mem, sregs.cr3, regs.rsp.wrapping_add(i * 8))?;
            mem.read_obj::<u64>(GuestAddress(pa)).ok()
        })
        .filter(|word| KERNEL_TEXT.contains(word))
        .map(|word| format!("{word:#x}"))
        .collect();
    if text.is_empty() {
        return String::new();
    }
    format!(" stack text: {}", text.join(" "))
}

/// The guest-physical address of `va` under the 4-level page tables at `cr3`.
fn translate(mem: &GuestMemory, cr3: u64, va: u64) -> Option<u64> {
    let mut table = cr3 & PHYS_MASK;
    for level in (0..4u32).rev() {
        let index = (va >> (12 + 9 * level)) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        let next = entry & PHYS_MASK;
        // A 1 GiB or 2 MiB page ends the walk early.
        if level > 0 && entry & PTE_HUGE != 0 {
            let size = 1u64 << (12 + 9 * level);
            return Some((next & !(size - 1)) | (va & (size - 1)));
        }
        table = next;
    }
    Some(table | (va & 0xfff))
}

/// One vCPU's line, and its registers for the stack walk; what KVM will not give is left out
/// rather than failing the report.
fn describe(index: u8, fd: &mut VcpuFd, irqchip: bool) -> (String, Option<(kvm_regs, kvm_sregs)>) {
    let mut line = format!("vCPU {index}:");
    if let Ok(mp) = fd.get_mp_state() {
        let state = MP_STATES.get(mp.mp_state as usize).copied();
        line += &format!(" {}", state.unwrap_or("unknown-state"));
    }
    let regs = fd.get_regs().ok();
    if let Some(r) = &regs {
        let on = if r.rflags & RFLAGS_IF != 0 {
            "on"
        } else {
            "off"
        };
        line += &format!(" rip={:#x} rsp={:#x} interrupts {on}", r.rip, r.rsp);
    }
    let sregs = fd.get_sregs().ok();
    if let Some(s) = &sregs {
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
    (line, regs.zip(sregs))
}

/// The highest vector pending (IRR) and in service (ISR), and the timer's LVT and counts.
fn lapic_summary(lapic: &kvm_lapic_state) -> String {
    let reg = |off: usize| crate::vm::lapic_reg(&lapic.regs, off);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Page tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT) mapping one 2 MiB
    /// page and one 4 KiB page of the kernel's text range.
    fn tables() -> GuestMemory {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let write = |addr: u64, v: u64| mem.write_obj(v, GuestAddress(addr)).unwrap();
        let va: u64 = 0xffff_ffff_8100_0000;
        let index = |level: u32| (va >> (12 + 9 * level)) & 0x1ff;
        write(0x1000 + index(3) * 8, 0x2000 | PTE_PRESENT);
        write(0x2000 + index(2) * 8, 0x3000 | PTE_PRESENT);
        // va's 2 MiB page is at 0x40_0000; the next 2 MiB are 4 KiB pages, one present.
        write(0x3000 + index(1) * 8, 0x40_0000 | PTE_PRESENT | PTE_HUGE);
        write(0x3000 + (index(1) + 1) * 8, 0x4000 | PTE_PRESENT);
        write(0x4000 + 3 * 8, 0x60_0000 | PTE_PRESENT);
        mem
    }

    #[test]
    fn addresses_translate_through_huge_and_small_pages() {
        let mem = tables();
        let va: u64 = 0xffff_ffff_8100_0000;
        assert_eq!(translate(&mem, 0x1000, va + 0x1234), Some(0x40_1234));
        assert_eq!(
            translate(&mem, 0x1000, va + (2 << 20) + 0x3010),
            Some(0x60_0010)
        );
        // The other 4 KiB pages of that table, and other 2 MiB ranges, are not present.
        assert_eq!(translate(&mem, 0x1000, va + (2 << 20)), None);
        assert_eq!(translate(&mem, 0x1000, va + (4 << 20)), None);
    }

    #[test]
    fn the_stack_summary_lists_kernel_text_words() {
        let mem = tables();
        // The stack: a kernel text address between two other words.
        let rsp: u64 = 0xffff_ffff_8100_0100;
        for (i, word) in [7u64, 0xffff_ffff_8123_4567, 0x1000].iter().enumerate() {
            mem.write_obj(*word, GuestAddress(0x40_0100 + i as u64 * 8))
                .unwrap();
        }
        let regs = kvm_regs {
            rsp,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr3: 0x1000,
            cr0: CR0_PG,
            efer: EFER_LMA,
            ..Default::default()
        };
        assert_eq!(
            stack_summary(&mem, &regs, &sregs),
            " stack text: 0xffffffff81234567"
        );
        sregs.efer = 0;
        assert_eq!(stack_summary(&mem, &regs, &sregs), "");
    }
}

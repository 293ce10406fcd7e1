//! One vCPU's state: read on the vCPU's own (parked) thread, written before it first runs.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::error::VmError;

/// Everything KVM keeps about one vCPU. `Option`s are `None` when the host's KVM could not
/// read that piece (the snapshot's `skipped` list says which).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87/SSE state (also inside `xsave`; kept for hosts without XSAVE).
    #[serde(with = "FpuDef")]
    pub fpu: kvm_fpu,
    /// The XSAVE area (legacy 4 KiB layout).
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers (XCR0).
    pub xcrs: Option<kvm_xcrs>,
    /// Every MSR in KVM's index list that KVM let us read.
    pub msrs: Vec<kvm_msr_entry>,
    /// The local APIC (only with the in-kernel irqchip).
    pub lapic: Option<kvm_lapic_state>,
    /// Pending exceptions, interrupts, NMIs, SMM and interrupt shadow.
    pub events: Option<kvm_vcpu_events>,
    /// DR0-DR3, DR6, DR7.
    pub debugregs: Option<kvm_debugregs>,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
}

/// `kvm_fpu` through serde's remote derive: kvm-bindings has no serde support for it.
#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_fpu")]
struct FpuDef {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

/// What a save on one vCPU produced: the state and the pieces KVM refused to give.
pub struct Saved {
    /// The state.
    pub state: VcpuState,
    /// What is missing from it, e.g. "vCPU 0 xcrs: ...".
    pub skipped: Vec<String>,
}

/// Reads the state of a parked vCPU; `msr_indices` is KVM's MSR index list. Must run on the
/// vCPU's thread.
pub fn save(
    fd: &mut VcpuFd,
    index: u8,
    msr_indices: &[u32],
    irqchip: bool,
) -> Result<Saved, VmError> {
    complete_pending_io(fd);
    let mut skipped = Vec::new();
    let mut note = |what: &str, e: kvm_ioctls::Error| {
        skipped.push(format!("vCPU {index} {what}: {e}"));
    };
    let xsave = fd.get_xsave().map_err(|e| note("xsave", e)).ok();
    let xcrs = fd.get_xcrs().map_err(|e| note("xcrs", e)).ok();
    let events = fd
        .get_vcpu_events()
        .map_err(|e| note("vcpu events", e))
        .ok();
    let debugregs = fd
        .get_debug_regs()
        .map_err(|e| note("debug registers", e))
        .ok();
    let (msrs, refused) = read_msrs(fd, msr_indices);
    skipped.extend(refused.iter().map(|i| format!("vCPU {index} MSR {i:#x}")));
    let state = VcpuState {
        regs: fd.get_regs().map_err(VmError::kvm("get registers"))?,
        sregs: fd
            .get_sregs()
            .map_err(VmError::kvm("get special registers"))?,
        fpu: fd.get_fpu().map_err(VmError::kvm("get FPU"))?,
        xsave,
        xcrs,
        msrs,
        lapic: irqchip
            .then(|| fd.get_lapic().map_err(VmError::kvm("get LAPIC")))
            .transpose()?,
        events,
        debugregs,
        mp_state: fd.get_mp_state().map_err(VmError::kvm("get MP state"))?,
    };
    Ok(Saved { state, skipped })
}

/// Lets KVM finish an instruction whose port or MMIO exit we handled but that the guest has
/// not seen complete yet (an IN's result lands in RAX only at the next KVM_RUN): until then
/// the registers are not the guest's. KVM_RUN with `immediate_exit` completes it and returns
/// at once with EINTR, without running guest code.
fn complete_pending_io(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    match fd.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        other => log::warn!("vCPU: completing pending I/O returned {other:?}"),
    }
    fd.set_kvm_immediate_exit(0);
}

/// Reads every MSR in `indices` that KVM will read; returns those and the refused indices.
/// KVM_GET_MSRS stops at the first MSR it refuses and returns how many it read, so the
/// refused one is skipped and the rest retried.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> (Vec<kvm_msr_entry>, Vec<u32>) {
    let (mut read, mut refused) = (Vec::new(), Vec::new());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            break;
        };
        let n = fd.get_msrs(&mut msrs).unwrap_or(0).min(chunk.len());
        read.extend_from_slice(&msrs.as_slice()[..n]);
        if n < chunk.len() {
            refused.push(chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    (read, refused)
}

/// Writes `state` into a vCPU that has its CPUID but has never run. The order matters: MSRs
/// and the LAPIC depend on the special registers (EFER, APIC base), and pending events go last
/// so that nothing set after them clears them.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), VmError> {
    fd.set_mp_state(state.mp_state)
        .map_err(VmError::kvm("set MP state"))?;
    fd.set_regs(&state.regs)
        .map_err(VmError::kvm("set registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(VmError::kvm("set special registers"))?;
    fd.set_fpu(&state.fpu).map_err(VmError::kvm("set FPU"))?;
    if let Some(xsave) = &state.xsave {
        // SAFETY: `xsave` is a complete legacy 4 KiB kvm_xsave read by KVM_GET_XSAVE; the
        // legacy ioctl reads exactly that many bytes.
        unsafe { fd.set_xsave(xsave) }.map_err(unsupported("XSAVE state"))?;
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(unsupported("XCRs"))?;
    }
    if let Some(debugregs) = &state.debugregs {
        fd.set_debug_regs(debugregs)
            .map_err(unsupported("debug registers"))?;
    }
    if let Some(lapic) = &state.lapic {
        fd.set_lapic(lapic).map_err(unsupported("LAPIC"))?;
    }
    write_msrs(fd, &state.msrs)?;
    if let Some(events) = &state.events {
        fd.set_vcpu_events(events)
            .map_err(unsupported("vCPU events"))?;
    }
    Ok(())
}

/// Writes all saved MSRs; the first one KVM refuses fails the restore, naming it.
fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), VmError> {
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk)
            .map_err(|e| VmError::SnapshotUnsupported(format!("MSR list: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(unsupported("MSRs"))?;
        if let Some(refused) = chunk.get(n) {
            return Err(VmError::SnapshotUnsupported(format!(
                "MSR {:#x} = {:#x} refused",
                refused.index, refused.data
            )));
        }
    }
    Ok(())
}

fn unsupported(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::SnapshotUnsupported(format!("{what}: {e}"))
}

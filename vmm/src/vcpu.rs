//! vCPU threads: the KVM_RUN loop, exit dispatch to the buses, and the kick that gets a thread
//! out of KVM_RUN when the VM stops.
//!
//! Kicking: the stopper (or a pause) sends [`crate::stop::kick_signal`] to each vCPU thread. Its handler sets
//! `immediate_exit` in that thread's `kvm_run`, so KVM_RUN returns EINTR whether the signal
//! lands inside the ioctl or just before it; the loop then sees the stop flag.

use std::cell::Cell;
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{
    kvm_msr_entry, kvm_run, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::register_signal_handler;

use crate::bus::Bus;
use crate::error::VmError;
use crate::pause::PauseGate;
use crate::serial::ConsoleLog;
use crate::stop::{kick_signal, Outcome, StopState, VmExit};

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRINGS: u64 = 1;
/// MTRRs enabled, default type write-back: without it Linux may map RAM uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

thread_local! {
    /// This thread's `kvm_run` page while it owns a vCPU, for the kick handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN_PTR.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is set only while this thread's VcpuFd (which owns the mapping)
        // is alive and is cleared before it is dropped; a volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| VmError::Host(format!("vCPU kick signal handler: {e}")));
    });
    result
}

/// What every vCPU thread shares.
pub struct VcpuShared {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where the VM's end is reported.
    pub stop: Arc<StopState>,
    /// Console lines for error reports.
    pub console: Arc<Mutex<ConsoleLog>>,
    /// Where vCPUs park while the VM is paused.
    pub gate: Arc<PauseGate>,
}

/// One vCPU, moved into its thread.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    shared: Arc<VcpuShared>,
}

/// Why a vCPU stopped running the guest.
enum Stop {
    Clean(VmExit),
    TripleFault,
    Fault(String),
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(fd: VcpuFd, index: u8, shared: Arc<VcpuShared>) -> Self {
        Self { fd, index, shared }
    }

    /// Sets the MSRs Linux expects firmware to have set.
    pub fn set_boot_msrs(fd: &VcpuFd) -> Result<(), VmError> {
        let entry = |index, data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let msrs = Msrs::from_entries(&[
            entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRINGS),
            entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
        ])
        .map_err(|e| VmError::Host(format!("MSR list: {e:?}")))?;
        let set = fd.set_msrs(&msrs).map_err(VmError::kvm("set MSRs"))?;
        if set != msrs.as_slice().len() {
            log::warn!(
                "KVM accepted only {set} of {} boot MSRs",
                msrs.as_slice().len()
            );
        }
        Ok(())
    }

    /// Runs the guest until the VM stops; reports this vCPU's outcome to the stop state.
    pub fn run(mut self) {
        crate::confine::thread_started(crate::confine::ThreadKind::Vcpu);
        KVM_RUN_PTR.with(|p| p.set(self.fd.get_kvm_run()));
        self.shared.gate.register_current_thread();
        while !self.shared.stop.is_stopping() {
            self.shared
                .gate
                .park_while_paused(&self.shared.stop, self.index, &mut self.fd);
            if let Some(stop) = self.step() {
                let outcome = self.outcome(stop);
                self.shared.stop.request(outcome);
                break;
            }
        }
        self.shared.gate.unregister_current_thread();
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }

    /// One KVM_RUN and the handling of its exit; `Some` when the vCPU must stop.
    fn step(&mut self) -> Option<Stop> {
        let shared = &self.shared;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                warn_unclaimed(shared.pio.read(port.into(), data), "in", port.into())
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                warn_unclaimed(shared.pio.write(port.into(), data), "out", port.into())
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                warn_unclaimed(shared.mmio.read(addr, data), "mmio read", addr)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                warn_unclaimed(shared.mmio.write(addr, data), "mmio write", addr)
            }
            Ok(VcpuExit::Hlt) => return Some(Stop::Clean(VmExit::Halted)),
            Ok(VcpuExit::Shutdown) => return Some(Stop::TripleFault),
            Ok(VcpuExit::SystemEvent(kind, _)) => return Some(system_event(kind)),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Some(Stop::Fault(format!(
                    "VM entry failed (reason {reason:#x}, host cpu {cpu})"
                )))
            }
            Ok(VcpuExit::InternalError) => return Some(Stop::Fault(self.internal_error())),
            Ok(other) => return Some(Stop::Fault(format!("unexpected KVM exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked (or a spurious signal): clear the request and re-check the stop flag.
                self.fd.set_kvm_immediate_exit(0);
            }
            Err(e) => return Some(Stop::Fault(format!("KVM_RUN failed: {e}"))),
        }
        None
    }

    fn internal_error(&mut self) -> String {
        // SAFETY: KVM_EXIT_INTERNAL_ERROR means the kernel filled the `internal` member.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        match suberror {
            KVM_INTERNAL_ERROR_EMULATION => "KVM emulation failure".to_string(),
            other => format!("KVM internal error (suberror {other})"),
        }
    }

    fn outcome(&self, stop: Stop) -> Outcome {
        let console_tail = || {
            self.shared
                .console
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .tail()
        };
        match stop {
            Stop::Clean(exit) => Ok(exit),
            Stop::TripleFault => Err(VmError::TripleFault {
                vcpu: self.index,
                regs: self.regs_summary(),
                console_tail: console_tail(),
            }),
            Stop::Fault(what) => Err(VmError::GuestFault {
                vcpu: self.index,
                what,
                regs: self.regs_summary(),
                console_tail: console_tail(),
            }),
        }
    }

    /// A one-line register summary for error messages.
    fn regs_summary(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rax={:#x} rflags={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                r.rip, r.rsp, r.rax, r.rflags, s.cr0, s.cr3, s.cr4, s.efer, s.cs.selector
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
        }
    }
}

fn system_event(kind: u32) -> Stop {
    match kind {
        KVM_SYSTEM_EVENT_SHUTDOWN => Stop::Clean(VmExit::PowerOff),
        KVM_SYSTEM_EVENT_RESET => Stop::Clean(VmExit::Reset),
        KVM_SYSTEM_EVENT_CRASH => Stop::Fault("guest reported a crash".to_string()),
        other => Stop::Fault(format!("unknown KVM system event {other}")),
    }
}

/// Accesses nobody claims are normal (Linux probes legacy ports); log them for debugging.
fn warn_unclaimed(claimed: bool, what: &str, addr: u64) {
    if !claimed {
        log::debug!("unclaimed {what} at {addr:#x}");
    }
}

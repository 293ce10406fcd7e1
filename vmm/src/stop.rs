//! How any part of the VMM (a vCPU, the serial console, the i8042) ends the VM.
//!
//! The first outcome reported wins; later ones (e.g. the other vCPUs noticing they were
//! kicked) are dropped. `Vm::run` waits here and then kicks every vCPU thread out of KVM_RUN.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use vmm_sys_util::signal::SIGRTMIN;

use crate::error::VmError;

/// Offset from SIGRTMIN of the signal that kicks vCPU threads.
const KICK_SIGNAL_OFFSET: i32 = 0;

/// The real-time signal that kicks vCPU threads out of KVM_RUN, to stop the VM or to pause it
/// (the handler is `vcpu`'s).
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// How a guest ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 0xFE, what Linux `reboot=k` does). A micro-VM is
    /// never rebooted: callers treat this as power-off.
    Reset,
    /// The guest powered itself off.
    PowerOff,
    /// A vCPU halted with no in-kernel interrupt controller to wake it (test guests only).
    Halted,
}

/// The outcome of a VM run.
pub type Outcome = Result<VmExit, VmError>;

/// Shared between the vCPU threads, devices and `Vm::run`.
#[derive(Default)]
pub struct StopState {
    stopping: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    changed: Condvar,
}

impl StopState {
    /// Records `outcome` unless another one came first, and wakes `Vm::run`.
    pub fn request(&self, outcome: Outcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// True once anyone asked the VM to stop.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for a stop request; true if the VM is stopping.
    pub fn wait(&self, timeout: Duration) -> bool {
        let slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        let (slot, _) = self
            .changed
            .wait_timeout_while(slot, timeout, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        slot.is_some()
    }

    /// Takes the recorded outcome (once).
    pub fn take(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

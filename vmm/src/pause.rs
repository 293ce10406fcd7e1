//! Pausing a running VM: every vCPU thread is kicked out of KVM_RUN and parks until resumed.
//! The guest sees time stand still (kvmclock keeps counting, as after a host suspend); devices
//! keep their state and their worker threads idle with no queue notifications.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::VmError;
use crate::stop::StopState;
use crate::vcpu;

/// How long `pause` waits for every vCPU to park.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a parked vCPU looks at the stop flag (stopping must not wait for a resume).
const PARKED_POLL: Duration = Duration::from_millis(50);
/// How often `pause` re-kicks vCPUs that have not parked yet.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

#[derive(Default)]
struct GateState {
    paused: bool,
    parked: usize,
    threads: Vec<libc::pthread_t>,
}

/// Shared by the vCPU threads and every `VmControl`.
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl PauseGate {
    /// Called by each vCPU thread when it starts, so that `pause` can kick it.
    pub fn register_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().threads.push(me);
    }

    /// Called by each vCPU thread when it leaves, so that no stale thread id is ever signalled.
    pub fn unregister_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut st = self.lock();
        st.threads.retain(|t| *t != me);
        self.changed.notify_all();
    }

    /// vCPU side: blocks while the VM is paused (and not stopping).
    pub fn park_while_paused(&self, stop: &StopState) {
        let mut st = self.lock();
        if !st.paused {
            return;
        }
        st.parked += 1;
        self.changed.notify_all();
        while st.paused && !stop.is_stopping() {
            st = self
                .changed
                .wait_timeout(st, PARKED_POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.parked -= 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A handle that pauses and resumes a running VM from any thread.
#[derive(Clone)]
pub struct VmControl {
    gate: Arc<PauseGate>,
    stop: Arc<StopState>,
}

impl VmControl {
    pub(crate) fn new(gate: Arc<PauseGate>, stop: Arc<StopState>) -> Self {
        Self { gate, stop }
    }

    /// Stops every vCPU; returns once all of them are out of the guest.
    pub fn pause(&self) -> Result<(), VmError> {
        let deadline = Instant::now() + PARK_TIMEOUT;
        let mut st = self.gate.lock();
        st.paused = true;
        while st.parked < st.threads.len() {
            if self.stop.is_stopping() {
                return Err(VmError::Host("the VM stopped while pausing".into()));
            }
            if Instant::now() >= deadline {
                st.paused = false;
                self.gate.changed.notify_all();
                return Err(VmError::Host("vCPUs did not pause in time".into()));
            }
            for t in &st.threads {
                // SAFETY: registered ids belong to live vCPU threads (they unregister, under
                // this lock, before exiting); the kick handler is installed before they start.
                unsafe { libc::pthread_kill(*t, vcpu::kick_signal()) };
            }
            st = self
                .gate
                .changed
                .wait_timeout(st, KICK_INTERVAL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.gate.lock().paused = false;
        self.gate.changed.notify_all();
    }

    /// True between `pause` and `resume`.
    pub fn is_paused(&self) -> bool {
        self.gate.lock().paused
    }
}

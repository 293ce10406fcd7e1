//! Pausing a running VM: every vCPU thread is kicked out of KVM_RUN and parks until resumed.
//! The guest sees time stand still (kvmclock keeps counting, as after a host suspend); devices
//! keep their state and their worker threads idle with no queue notifications.
//!
//! While parked, a vCPU thread also runs jobs posted for it ([`VmControl::on_each_vcpu`]): KVM
//! vCPU ioctls belong on the thread that runs the vCPU, so snapshots read the state there.
//!
//! Besides the vCPUs, a [`VmControl`] reaches the VM's [`VmParts`] (devices, KVM, memory and
//! its paging state). The layers above add their own `VmControl` methods: page-out and page-in
//! in [`crate::page_out`] (resuming first pages in memory still paged out), snapshots and
//! checkpoints in [`crate::snapshot`].

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::config::SavedConfig;
use crate::error::VmError;
use crate::memory::GuestMemory;
use crate::pagefile::RamState;
use crate::persist::{self, PersistDevice};
use crate::stop::{kick_signal, StopState, VmExit};

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
    /// vCPU threads the VM starts; a pause waits for the late ones to register and park
    /// (a snapshot needs every vCPU, and a thread still starting is not parked yet).
    expected: usize,
    threads: Vec<libc::pthread_t>,
    /// Work for parked vCPUs, by vCPU index.
    jobs: HashMap<u8, VcpuJob>,
}

/// Work a parked vCPU thread runs on its own vCPU.
pub type VcpuJob = Box<dyn FnOnce(&mut VcpuFd) + Send>;

/// Shared by the vCPU threads and every `VmControl`.
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl PauseGate {
    /// Called before the vCPU threads start, with how many there will be.
    pub fn expect_threads(&self, count: usize) {
        self.lock().expected = count;
    }

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

    /// vCPU side: blocks while the VM is paused (and not stopping), running the jobs posted for
    /// vCPU `index` on `fd` meanwhile.
    pub fn park_while_paused(&self, stop: &StopState, index: u8, fd: &mut VcpuFd) {
        let mut st = self.lock();
        if !st.paused {
            return;
        }
        st.parked += 1;
        self.changed.notify_all();
        while st.paused && !stop.is_stopping() {
            if let Some(job) = st.jobs.remove(&index) {
                // Jobs run unlocked: they issue slow ioctls and other vCPUs run theirs meanwhile.
                drop(st);
                job(fd);
                st = self.lock();
                continue;
            }
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

/// What a snapshot reads besides the vCPUs; owned by the `Vm`, reached through `VmControl`.
pub struct VmParts {
    // Field order is drop order: devices before the VM fd and memory.
    pub(crate) devices: Vec<PersistDevice>,
    pub(crate) config: SavedConfig,
    pub(crate) irqchip: bool,
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) kvm: Kvm,
    pub(crate) mem: Arc<GuestMemory>,
    /// Whether the memory is paged out or coming back lazily (see [`crate::pagefile`]).
    pub(crate) ram: Mutex<RamState>,
}

impl VmParts {
    /// The paging state of the VM's RAM.
    pub(crate) fn ram(&self) -> MutexGuard<'_, RamState> {
        self.ram.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for VmParts {
    fn drop(&mut self) {
        // Devices held for a page-out must be let go, or their workers could not stop.
        let held = self.ram().paged_out.is_some();
        if held {
            persist::release_all(&self.devices);
        }
    }
}

/// A handle that pauses and resumes a running VM from any thread.
#[derive(Clone)]
pub struct VmControl {
    gate: Arc<PauseGate>,
    stop: Arc<StopState>,
    /// What a snapshot reads besides the vCPUs; weak, so a handle kept after the VM ended does
    /// not keep its devices (and their sockets) alive.
    parts: Weak<VmParts>,
}

impl VmControl {
    pub(crate) fn new(gate: Arc<PauseGate>, stop: Arc<StopState>, parts: Weak<VmParts>) -> Self {
        Self { gate, stop, parts }
    }

    /// The VM's parts, while the VM exists.
    pub(crate) fn parts(&self) -> Result<Arc<VmParts>, VmError> {
        self.parts
            .upgrade()
            .ok_or_else(|| VmError::SnapshotState("the VM has ended".into()))
    }

    /// Stops every vCPU; returns once all of them are out of the guest.
    pub fn pause(&self) -> Result<(), VmError> {
        let deadline = Instant::now() + PARK_TIMEOUT;
        let mut st = self.gate.lock();
        st.paused = true;
        while st.parked < st.threads.len().max(st.expected) {
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
                unsafe { libc::pthread_kill(*t, kick_signal()) };
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

    /// Lets the vCPUs run again. Memory still paged out comes back lazily first; if it cannot
    /// (a damaged page file), the VM is stopped with that error rather than run on wrong memory.
    pub fn resume(&self) {
        if let Err(e) = self.page_in_for_resume() {
            log::error!("resume: {e}");
            self.stop.request(Err(e));
            return;
        }
        let mut st = self.gate.lock();
        st.paused = false;
        // Jobs not taken yet are dropped: their callers see the channel close.
        st.jobs.clear();
        self.gate.changed.notify_all();
    }

    /// Runs `job(index, fd)` on each of the `count` parked vCPU threads and returns the results
    /// in vCPU order. The VM must be paused with all `count` vCPU threads parked.
    pub(crate) fn on_each_vcpu<T, F>(&self, count: u8, job: F) -> Result<Vec<T>, VmError>
    where
        T: Send + 'static,
        F: Fn(u8, &mut VcpuFd) -> T + Send + Sync + 'static,
    {
        let job = Arc::new(job);
        let (tx, rx) = mpsc::channel();
        {
            let mut st = self.gate.lock();
            if !st.paused || st.threads.len() != usize::from(count) || st.parked != st.threads.len()
            {
                return Err(VmError::SnapshotState(format!(
                    "{} of {count} vCPU threads are parked",
                    if st.paused { st.parked } else { 0 }
                )));
            }
            for index in 0..count {
                let (job, tx) = (job.clone(), tx.clone());
                let run: VcpuJob = Box::new(move |fd| {
                    let _ = tx.send((index, job(index, fd)));
                });
                st.jobs.insert(index, run);
            }
            self.gate.changed.notify_all();
        }
        drop(tx);
        collect_in_order(&rx, count)
    }

    /// The VM's stop state (the lazy pager stops the VM on a fault it cannot serve).
    pub(crate) fn stop_state(&self) -> Arc<StopState> {
        self.stop.clone()
    }

    /// The stop state (a snapshot refuses to run on a stopping VM).
    pub(crate) fn is_stopping(&self) -> bool {
        self.stop.is_stopping()
    }

    /// Ends the VM as if the guest had powered off (e.g. a paused VM kept only for its
    /// snapshot); `Vm::run` returns once every vCPU thread is out.
    pub fn stop(&self) {
        self.stop.request(Ok(VmExit::PowerOff));
    }

    /// True between `pause` and `resume`.
    pub fn is_paused(&self) -> bool {
        self.gate.lock().paused
    }
}

/// Waits for one result per vCPU and sorts them by vCPU index.
fn collect_in_order<T>(rx: &mpsc::Receiver<(u8, T)>, count: u8) -> Result<Vec<T>, VmError> {
    let mut slots: Vec<Option<T>> = (0..count).map(|_| None).collect();
    for _ in 0..count {
        let (index, value) = rx
            .recv_timeout(PARK_TIMEOUT)
            .map_err(|_| VmError::SnapshotState("a parked vCPU did not answer".into()))?;
        slots[usize::from(index)] = Some(value);
    }
    Ok(slots.into_iter().flatten().collect())
}

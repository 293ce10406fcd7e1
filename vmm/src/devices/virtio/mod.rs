//! Virtio devices behind the virtio-mmio transport.
//!
//! The transport ([`mmio::MmioTransport`]) speaks the register protocol with the guest driver;
//! a device ([`VirtioDevice`]) only sees feature bits, its config space and, once the driver is
//! ready, the queues plus one notification [`EventFd`] per queue. Every device runs its queues on
//! a worker thread that polls those eventfds, so the same device works whether a QueueNotify
//! write reaches the transport on a vCPU thread or KVM signals the eventfd directly (ioeventfd).

pub mod block;
pub mod fs9p;
pub mod mmio;
pub mod vsock;

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod testutil;

use crate::confine::{self, ThreadKind};
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory as every device sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Device id of a virtio block device.
pub const TYPE_BLOCK: u32 = 2;
/// Device id of a virtio vsock device.
pub const TYPE_VSOCK: u32 = 19;

/// Feature bit: the device conforms to virtio 1.0 or later (mandatory for virtio-mmio v2).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits written by the driver (virtio 1.2, 2.1).
pub mod status {
    /// The guest OS has noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest OS knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// InterruptStatus bit: a used ring was updated.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: the device configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer or more queues than the device uses.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device uses.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// A queue the device needs was not made ready by the driver.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// An eventfd, epoll or thread could not be created.
    #[error("cannot start the device worker: {0}")]
    Worker(#[source] io::Error),
}

/// The device's interrupt line: an eventfd the VMM registers as a KVM irqfd for the device's
/// GSI, plus the InterruptStatus bits the driver reads to learn why it was interrupted.
#[derive(Debug)]
pub struct Interrupt {
    eventfd: EventFd,
    status: AtomicU32,
}

impl Interrupt {
    /// A new interrupt with its own non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            eventfd: EventFd::new(EFD_NONBLOCK)?,
            status: AtomicU32::new(0),
        })
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Tells the driver that a used ring changed.
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_RING);
    }

    /// Tells the driver that the device configuration changed.
    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG);
    }

    /// The current InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledges `bits` (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the InterruptStatus register (restoring a snapshot); raises nothing: the restored
    /// interrupt controller already knows what is pending.
    pub(crate) fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Forgets all pending bits (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // A full eventfd counter (2^64 - 2 pending signals) is the only failure, and then an
        // interrupt is pending anyway.
        if let Err(e) = self.eventfd.write(1) {
            log::warn!("virtio: cannot signal interrupt: {e}");
        }
    }
}

/// A virtio device as the transport sees it. Its `Persist` part saves what is specific to the
/// device and holds its worker still (the transport saves the queues and registers).
pub trait VirtioDevice: crate::persist::Persist + Send {
    /// The virtio device id (2 for block, 19 for vsock, ...).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers, including [`VIRTIO_F_VERSION_1`].
    fn avail_features(&self) -> u64;
    /// The features the driver accepted (a subset of `avail_features`), set before activation.
    fn ack_features(&mut self, features: u64);
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific config space at `offset`. Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space. Most devices ignore this.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device: the driver set DRIVER_OK. `notifies[i]` is signalled whenever the
    /// driver notifies queue `i`.
    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        queues: Vec<Queue>,
        notifies: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops the device (joining any worker thread) and returns it to its pre-activation state.
    fn reset(&mut self);
}

/// What a device worker thread listens to besides its queues: the request to stop and the
/// request to hold still.
#[derive(Debug)]
pub(crate) struct WorkerCtl {
    /// Signalled when the worker must return.
    pub(crate) stop: EventFd,
    /// Signalled (through `hold.eventfd()`) when the worker must park between two requests.
    pub(crate) hold: Arc<Hold>,
}

/// How long `Hold::hold` waits for a worker to park.
const HOLD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Default)]
struct HoldState {
    wanted: bool,
    parked: bool,
}

/// Holds a device worker still between two requests, so that it touches neither guest memory
/// nor its queues: a snapshot then sees every popped descriptor chain completed.
#[derive(Debug)]
pub(crate) struct Hold {
    evt: EventFd,
    state: Mutex<HoldState>,
    changed: Condvar,
}

impl Hold {
    fn new() -> io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            state: Mutex::default(),
            changed: Condvar::new(),
        })
    }

    /// The eventfd the worker adds to its epoll set; when it fires the worker calls `park`.
    pub(crate) fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Worker side: blocks while a hold is wanted.
    pub(crate) fn park(&self) {
        let _ = self.evt.read();
        let mut st = self.lock();
        st.parked = true;
        self.changed.notify_all();
        while st.wanted {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.parked = false;
    }

    /// VMM side: asks the worker to park and waits until it has.
    fn hold(&self) -> io::Result<()> {
        let mut st = self.lock();
        st.wanted = true;
        self.evt.write(1)?;
        let (st, timeout) = self
            .changed
            .wait_timeout_while(st, HOLD_TIMEOUT, |s| !s.parked)
            .unwrap_or_else(|p| p.into_inner());
        drop(st);
        if timeout.timed_out() {
            self.release();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the device worker did not hold still",
            ));
        }
        Ok(())
    }

    /// VMM side: lets a parked worker go on.
    fn release(&self) {
        self.lock().wanted = false;
        self.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HoldState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A device worker thread and the eventfds that ask it to stop or to hold still.
#[derive(Debug)]
pub(crate) struct Worker<T> {
    stop: EventFd,
    hold: Arc<Hold>,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Spawns `body`, which receives its own handles on the stop and hold requests, on a
    /// thread of confinement `kind`. Refused once the VMM is confined (see [`crate::confine`]).
    pub(crate) fn spawn<F>(name: &str, kind: ThreadKind, body: F) -> io::Result<Self>
    where
        F: FnOnce(WorkerCtl) -> T + Send + 'static,
    {
        Self::spawn_after(name, kind, || (), |ctl, ()| body(ctl))
    }

    /// [`Self::spawn`] whose thread first runs `setup`, before it can be confined (see
    /// [`confine::thread_started_after`]), and hands what it made to `body`.
    pub(crate) fn spawn_after<S, P, F>(
        name: &str,
        kind: ThreadKind,
        setup: P,
        body: F,
    ) -> io::Result<Self>
    where
        P: FnOnce() -> S + Send + 'static,
        F: FnOnce(WorkerCtl, S) -> T + Send + 'static,
    {
        if confine::is_confined() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "a device worker cannot start once the VMM is confined",
            ));
        }
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let hold = Arc::new(Hold::new()?);
        let ctl = WorkerCtl {
            stop: stop.try_clone()?,
            hold: hold.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let made = confine::thread_started_after(kind, setup);
                body(ctl, made)
            })?;
        Ok(Self {
            stop,
            hold,
            handle: Some(handle),
        })
    }

    /// Asks the worker to stop and waits for it; returns what the thread returned.
    pub(crate) fn stop(mut self) -> Option<T> {
        self.stop_inner()
    }

    /// Parks the worker between two requests until [`Self::release`].
    pub(crate) fn hold(&self) -> io::Result<()> {
        match &self.handle {
            Some(h) if !h.is_finished() => self.hold.hold(),
            // A worker that already ended (after an error) touches nothing either.
            _ => Ok(()),
        }
    }

    /// Lets a held worker go on.
    pub(crate) fn release(&self) {
        self.hold.release();
    }

    /// `hold` for a device's optional worker, with the error as the snapshot core wants it.
    pub(crate) fn hold_opt(worker: &Option<Self>) -> Result<(), String> {
        match worker {
            Some(w) => w.hold().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// `release` for a device's optional worker.
    pub(crate) fn release_opt(worker: &Option<Self>) {
        if let Some(w) = worker {
            w.release();
        }
    }

    fn stop_inner(&mut self) -> Option<T> {
        let handle = self.handle.take()?;
        // A held worker must be let go to see the stop request.
        self.hold.release();
        if let Err(e) = self.stop.write(1) {
            log::error!("virtio: cannot signal worker to stop: {e}");
        }
        match handle.join() {
            Ok(v) => Some(v),
            Err(_) => {
                log::error!("virtio: device worker panicked");
                None
            }
        }
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.hold.release();
            let _ = self.stop.write(1);
            let _ = handle.join();
        }
    }
}

/// Checks the queue count and readiness every device needs before starting.
pub(crate) fn check_queues(queues: &[Queue], expected: usize) -> Result<(), ActivateError> {
    use virtio_queue::QueueT;
    if queues.len() != expected {
        return Err(ActivateError::QueueCount {
            expected,
            got: queues.len(),
        });
    }
    match queues.iter().position(|q| !q.ready()) {
        Some(i) => Err(ActivateError::QueueNotReady(i)),
        None => Ok(()),
    }
}

/// Copies `data.len()` bytes of a little-endian config blob starting at `offset`; bytes beyond
/// the blob read as zero so that a driver probing past the end sees nothing.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        let idx = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
        *byte = idx.and_then(|i| config.get(i)).copied().unwrap_or(0);
    }
}

/// The worker loop of a one-queue device: runs `process` once (the driver may have queued
/// requests before the worker listened), then after every notification, until `ctl.stop`
/// fires; parks between two rounds when `ctl.hold` asks.
pub(crate) fn serve_queue(
    ctl: &WorkerCtl,
    notify: &EventFd,
    mut process: impl FnMut(),
) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    const TOKEN_NOTIFY: u64 = 0;
    const TOKEN_STOP: u64 = 1;
    const TOKEN_HOLD: u64 = 2;
    let epoll = Epoll::new()?;
    for (fd, token) in [
        (notify.as_raw_fd(), TOKEN_NOTIFY),
        (ctl.stop.as_raw_fd(), TOKEN_STOP),
        (ctl.hold.eventfd().as_raw_fd(), TOKEN_HOLD),
    ] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    process();
    let mut events = [EpollEvent::default(); 3];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_STOP => return Ok(()),
                TOKEN_HOLD => ctl.hold.park(),
                _ => {
                    let _ = notify.read();
                    process();
                }
            }
        }
    }
}

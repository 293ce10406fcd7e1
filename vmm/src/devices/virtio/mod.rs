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

#[cfg(test)]
pub(crate) mod testutil;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
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

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
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

/// A device worker thread and the eventfd that asks it to stop.
#[derive(Debug)]
pub(crate) struct Worker<T> {
    stop: EventFd,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Spawns `body`, which receives its own handle on the stop eventfd.
    pub(crate) fn spawn<F>(name: &str, body: F) -> io::Result<Self>
    where
        F: FnOnce(EventFd) -> T + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let theirs = stop.try_clone()?;
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || body(theirs))?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Asks the worker to stop and waits for it; returns what the thread returned.
    pub(crate) fn stop(mut self) -> Option<T> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<T> {
        let handle = self.handle.take()?;
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
/// requests before the worker listened), then after every notification, until `stop` fires.
pub(crate) fn serve_queue(
    stop: &EventFd,
    notify: &EventFd,
    mut process: impl FnMut(),
) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    const TOKEN_NOTIFY: u64 = 0;
    const TOKEN_STOP: u64 = 1;
    let epoll = Epoll::new()?;
    for (fd, token) in [
        (notify.as_raw_fd(), TOKEN_NOTIFY),
        (stop.as_raw_fd(), TOKEN_STOP),
    ] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    process();
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        for ev in &events[..n] {
            if ev.data() == TOKEN_STOP {
                return Ok(());
            }
            let _ = notify.read();
            process();
        }
    }
}

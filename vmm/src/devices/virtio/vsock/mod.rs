//! virtio-vsock (virtio 1.2, section 5.10) whose host side is Unix sockets.
//!
//! The convention is Firecracker's, so existing tools work unchanged:
//! - host-initiated: a host process connects to `uds_path`, writes `CONNECT <port>\n`, reads
//!   `OK <host_port>\n` once the guest accepted, and then has a byte stream to guest port `port`;
//! - guest-initiated: a guest connection to CID 2 port `P` is forwarded to the Unix socket
//!   `<uds_path>_P`; if nothing listens there the guest gets a reset.
//!
//! One worker thread ([`muxer`]) owns the queues and every connection and waits in epoll.

mod connection;
mod muxer;

use crate::confine::ThreadKind;
use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    check_queues, read_config_bytes, ActivateError, GuestMemoryMmap, Interrupt, VirtioDevice,
    Worker, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};

/// The host's context id: guest packets to it are forwarded to Unix sockets.
pub const HOST_CID: u64 = 2;
const QUEUE_SIZE: u16 = 256;
const NUM_QUEUES: usize = 3;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVT_QUEUE: usize = 2;

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something already sits at the socket path; we never remove what we did not create.
    #[error("vsock socket path {} already exists", .0.display())]
    PathExists(PathBuf),
    /// The listening socket cannot be created.
    #[error("cannot listen on vsock socket {}: {source}", .path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create vsock eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// A handle the VMM keeps to act on a running vsock device from outside the bus.
#[derive(Clone, Debug)]
pub struct VsockControl {
    reset: Arc<EventFd>,
    cid: Arc<AtomicU64>,
}

impl VsockControl {
    /// Drops every connection and sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET to the guest, which
    /// then re-reads its CID and resets its sockets (used after cloning a VM from a snapshot).
    /// Delivered as soon as the worker runs and the driver has an event buffer available.
    pub fn reset_transport(&self) -> io::Result<()> {
        self.reset.write(1)
    }

    /// Changes the guest CID reported in config space; follow with [`Self::reset_transport`].
    pub fn set_guest_cid(&self, cid: u64) {
        self.cid.store(cid, Ordering::SeqCst);
    }
}

/// The vsock device.
pub struct Vsock {
    cid: Arc<AtomicU64>,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    reset: Arc<EventFd>,
    acked_features: u64,
    queue_sizes: [u16; NUM_QUEUES],
    worker: Option<Worker<()>>,
}

impl Vsock {
    /// Creates the device and binds its listening socket at `uds_path`, which must not exist.
    /// The socket file is removed when the device is dropped.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, Error> {
        if uds_path.symlink_metadata().is_ok() {
            return Err(Error::PathExists(uds_path.to_path_buf()));
        }
        let bind_err = |source| Error::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        // From here on the file is ours: build `Vsock` at once so Drop cleans up on error too.
        let reset = match EventFd::new(EFD_NONBLOCK) {
            Ok(e) => e,
            Err(e) => {
                let _ = std::fs::remove_file(uds_path);
                return Err(Error::EventFd(e));
            }
        };
        let vsock = Vsock {
            cid: Arc::new(AtomicU64::new(guest_cid)),
            uds_path: uds_path.to_path_buf(),
            listener: Arc::new(listener),
            reset: Arc::new(reset),
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            worker: None,
        };
        vsock.listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(vsock)
    }

    /// A handle for transport resets and CID changes.
    pub fn control(&self) -> VsockControl {
        VsockControl {
            reset: self.reset.clone(),
            cid: self.cid.clone(),
        }
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.cid.load(Ordering::SeqCst)
    }

    /// Where host processes connect.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn avail_features(&self) -> u64 {
        // Stream sockets only: no VIRTIO_VSOCK_F_SEQPACKET.
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.guest_cid().to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-vsock: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        queues: Vec<Queue>,
        notifies: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        check_queues(&queues, NUM_QUEUES)?;
        let reset = self.reset.try_clone().map_err(ActivateError::Worker)?;
        let muxer = muxer::Muxer::new(muxer::Setup {
            mem,
            queues,
            notifies,
            interrupt,
            listener: self.listener.clone(),
            uds_path: self.uds_path.clone(),
            cid: self.cid.clone(),
            reset,
        })
        .map_err(ActivateError::Worker)?;
        let worker = Worker::spawn("virtio-vsock", ThreadKind::DeviceWorker, move |ctl| {
            muxer.run(&ctl)
        });
        self.worker = Some(worker.map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.acked_features = 0;
    }
}

/// What a snapshot records of a vsock device. Host connections are not saved: a restored
/// device starts without any and tells the guest so with a transport reset.
#[derive(serde::Serialize, serde::Deserialize)]
struct VsockState {
    cid: u64,
    uds_path: PathBuf,
}

impl crate::persist::Persist for Vsock {
    fn quiesce(&mut self) -> Result<(), String> {
        Worker::hold_opt(&self.worker)
    }

    fn release(&mut self) {
        Worker::release_opt(&self.worker);
    }

    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        crate::persist::encode_state(&VsockState {
            cid: self.guest_cid(),
            uds_path: self.uds_path.clone(),
        })
    }

    /// Keeps this device's CID and socket (a clone gets its own). The guest's sockets were
    /// connected to host sockets this device does not have, and the CID may have changed, so
    /// the restored VM must send a transport reset ([`VsockControl::reset_transport`]); it
    /// does so once the vCPUs and interrupt controllers are restored: an interrupt raised
    /// before that would be overwritten and lost (the guest would never look at the event).
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        let saved: VsockState = crate::persist::decode_state(state)?;
        if saved.cid != self.guest_cid() {
            log::info!(
                "virtio-vsock: restored with CID {} (snapshot had {})",
                self.guest_cid(),
                saved.cid
            );
        }
        Ok(())
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            log::warn!(
                "virtio-vsock: cannot remove {}: {e}",
                self.uds_path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests;

//! virtio-9p: a host directory shared with the guest over 9P2000.L (virtio 1.2, section 5.10
//! is silent on 9p; the device follows QEMU's and the Linux driver's `virtio_9p_config`).
//!
//! The 9P server runs inside the VMM process, not as a vhost-user backend: a clone of a memory
//! template maps guest RAM `MAP_PRIVATE`, and only this process can see the clone's private
//! pages (DESIGN.md, "Templates and pause"). The protocol itself is the `p9` crate (crosvm's
//! server); this module is the virtio glue around it.
//!
//! The guest mounts it with
//! `mount -t 9p -o trans=virtio,version=9p2000.L,msize=65560 <tag> <dir>`. Requests are served
//! one at a time on a worker thread, so a slow host filesystem never stalls a vCPU.

mod fids;
mod share_view;
mod wire;
mod worker;

use crate::confine::ThreadKind;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::{
    check_queues, read_config_bytes, ActivateError, GuestMemoryMmap, Interrupt, VirtioDevice,
    Worker, VIRTIO_F_VERSION_1,
};
use crate::config::ShareConfig;
use fids::FidTable;
use worker::{confined_server, Fs9pWorker};

/// Device id of a virtio 9p transport.
pub const TYPE_9P: u32 = 9;
/// Longest mount tag accepted; QEMU uses the same limit, and the Linux driver compares the
/// whole tag with the mount source, so the guest must be able to pass it to mount(2).
pub const MAX_TAG_LEN: usize = 255;
/// The largest msize the p9 server agrees to (64 KiB of payload plus headers); a guest asking
/// for more is answered with this in Rversion.
pub const MAX_MSIZE: u32 = 64 * 1024 + 24;

/// Host fds one share's server may hold: each fid costs up to two (its path and its open file).
pub const HOST_FDS_PER_SHARE: u64 = 2 * fids::MAX_FIDS as u64;

/// Feature bit: the config space carries a mount tag.
const VIRTIO_9P_MOUNT_TAG: u32 = 0;
/// The Linux driver keeps at most 128 requests in flight per channel.
const QUEUE_SIZE: u16 = 128;

/// Why a 9p device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The shared directory cannot be opened, or is not a directory.
    #[error("cannot share directory {} over 9p: {source}", .path.display())]
    Dir {
        /// The directory given.
        path: PathBuf,
        /// What the OS said (ENOENT, ENOTDIR, ...).
        source: io::Error,
    },
    /// The mount tag cannot be offered to the guest.
    #[error("invalid 9p mount tag {tag:?}: {reason}")]
    Tag {
        /// The tag given.
        tag: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A virtio-9p device serving one host directory.
pub struct Fs9p {
    /// What is shared, and how.
    share: ShareConfig,
    /// The shared directory, opened once so that the share is the directory seen at creation
    /// even if the path is later replaced.
    root: File,
    config: Vec<u8>,
    acked_features: u64,
    queue_sizes: [u16; 1],
    worker: Option<Worker<()>>,
    /// The fids the guest holds (followed by the worker; a restore sets them before the
    /// worker starts, which opens them again).
    fids: Arc<Mutex<FidTable>>,
}

impl Fs9p {
    /// Shares `host_dir` under the mount tag `tag`; with `read_only`, every request that would
    /// change the host is answered with EROFS.
    pub fn new(tag: &str, host_dir: &Path, read_only: bool) -> Result<Fs9p, Error> {
        Self::with_config(&ShareConfig::dir(tag, host_dir, read_only))
    }

    /// Shares what `share` describes.
    pub fn with_config(share: &ShareConfig) -> Result<Fs9p, Error> {
        check_tag(&share.tag)?;
        Ok(Fs9p {
            share: share.clone(),
            root: open_dir(&share.path)?,
            config: config_space(&share.tag),
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE],
            worker: None,
            fids: Arc::default(),
        })
    }

    /// Starts the worker and waits until it has confined itself, so that a failure to do so
    /// fails activation instead of leaving a device that never answers.
    fn start_worker(
        &mut self,
        worker: impl FnOnce(p9::Server) -> Fs9pWorker + Send + 'static,
        notify: EventFd,
    ) -> Result<(), ActivateError> {
        let root = self.root.try_clone().map_err(ActivateError::Worker)?;
        let share = self.share.clone();
        let fids = self.fids.clone();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        // The view is built before the thread can be confined: it takes system calls and
        // CAP_SYS_ADMIN that a confined 9p worker no longer has.
        let view = move || confined_server(&share, &root);
        let spawned = Worker::spawn_after("virtio-9p", ThreadKind::Fs9p, view, move |ctl, made| {
            let mut server = match made {
                Ok(server) => server,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            worker::replay(&mut server, &mut worker::lock(&fids));
            let _ = ready_tx.send(Ok(()));
            worker(server).run(&ctl, &notify);
        })
        .map_err(ActivateError::Worker)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {
                self.worker = Some(spawned);
                Ok(())
            }
            Ok(Err(e)) => {
                spawned.stop();
                Err(ActivateError::Worker(confine_error(e)))
            }
            Err(_) => {
                spawned.stop();
                Err(ActivateError::Worker(io::Error::other(
                    "virtio-9p worker exited during setup",
                )))
            }
        }
    }
}

fn confine_error(e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot confine the 9p server to the shared directory: {e}"),
    )
}

fn check_tag(tag: &str) -> Result<(), Error> {
    let reason = if tag.is_empty() {
        Some("empty")
    } else if tag.len() > MAX_TAG_LEN {
        Some("longer than 255 bytes")
    } else if tag
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        Some("contains whitespace or control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::Tag {
            tag: tag.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn open_dir(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| Error::Dir {
            path: path.to_path_buf(),
            source,
        })
}

/// struct virtio_9p_config: tag_len (le16), then the tag, not NUL-terminated.
fn config_space(tag: &str) -> Vec<u8> {
    // check_tag bounds the length by MAX_TAG_LEN, so it fits a u16.
    let mut c = (tag.len() as u16).to_le_bytes().to_vec();
    c.extend_from_slice(tag.as_bytes());
    c
}

impl VirtioDevice for Fs9p {
    fn device_type(&self) -> u32 {
        TYPE_9P
    }

    fn avail_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_9P_MOUNT_TAG)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-9p: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        mut queues: Vec<Queue>,
        mut notifies: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        check_queues(&queues, 1)?;
        let queue = queues.remove(0);
        let read_only = self.share.read_only;
        let fids = self.fids.clone();
        let worker = move |server| Fs9pWorker {
            mem,
            queue,
            server,
            read_only,
            interrupt,
            fids,
        };
        self.start_worker(worker, notifies.remove(0))
    }

    fn reset(&mut self) {
        // Stopping the worker drops the server and with it every fid the guest held.
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        *worker::lock(&self.fids) = FidTable::default();
        self.acked_features = 0;
    }
}

/// What a snapshot records of a share: its tag and directory, and the fids the guest holds
/// as paths, which the restored server opens again in its own directory (see `fids`).
#[derive(serde::Serialize, serde::Deserialize)]
struct Fs9pState {
    tag: String,
    path: PathBuf,
    read_only: bool,
    fids: FidTable,
}

impl crate::persist::Persist for Fs9p {
    fn quiesce(&mut self) -> Result<(), String> {
        Worker::hold_opt(&self.worker)
    }

    fn release(&mut self) {
        Worker::release_opt(&self.worker);
    }

    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        crate::persist::encode_state(&Fs9pState {
            tag: self.share.tag.clone(),
            path: self.share.path.clone(),
            read_only: self.share.read_only,
            fids: worker::lock(&self.fids).clone(),
        })
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        let s: Fs9pState = crate::persist::decode_state(state)?;
        // The directory and mode may differ (a clone serves its own); the tag may not: the
        // guest read it from config space at boot.
        if s.tag != self.share.tag {
            return Err(format!(
                "saved share {:?} at {}, restored {:?} at {}",
                s.tag,
                s.path.display(),
                self.share.tag,
                self.share.path.display()
            ));
        }
        // Called before the transport activates the device, whose worker opens them again.
        *worker::lock(&self.fids) = s.fids;
        Ok(())
    }
}

impl Drop for Fs9p {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests;

/// The fuzz target's way into the message parsing (`wire`) and fid tracking (`fids`) without a
/// server: `data` is a list of (request, reply) pairs, each a u16 length and that many bytes.
/// Every request goes through the checks the worker makes before the server sees it, and one
/// the fid table admits is observed with its reply; the table must stay within its bounds.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_messages(mut data: &[u8]) {
    let mut next = || {
        let (len, rest) = data.split_at_checked(2)?;
        let len = usize::from(u16::from_le_bytes([len[0], len[1]])).min(rest.len());
        let (msg, rest) = rest.split_at(len);
        data = rest;
        Some(msg)
    };
    let mut table = FidTable::default();
    while let (Some(request), Some(reply)) = (next(), next()) {
        let Some(header) = wire::peek_header(&request) else {
            continue;
        };
        let _ = wire::modifies_host(header.ty, &request);
        let _ = wire::mknod_makes_device(&request);
        let _ = wire::names_a_path(header.ty, &request);
        let _ = wire::opened_fid(header.ty, &request);
        let _ = wire::rgetattr_mode(reply);
        if fids::tracks(header.ty) && table.admit(request).is_ok() {
            table.observe(request, reply);
        }
        assert!(
            table.fids.len() <= fids::MAX_FIDS,
            "fid table over its bound"
        );
        for f in table.fids.values() {
            assert!(
                f.path.len() <= fids::MAX_FID_PATH_DEPTH,
                "fid path too deep"
            );
            let bytes: usize = f.path.iter().map(|n| n.len() + 1).sum();
            assert!(bytes <= fids::MAX_FID_PATH_BYTES, "fid path too long");
        }
    }
    for (request, _) in table.replay() {
        assert!(wire::peek_header(&request.as_slice()).is_some());
    }
}

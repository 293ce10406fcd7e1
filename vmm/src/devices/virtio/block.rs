//! virtio-blk backed by a host file (virtio 1.2, section 5.2).
//!
//! Requests run on a worker thread rather than on the vCPU thread that writes QueueNotify: disk
//! I/O (and fdatasync above all) can take milliseconds, and a vCPU stuck in it would stall the
//! guest; a worker polling the queue's eventfd also keeps working unchanged once the VMM turns
//! QueueNotify into a KVM ioeventfd.

use crate::confine::ThreadKind;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    check_queues, read_config_bytes, serve_queue, ActivateError, GuestMemoryMmap, Interrupt,
    VirtioDevice, Worker, WorkerCtl, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

/// Bytes in a virtio-blk sector, whatever the image's block size.
pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;

/// Feature bits (virtio 1.2, 5.2.3).
const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Request types.
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status bytes.
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// GET_ID answers with at most this many bytes.
const ID_BYTES: usize = 20;
/// Size of the request header: type, reserved, sector.
const HEADER_BYTES: usize = 16;
/// Requests are copied through a bounce buffer of this size, so a huge request from the guest
/// costs no more host memory than a small one.
const CHUNK: usize = 128 << 10;
/// Most descriptors one request may have: the header, `seg_max` (QUEUE_SIZE - 2) data
/// segments and the status byte, which is all a direct chain can hold. We do not offer
/// VIRTIO_F_INDIRECT_DESC, but virtio-queue follows an indirect table of up to 65535 entries
/// anyway, and reading a request lists every descriptor in host memory first.
const MAX_REQUEST_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// Most bytes one request may move. Linux sends at most `max_sectors_kb` per request, 1280 KiB
/// by default; 16 MiB leaves room for a guest that raises it, while a guest describing a
/// multi-GiB transfer (up to 4 GiB per chain) cannot hold the worker for its whole length.
const MAX_REQUEST_BYTES: u64 = 16 << 20;

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image cannot be opened or inspected.
    #[error("cannot open block image {}: {source}", .path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

/// A virtio-blk device over one file.
pub struct Block {
    path: PathBuf,
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES],
    acked_features: u64,
    queue_sizes: [u16; 1],
    worker: Option<Worker<()>>,
}

impl Block {
    /// Opens `path` (read-only if `read_only`). The capacity is the file size in 512-byte
    /// sectors, rounded down.
    pub fn new(path: &Path, read_only: bool) -> Result<Block, Error> {
        let open_err = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        Ok(Block {
            path: path.to_path_buf(),
            file,
            read_only,
            capacity: meta.len() / SECTOR_SIZE,
            id: disk_id(meta.dev(), meta.ino()),
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE],
            worker: None,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn config(&self) -> [u8; 16] {
        // struct virtio_blk_config: capacity (le64), size_max (le32), seg_max (le32).
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.capacity.to_le_bytes());
        // Every request uses a header and a status descriptor besides its data segments.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }
}

/// A stable serial for GET_ID: the image's device and inode numbers in hex.
fn disk_id(dev: u64, ino: u64) -> [u8; ID_BYTES] {
    let text = format!("husk{dev:x}-{ino:x}");
    let mut id = [0u8; ID_BYTES];
    let n = text.len().min(ID_BYTES);
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn avail_features(&self) -> u64 {
        let mut f =
            (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-blk: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        mut queues: Vec<Queue>,
        mut notifies: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        check_queues(&queues, 1)?;
        let notify = notifies.remove(0);
        let worker = BlockWorker {
            mem,
            queue: queues.remove(0),
            file: self.file.try_clone().map_err(ActivateError::Worker)?,
            capacity_bytes: self.capacity * SECTOR_SIZE,
            read_only: self.read_only,
            id: self.id,
            interrupt,
        };
        let spawned = Worker::spawn("virtio-blk", ThreadKind::DeviceWorker, move |ctl| {
            worker.run(&ctl, &notify)
        });
        self.worker = Some(spawned.map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.acked_features = 0;
    }
}

/// Everything the worker thread owns.
struct BlockWorker {
    mem: Arc<GuestMemoryMmap>,
    queue: Queue,
    file: File,
    capacity_bytes: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    interrupt: Arc<Interrupt>,
}

impl BlockWorker {
    fn run(mut self, ctl: &WorkerCtl, notify: &EventFd) {
        if let Err(e) = self.event_loop(ctl, notify) {
            log::error!("virtio-blk: worker failed: {e}");
        }
    }

    fn event_loop(&mut self, ctl: &WorkerCtl, notify: &EventFd) -> io::Result<()> {
        serve_queue(ctl, notify, || self.process_queue())
    }

    fn process_queue(&mut self) {
        let mem = self.mem.clone();
        let mut completed = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(mem.as_ref()) {
            let head = chain.head_index();
            let len = self.handle(chain, mem.as_ref());
            if let Err(e) = self.queue.add_used(mem.as_ref(), head, len) {
                log::error!("virtio-blk: cannot complete request: {e}");
            }
            completed = true;
        }
        if completed && self.queue.needs_notification(mem.as_ref()).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
    }

    /// Runs one request; returns the number of bytes written into the chain (used length).
    fn handle(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        if let Err(why) = within_limits(&chain) {
            log::warn!("virtio-blk: refusing a request with {why}");
            return refuse(chain, mem);
        }
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem))
        else {
            log::warn!("virtio-blk: descriptor chain outside guest memory");
            return 0;
        };
        // The status byte is the last writable byte; without one the request is unanswerable.
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            log::warn!("virtio-blk: request without a status byte");
            return 0;
        };
        let Ok(mut status_writer) = writer.split_at(data_len) else {
            return 0;
        };
        let status = self.execute(&mut reader, &mut writer);
        let _ = status_writer.write_all(&[status]);
        (writer.bytes_written() + 1) as u32
    }

    fn execute(&mut self, reader: &mut Reader<'_>, writer: &mut Writer<'_>) -> u8 {
        let mut header = [0u8; HEADER_BYTES];
        if reader.read_exact(&mut header).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let result = match kind {
            VIRTIO_BLK_T_IN => self.read_sectors(sector, writer),
            VIRTIO_BLK_T_OUT => self.write_sectors(sector, reader),
            VIRTIO_BLK_T_FLUSH => self.file.sync_data(),
            VIRTIO_BLK_T_GET_ID => self.get_id(writer),
            other => {
                log::debug!("virtio-blk: unsupported request type {other}");
                return VIRTIO_BLK_S_UNSUPP;
            }
        };
        match result {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                log::debug!("virtio-blk: request type {kind} at sector {sector} failed: {e}");
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they lie inside the image.
    fn checked_range(&self, sector: u64, len: usize) -> io::Result<u64> {
        let start = sector.checked_mul(SECTOR_SIZE);
        let end = start.and_then(|s| s.checked_add(len as u64));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.capacity_bytes => Ok(start),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at sector {sector} past the end of the disk"),
            )),
        }
    }

    fn read_sectors(&mut self, sector: u64, writer: &mut Writer<'_>) -> io::Result<()> {
        let len = writer.available_bytes();
        let mut offset = self.checked_range(sector, len)?;
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            self.file.read_exact_at(&mut buf[..n], offset)?;
            writer.write_all(&buf[..n])?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }

    fn write_sectors(&mut self, sector: u64, reader: &mut Reader<'_>) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "write to a read-only disk",
            ));
        }
        let len = reader.available_bytes();
        let mut offset = self.checked_range(sector, len)?;
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            reader.read_exact(&mut buf[..n])?;
            self.file.write_all_at(&buf[..n], offset)?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }

    fn get_id(&mut self, writer: &mut Writer<'_>) -> io::Result<()> {
        let n = writer.available_bytes().min(ID_BYTES);
        writer.write_all(&self.id[..n])
    }
}

/// Checks a chain's descriptor count and total length against the caps, walking the chain
/// without allocating (a chain ends after at most 65535 descriptors).
fn within_limits(chain: &DescriptorChain<&GuestMemoryMmap>) -> Result<(), String> {
    let (mut count, mut bytes) = (0usize, 0u64);
    for desc in chain.clone() {
        count += 1;
        bytes += u64::from(desc.len());
        if count > MAX_REQUEST_DESCRIPTORS {
            return Err(format!("more than {MAX_REQUEST_DESCRIPTORS} descriptors"));
        }
        if bytes > MAX_REQUEST_BYTES + HEADER_BYTES as u64 + 1 {
            return Err(format!("more than {MAX_REQUEST_BYTES} bytes of data"));
        }
    }
    Ok(())
}

/// Answers a request beyond the caps with IOERR in its last writable byte (the status), without
/// reading it; returns the used length.
fn refuse(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
    use vm_memory::{Address, Bytes};
    let status = chain.writable().last().filter(|d| d.len() > 0);
    let written = status.is_some_and(|d| {
        let at = d.addr().checked_add(u64::from(d.len()) - 1);
        at.is_some_and(|at| mem.write_obj(VIRTIO_BLK_S_IOERR, at).is_ok())
    });
    u32::from(written)
}

/// What a snapshot records of a block device: which image, and how it is exposed.
#[derive(serde::Serialize, serde::Deserialize)]
struct BlockState {
    path: PathBuf,
    read_only: bool,
}

impl crate::persist::Persist for Block {
    fn quiesce(&mut self) -> Result<(), String> {
        Worker::hold_opt(&self.worker)
    }

    fn release(&mut self) {
        Worker::release_opt(&self.worker);
    }

    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        crate::persist::encode_state(&BlockState {
            path: self.path.clone(),
            read_only: self.read_only,
        })
    }

    /// The image is the one the restored VM's configuration names; the saved record only
    /// guards against restoring onto another one.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        let s: BlockState = crate::persist::decode_state(state)?;
        if s.path != self.path || s.read_only != self.read_only {
            return Err(format!(
                "saved image {} (read-only {}), restored {} (read-only {})",
                s.path.display(),
                s.read_only,
                self.path.display(),
                self.read_only
            ));
        }
        Ok(())
    }
}

type Reader<'a> = virtio_queue::Reader<'a, ()>;
type Writer<'a> = virtio_queue::Writer<'a, ()>;

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests;

//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, off in every build that
//! ships): each takes the fuzzer's bytes and drives one device the way a hostile guest driver
//! would, through the virtio-mmio transport and split queues in guest memory, reusing the test
//! driver in `devices::virtio::testutil`.
//!
//! The bytes of a device target are a list of operations on the device's queues:
//! - `0`, queue, count, then per buffer: flags (bit 0: device-writable), length (u16), and for a
//!   readable buffer that many content bytes: a well-formed chain of buffers;
//! - `1`, queue, then 16 raw descriptor bytes: a chain of one descriptor whose address, length,
//!   flags and next index are the fuzzer's (loops, indirect tables, addresses outside RAM);
//! - `2`, queue, offset (u32), length (u16), bytes: a raw write anywhere in guest memory, such as
//!   into the rings or a descriptor table already published.
//!
//! Each chain is notified at once and given a short while to be used, so a device that stops
//! answering is slow rather than stuck.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::config::ShareConfig;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::fs9p::Fs9p;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::testutil::{
    driver_init, guest_memory, notify, transport, Alloc, GuestQueue, TestDir,
};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{GuestMemoryMmap, VirtioDevice};

/// Guest memory is 32 MiB; raw writes land below it.
const MEM_SIZE: u64 = 32 << 20;
/// The longest buffer a structured chain gets, so one input cannot make a huge request.
const MAX_BUF: u64 = 128 << 10;
/// How long a chain is given to be used before the next operation.
const USED_WAIT: Duration = Duration::from_millis(50);
/// Operations per input, so an input cannot run for long.
const MAX_OPS: usize = 64;

/// The fuzzer's bytes, read front to back; past the end every read is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }

    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let got = self.bytes(2);
        b[..got.len()].copy_from_slice(got);
        u16::from_le_bytes(b)
    }

    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let got = self.bytes(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_le_bytes(b)
    }
}

/// A device under a guest driver that does what the input says.
struct Driver {
    mem: Arc<GuestMemoryMmap>,
    t: MmioTransport,
    queues: Vec<RawQueue>,
}

/// A driver-initialised queue whose descriptors the input writes one chain at a time.
struct RawQueue {
    q: GuestQueue,
    /// Whether the device uses this queue's chains as it gets them (not so a receive queue,
    /// whose buffers wait for data).
    waits: bool,
    avail_idx: u16,
    next_desc: u16,
}

impl Driver {
    /// Activates `device` with queues of `sizes`, each with whether its chains are used at once.
    fn new(device: Box<dyn VirtioDevice>, sizes: &[(u16, bool)]) -> Driver {
        let mem = guest_memory();
        let (mut t, _irq) = transport(device, &mem);
        let queues: Vec<GuestQueue> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(size, _))| GuestQueue::new(&mem, 0x1_0000 * (i as u64 + 1), size))
            .collect();
        driver_init(&mut t, &queues.iter().collect::<Vec<_>>());
        let queues = queues
            .into_iter()
            .zip(sizes)
            .map(|(q, &(_, waits))| RawQueue {
                q,
                waits,
                avail_idx: 0,
                next_desc: 0,
            })
            .collect();
        Driver { mem, t, queues }
    }

    /// Runs the operations of `input`.
    fn run(&mut self, mut input: Input) {
        // Buffers live from 1 MiB up; the bump allocator starts again when it nears the end.
        let mut alloc = Alloc::new();
        for _ in 0..MAX_OPS {
            if input.is_empty() {
                break;
            }
            let op = input.u8() % 3;
            let qi = usize::from(input.u8()) % self.queues.len();
            match op {
                0 => {
                    let count = 1 + usize::from(input.u8() % 4);
                    let mut bufs = Vec::with_capacity(count);
                    for _ in 0..count {
                        let writable = input.u8() & 1 != 0;
                        let len = u64::from(input.u16()).min(MAX_BUF);
                        let mut addr = alloc.take(len);
                        if addr + len > MEM_SIZE {
                            alloc = Alloc::new();
                            addr = alloc.take(len);
                        }
                        if !writable {
                            let content = input.bytes(len as usize);
                            self.mem.write_slice(content, GuestAddress(addr)).unwrap();
                        }
                        bufs.push((addr, len as u32, writable));
                    }
                    self.publish(qi, &bufs, None);
                }
                1 => {
                    let raw: [u8; 16] = {
                        let mut b = [0u8; 16];
                        let got = input.bytes(16);
                        b[..got.len()].copy_from_slice(got);
                        b
                    };
                    self.publish(qi, &[], Some(raw));
                }
                _ => {
                    let at = u64::from(input.u32()) % MEM_SIZE;
                    let len = usize::from(input.u16());
                    let data = input.bytes(len);
                    let len = data.len().min((MEM_SIZE - at) as usize);
                    self.mem
                        .write_slice(&data[..len], GuestAddress(at))
                        .unwrap();
                }
            }
        }
    }

    /// Writes a chain of `bufs` (or the one raw descriptor) into queue `qi`'s descriptor table,
    /// makes it available, notifies, and waits a little for the device to use it.
    fn publish(&mut self, qi: usize, bufs: &[(u64, u32, bool)], raw: Option<[u8; 16]>) {
        let rq = &mut self.queues[qi];
        let size = rq.q.size;
        let head = rq.next_desc;
        match raw {
            Some(raw) => {
                let at = rq.q.desc + 16 * u64::from(head);
                self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
                rq.next_desc = (head + 1) % size;
            }
            None => {
                for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
                    let id = rq.next_desc;
                    rq.next_desc = (id + 1) % size;
                    let last = i + 1 == bufs.len();
                    let flags = u16::from(writable) * 2 + u16::from(!last);
                    let at = rq.q.desc + 16 * u64::from(id);
                    self.mem.write_obj(addr, GuestAddress(at)).unwrap();
                    self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
                    self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
                    self.mem
                        .write_obj(rq.next_desc, GuestAddress(at + 14))
                        .unwrap();
                }
            }
        }
        let slot = u64::from(rq.avail_idx % size);
        self.mem
            .write_obj(head, GuestAddress(rq.q.avail + 4 + 2 * slot))
            .unwrap();
        rq.avail_idx = rq.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(rq.avail_idx, GuestAddress(rq.q.avail + 2))
            .unwrap();
        notify(&mut self.t, qi as u32);
        let used_at = GuestAddress(rq.q.used + 2);
        let deadline = Instant::now() + if rq.waits { USED_WAIT } else { Duration::ZERO };
        while Instant::now() < deadline {
            let used: u16 = self.mem.read_obj(used_at).unwrap();
            if used == rq.avail_idx {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// virtio-blk over a 64-sector temp file, read-only when the first byte says so.
pub fn block(data: &[u8]) {
    let dir = TestDir::new("fuzz-blk");
    let disk = dir.path().join("disk");
    std::fs::write(&disk, vec![0x5a; 64 * 512]).unwrap();
    let mut input = Input(data);
    let read_only = input.u8() & 1 != 0;
    let blk = Block::new(&disk, read_only).unwrap();
    Driver::new(Box::new(blk), &[(64, true)]).run(input);
}

/// The guest CID of the vsock device.
pub const VSOCK_GUEST_CID: u64 = 42;
/// A host port with a listener behind it, for the guest to connect to.
pub const VSOCK_LISTENING_PORT: u32 = 1024;

/// virtio-vsock: rx, tx and event queues, a host listener on [`VSOCK_LISTENING_PORT`], and one
/// host connection to guest port [`VSOCK_LISTENING_PORT`] already requested (its host-side
/// port is the muxer's first local port, `1 << 30`), so the guest's packets reach both kinds of
/// connection.
pub fn vsock(data: &[u8]) {
    let dir = TestDir::new("fuzz-vsock");
    let path = dir.path().join("v.sock");
    let _listener =
        UnixListener::bind(format!("{}_{VSOCK_LISTENING_PORT}", path.display())).unwrap();
    let dev = Vsock::new(VSOCK_GUEST_CID, &path).unwrap();
    let mut driver = Driver::new(Box::new(dev), &[(64, false), (64, true), (4, false)]);
    let mut host = UnixStream::connect(&path).unwrap();
    std::io::Write::write_all(
        &mut host,
        format!("CONNECT {VSOCK_LISTENING_PORT}\n").as_bytes(),
    )
    .unwrap();
    driver.run(Input(data));
}

/// virtio-9p over a temp directory holding a file, a directory and a symlink, read-only when
/// the first byte says so. The share's view confines the server to the temp directory.
pub fn fs9p(data: &[u8]) {
    let dir = TestDir::new("fuzz-9p");
    std::fs::write(dir.path().join("file"), b"hello").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/inner"), b"inner").unwrap();
    std::os::unix::fs::symlink("file", dir.path().join("link")).unwrap();
    let mut input = Input(data);
    let read_only = input.u8() & 1 != 0;
    let dev = Fs9p::with_config(&ShareConfig::dir("share", dir.path(), read_only)).unwrap();
    Driver::new(Box::new(dev), &[(64, true)]).run(input);
}

/// The 9P message parsing of `fs9p::wire` and the fid tracking of `fs9p::fids`, without a
/// server: the bytes are a list of (request, reply) pairs, each a u16 length and that many bytes.
pub fn fs9p_messages(data: &[u8]) {
    crate::devices::virtio::fs9p::fuzz_messages(data);
}

//! The driver side of split virtqueues and of the virtio-mmio register protocol, for tests: it
//! does in guest memory and through the transport's registers what a guest kernel would do.
//! The fuzz targets (feature `fuzzing`) drive devices with it too, and use only part of it.
#![cfg_attr(not(test), allow(dead_code))]

use std::collections::HashMap;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::mmio::MmioTransport;
use super::{status, GuestMemoryMmap, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

/// Guest memory for tests: 32 MiB at address 0.
pub(crate) fn guest_memory() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap())
}

/// A bump allocator for buffers in guest memory.
pub(crate) struct Alloc(u64);

impl Alloc {
    /// Buffers start at 1 MiB, above where queues live.
    pub(crate) fn new() -> Self {
        Self(1 << 20)
    }

    pub(crate) fn take(&mut self, len: u64) -> u64 {
        let addr = self.0;
        self.0 = (self.0 + len + 15) & !15;
        addr
    }
}

/// One buffer of a descriptor chain: address, length, device-writable.
pub(crate) type Buf = (u64, u32, bool);

/// A split virtqueue as the driver keeps it.
pub(crate) struct GuestQueue {
    mem: Arc<GuestMemoryMmap>,
    pub(crate) size: u16,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    free: Vec<u16>,
    avail_idx: u16,
    used_seen: u16,
    chains: HashMap<u16, Vec<u16>>,
}

impl GuestQueue {
    /// Lays out a queue of `size` entries at `base` (64 KiB is enough for 256 entries).
    pub(crate) fn new(mem: &Arc<GuestMemoryMmap>, base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let avail = base + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        let q = Self {
            mem: mem.clone(),
            size,
            desc: base,
            avail,
            used,
            free: (0..size).rev().collect(),
            avail_idx: 0,
            used_seen: 0,
            chains: HashMap::new(),
        };
        mem.write_obj(0u16, GuestAddress(avail)).unwrap();
        mem.write_obj(0u16, GuestAddress(avail + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(used + 2)).unwrap();
        q
    }

    /// Publishes a chain made of `bufs`; returns its head index.
    pub(crate) fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let ids: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let at = self.desc + 16 * u64::from(ids[i]);
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let head = ids[0];
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        self.chains.insert(head, ids);
        head
    }

    /// Publishes a chain of one descriptor that refers to an indirect table, written at
    /// `table`, of `bufs`; returns its head index.
    pub(crate) fn add_indirect_chain(&mut self, table: u64, bufs: &[Buf]) -> u16 {
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let at = table + 16 * i as u64;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem
                .write_obj((i + 1) as u16, GuestAddress(at + 14))
                .unwrap();
        }
        let head = self.add_chain(&[(table, 16 * bufs.len() as u32, false)]);
        let flags_at = self.desc + 16 * u64::from(head) + 12;
        self.mem
            .write_obj(DESC_F_INDIRECT, GuestAddress(flags_at))
            .unwrap();
        head
    }

    /// Takes the next used element, if the device produced one: (head, written length).
    pub(crate) fn pop_used(&mut self) -> Option<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let slot = u64::from(self.used_seen % self.size);
        let at = self.used + 4 + 8 * slot;
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        let head = id as u16;
        let ids = self.chains.remove(&head).expect("used id is a live chain");
        self.free.extend(ids);
        Some((head, len))
    }

    /// Waits (polling) up to 5 s for a used element.
    pub(crate) fn wait_used(&mut self) -> (u16, u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Some(u) = self.pop_used() {
                return u;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no used buffer in 5 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

pub(crate) fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub(crate) fn write32(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Runs the driver's initialisation sequence (virtio 1.2, 3.1.1) with `queues`, accepting
/// every offered feature. Returns the negotiated features.
pub(crate) fn driver_init(t: &mut MmioTransport, queues: &[&GuestQueue]) -> u64 {
    write32(t, 0x70, 0);
    write32(t, 0x70, status::ACKNOWLEDGE);
    write32(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    let mut features = 0u64;
    for sel in 0..2u32 {
        write32(t, 0x14, sel);
        features |= u64::from(read32(t, 0x10)) << (32 * sel);
    }
    assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
    for sel in 0..2u32 {
        write32(t, 0x24, sel);
        write32(t, 0x20, (features >> (32 * sel)) as u32);
    }
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write32(t, 0x70, s);
    assert_eq!(read32(t, 0x70), s, "device refused our features");
    for (i, q) in queues.iter().enumerate() {
        setup_queue(t, i as u32, q);
    }
    write32(t, 0x70, s | status::DRIVER_OK);
    features
}

fn setup_queue(t: &mut MmioTransport, index: u32, q: &GuestQueue) {
    write32(t, 0x30, index);
    assert!(read32(t, 0x34) >= u32::from(q.size));
    write32(t, 0x38, u32::from(q.size));
    for (reg, addr) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
        write32(t, reg, addr as u32);
        write32(t, reg + 4, (addr >> 32) as u32);
    }
    write32(t, 0x44, 1);
}

/// A transport around `device` with a fresh interrupt.
pub(crate) fn transport(
    device: Box<dyn VirtioDevice>,
    mem: &Arc<GuestMemoryMmap>,
) -> (MmioTransport, Arc<Interrupt>) {
    let irq = Arc::new(Interrupt::new().unwrap());
    let t = MmioTransport::new(device, mem.clone(), irq.clone()).unwrap();
    (t, irq)
}

/// Notifies queue `index` through the QueueNotify register.
pub(crate) fn notify(t: &mut MmioTransport, index: u32) {
    write32(t, 0x50, index);
}

/// A directory under the system temp dir, removed with its contents on drop.
pub(crate) struct TestDir(std::path::PathBuf);

impl TestDir {
    pub(crate) fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("husk-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether the calling flood test should run its flood in this process. A flood measures the
/// process's resident memory, which tests running beside it in the same process would inflate,
/// so the test binary runs the test again alone in a child process (filtered to
/// `module::test`, marked by an environment variable) and passes its output on; the parent
/// returns false once the child passed.
pub(crate) fn flood_here(module: &str, test: &str) -> bool {
    const CHILD: &str = "HUSK_FLOOD_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let path = module.split_once("::").map_or(module, |(_, p)| p);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([&format!("{path}::{test}"), "--exact", "--nocapture"])
        .args(["--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{test} failed in its own process:\n{stdout}"
    );
    assert!(stdout.contains("1 passed"), "{test} did not run:\n{stdout}");
    false
}

/// Starts a measurement: resets the process's peak resident memory (VmHWM) to its current
/// resident memory and returns that, in KiB.
pub(crate) fn rss_kib() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    status_kib("VmRSS:")
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Asserts that the process's peak resident memory since `before_kib` (from [`rss_kib`]) lay
/// less than `bound_mib` above it, and prints that growth for the record.
pub(crate) fn assert_rss_growth(what: &str, before_kib: u64, bound_mib: u64) {
    let grown = status_kib("VmHWM:").saturating_sub(before_kib);
    eprintln!("flood {what}: peak RSS grew {grown} KiB (bound {bound_mib} MiB)");
    assert!(
        grown < bound_mib << 10,
        "flood {what}: peak RSS grew {grown} KiB, bound {bound_mib} MiB"
    );
}

//! virtio-blk driven through the MMIO transport and a real split queue, over a temp file.

use std::io::Write;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::devices::virtio::mmio::MmioTransport;

use crate::devices::virtio::testutil::{
    assert_rss_growth, driver_init, flood_here, guest_memory, notify, read32, rss_kib, transport,
    Alloc, GuestQueue,
};

const DISK_SECTORS: usize = 64;

/// A guest block driver: one queue, synchronous requests.
struct Driver {
    mem: Arc<GuestMemoryMmap>,
    t: MmioTransport,
    q: GuestQueue,
    alloc: Alloc,
    features: u64,
}

impl Driver {
    fn new(path: &Path, read_only: bool) -> Self {
        let mem = guest_memory();
        let blk = Block::new(path, read_only).unwrap();
        let (mut t, _irq) = transport(Box::new(blk), &mem);
        let q = GuestQueue::new(&mem, 0x1_0000, 64);
        let features = driver_init(&mut t, &[&q]);
        Self {
            mem,
            t,
            q,
            alloc: Alloc::new(),
            features,
        }
    }

    /// Sends a request; `out` is device-readable payload, `in_len` device-writable bytes.
    /// Returns (status, bytes the device wrote).
    fn request(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) -> (u8, Vec<u8>) {
        let hdr = self.alloc.take(16);
        self.mem.write_obj(kind, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        let mut bufs = vec![(hdr, 16, false)];
        if !out.is_empty() {
            let a = self.alloc.take(out.len() as u64);
            self.mem.write_slice(out, GuestAddress(a)).unwrap();
            bufs.push((a, out.len() as u32, false));
        }
        let inbuf = self.alloc.take(u64::from(in_len));
        if in_len > 0 {
            bufs.push((inbuf, in_len, true));
        }
        let st = self.alloc.take(1);
        self.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        bufs.push((st, 1, true));
        self.submit(&bufs);
        let mut data = vec![0u8; in_len as usize];
        self.mem.read_slice(&mut data, GuestAddress(inbuf)).unwrap();
        (self.mem.read_obj(GuestAddress(st)).unwrap(), data)
    }

    fn submit(&mut self, bufs: &[crate::devices::virtio::testutil::Buf]) -> u32 {
        let head = self.q.add_chain(bufs);
        notify(&mut self.t, 0);
        let (used, len) = self.q.wait_used();
        assert_eq!(used, head);
        len
    }
}

fn disk() -> TempFile {
    let tmp = TempFile::new().unwrap();
    let content: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i / 512) as u8).collect();
    tmp.as_file().write_all(&content).unwrap();
    tmp
}

#[test]
fn read_write_flush_get_id() {
    let tmp = disk();
    let mut d = Driver::new(tmp.as_path(), false);
    assert_eq!(d.features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(d.features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(read32(&mut d.t, 0x100), DISK_SECTORS as u32);

    let (status, data) = d.request(VIRTIO_BLK_T_IN, 3, &[], 1024);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert!(data[..512].iter().all(|&b| b == 3) && data[512..].iter().all(|&b| b == 4));

    let pattern: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
    let (status, _) = d.request(VIRTIO_BLK_T_OUT, 10, &pattern, 0);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, VIRTIO_BLK_S_OK);
    let mut on_disk = vec![0u8; 2048];
    tmp.as_file().read_exact_at(&mut on_disk, 10 * 512).unwrap();
    assert_eq!(on_disk, pattern);
    let (status, back) = d.request(VIRTIO_BLK_T_IN, 10, &[], 2048);
    assert_eq!((status, back), (VIRTIO_BLK_S_OK, pattern));

    let (status, id) = d.request(VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert!(id.starts_with(b"husk"));
}

#[test]
fn read_only_rejects_writes() {
    let tmp = disk();
    let mut d = Driver::new(tmp.as_path(), true);
    assert_ne!(d.features & (1 << VIRTIO_BLK_F_RO), 0);
    let (status, _) = d.request(VIRTIO_BLK_T_OUT, 0, &[0xee; 512], 0);
    assert_eq!(status, VIRTIO_BLK_S_IOERR);
    let mut first = [0u8; 512];
    tmp.as_file().read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, [0u8; 512], "disk unchanged");
    assert_eq!(d.request(VIRTIO_BLK_T_IN, 1, &[], 512).0, VIRTIO_BLK_S_OK);
}

#[test]
fn bad_requests_fail_without_harm() {
    let tmp = disk();
    let mut d = Driver::new(tmp.as_path(), false);
    let last = DISK_SECTORS as u64 - 1;
    // Crossing the end, far past it, and a sector number that overflows when scaled.
    assert_eq!(
        d.request(VIRTIO_BLK_T_IN, last, &[], 1024).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        d.request(VIRTIO_BLK_T_OUT, last, &[1; 1024], 0).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        d.request(VIRTIO_BLK_T_IN, u64::MAX, &[], 512).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        d.request(VIRTIO_BLK_T_IN, last, &[], 512).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(d.request(99, 0, &[], 0).0, VIRTIO_BLK_S_UNSUPP);

    // A header shorter than 16 bytes.
    let hdr = d.alloc.take(16);
    let st = d.alloc.take(1);
    assert_eq!(d.submit(&[(hdr, 8, false), (st, 1, true)]), 1);
    assert_eq!(
        d.mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    // A data buffer outside guest memory, and a chain with no status byte at all.
    assert_eq!(
        d.submit(&[(hdr, 16, false), (1 << 40, 512, true), (st, 1, true)]),
        0
    );
    assert_eq!(d.submit(&[(hdr, 16, false)]), 0);
    // The device still works.
    assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, &[], 512).0, VIRTIO_BLK_S_OK);
}

#[test]
fn missing_image_names_the_path() {
    let Err(e) = Block::new(Path::new("/nonexistent/husk/disk.img"), false) else {
        panic!("opened a missing file");
    };
    let msg = e.to_string();
    assert!(msg.contains("/nonexistent/husk/disk.img"), "{msg}");
    assert!(!msg.contains('\n'));
}

/// A read of `bufs` data buffers through an indirect table at `table`, with its status byte;
/// returns the status and the used length.
fn indirect_read(
    d: &mut Driver,
    table: u64,
    bufs: &[crate::devices::virtio::testutil::Buf],
) -> (u8, u32) {
    let hdr = d.alloc.take(16);
    d.mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(hdr)).unwrap();
    d.mem.write_obj(0u64, GuestAddress(hdr + 8)).unwrap();
    let st = d.alloc.take(1);
    d.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
    let mut chain = vec![(hdr, 16, false)];
    chain.extend_from_slice(bufs);
    chain.push((st, 1, true));
    let head = d.q.add_indirect_chain(table, &chain);
    notify(&mut d.t, 0);
    let (used, len) = d.q.wait_used();
    assert_eq!(used, head);
    (d.mem.read_obj(GuestAddress(st)).unwrap(), len)
}

/// A guest floods requests the caps refuse: indirect tables of 65533 data descriptors, and
/// chains describing 4 GiB (every descriptor aliasing one guest buffer) against a disk big
/// enough to serve them. Each is answered IOERR at once, without listing its descriptors or
/// moving its data; requests within the caps still work, through indirect tables too.
#[test]
fn flood_oversized_requests() {
    if !flood_here(module_path!(), "flood_oversized_requests") {
        return;
    }
    let tmp = disk();
    tmp.as_file().set_len(8 << 30).unwrap();
    let mut d = Driver::new(tmp.as_path(), false);
    let table = d.alloc.take(16 << 16);
    let buf = d.alloc.take(512);
    let legal = vec![(buf, 16, true); MAX_REQUEST_DESCRIPTORS - 2];
    assert_eq!(
        indirect_read(&mut d, table, &legal),
        (VIRTIO_BLK_S_OK, 16 * 254 + 1)
    );
    let too_many = vec![(buf, 16, true); MAX_REQUEST_DESCRIPTORS - 1];
    assert_eq!(
        indirect_read(&mut d, table, &too_many),
        (VIRTIO_BLK_S_IOERR, 1)
    );

    let many = vec![(buf, 1, true); usize::from(u16::MAX) - 2];
    let huge = vec![(buf, 16 << 20, true); 255];
    let flood = |d: &mut Driver, n: usize| {
        for i in 0..n {
            let bufs = if i % 2 == 0 { &many } else { &huge };
            assert_eq!(indirect_read(d, table, bufs), (VIRTIO_BLK_S_IOERR, 1));
        }
    };
    // One of each first, so that the tables in guest memory are resident before measuring.
    flood(&mut d, 2);
    let before = rss_kib();
    flood(&mut d, 200);
    assert_rss_growth(
        "block 200 requests of 65535 descriptors or 4 GiB",
        before,
        8,
    );
    assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, &[], 512).0, VIRTIO_BLK_S_OK);
}

//! The virtio-mmio register protocol, driven as a guest driver would, over a real block device.

use std::io::Write;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::testutil::{
    driver_init, guest_memory, notify, read32, transport, write32, Alloc, GuestQueue,
};
use crate::devices::virtio::{INT_USED_RING, TYPE_BLOCK};

fn block_on_temp_file(sectors: usize) -> (TempFile, Box<Block>) {
    let tmp = TempFile::new().unwrap();
    tmp.as_file().write_all(&vec![0xa5; sectors * 512]).unwrap();
    let block = Block::new(tmp.as_path(), false).unwrap();
    (tmp, Box::new(block))
}

#[test]
fn identifies_itself() {
    let mem = guest_memory();
    let (_tmp, blk) = block_on_temp_file(8);
    let (mut t, _irq) = transport(blk, &mem);
    assert_eq!(read32(&mut t, reg::MAGIC), 0x7472_6976);
    assert_eq!(read32(&mut t, reg::VERSION), 2);
    assert_eq!(read32(&mut t, reg::DEVICE_ID), TYPE_BLOCK);
    assert_eq!(read32(&mut t, reg::VENDOR_ID), 0);
    // Capacity (8 sectors) sits at the start of the config space, readable in any width.
    assert_eq!(read32(&mut t, reg::CONFIG), 8);
    let mut wide = [0u8; 8];
    t.read(reg::CONFIG, &mut wide);
    assert_eq!(u64::from_le_bytes(wide), 8);
    // Registers are 32-bit only: a narrow read yields zeros, not a panic.
    let mut narrow = [0xffu8; 2];
    t.read(reg::MAGIC, &mut narrow);
    assert_eq!(narrow, [0, 0]);
}

#[test]
fn feature_negotiation() {
    let mem = guest_memory();
    let (_tmp, blk) = block_on_temp_file(8);
    let (mut t, _irq) = transport(blk, &mem);
    write32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        read32(&mut t, reg::DEVICE_FEATURES) & 1,
        1,
        "VERSION_1 offered"
    );
    // A driver that does not accept VERSION_1 is refused: FEATURES_OK does not stick.
    write32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    write32(&mut t, reg::DRIVER_FEATURES, 0);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write32(&mut t, reg::STATUS, s);
    assert_eq!(read32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    // Features the device does not offer are refused as well.
    write32(&mut t, reg::DRIVER_FEATURES, 1 | (1 << 30));
    write32(&mut t, reg::STATUS, s);
    assert_eq!(read32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    write32(&mut t, reg::DRIVER_FEATURES, 1);
    write32(&mut t, reg::STATUS, s);
    assert_eq!(read32(&mut t, reg::STATUS), s);
    // Once FEATURES_OK is set, feature writes are ignored.
    write32(&mut t, reg::DRIVER_FEATURES, 0);
    assert_eq!(t.driver_features >> 32, 1);
}

#[test]
fn queue_setup_activation_notify_interrupt_and_reset() {
    let mem = guest_memory();
    let (_tmp, blk) = block_on_temp_file(8);
    let (mut t, irq) = transport(blk, &mem);
    let mut q = GuestQueue::new(&mem, 0x1_0000, 16);
    // Queue registers are ignored before FEATURES_OK.
    write32(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(read32(&mut t, reg::QUEUE_READY), 0);
    driver_init(&mut t, &[&q]);
    assert!(t.is_activated());
    assert_eq!(read32(&mut t, reg::QUEUE_NUM_MAX), 256);
    assert_eq!(read32(&mut t, reg::QUEUE_READY), 1);
    write32(&mut t, reg::QUEUE_SEL, 7);
    assert_eq!(read32(&mut t, reg::QUEUE_NUM_MAX), 0, "no such queue");

    // A GET_ID request goes through the used ring and raises the interrupt.
    let mut alloc = Alloc::new();
    let (hdr, id, st) = (alloc.take(16), alloc.take(20), alloc.take(1));
    mem.write_obj(8u32, GuestAddress(hdr)).unwrap();
    q.add_chain(&[(hdr, 16, false), (id, 20, true), (st, 1, true)]);
    notify(&mut t, 0);
    let (_, len) = q.wait_used();
    assert_eq!(len, 21);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), 0);
    wait_for(|| read32(&mut t, reg::INTERRUPT_STATUS) & INT_USED_RING != 0);
    assert!(irq.eventfd().read().unwrap() >= 1);
    write32(&mut t, reg::INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(read32(&mut t, reg::INTERRUPT_STATUS), 0);

    // Writing 0 to Status resets the device; it can then be brought up again.
    write32(&mut t, reg::STATUS, 0);
    assert_eq!(read32(&mut t, reg::STATUS), 0);
    assert!(!t.is_activated());
    assert_eq!(read32(&mut t, reg::QUEUE_READY), 0);
    let q2 = GuestQueue::new(&mem, 0x2_0000, 16);
    driver_init(&mut t, &[&q2]);
    assert!(t.is_activated());
}

#[test]
fn queue_outside_memory_needs_reset() {
    let mem = guest_memory();
    let (_tmp, blk) = block_on_temp_file(8);
    let (mut t, _irq) = transport(blk, &mem);
    let mut q = GuestQueue::new(&mem, 0x1_0000, 16);
    q.used = 0x1_0000_0000; // beyond the 32 MiB of guest memory
    driver_init(&mut t, &[&q]);
    assert!(!t.is_activated());
    assert_ne!(read32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn notify_eventfds_are_exposed() {
    let mem = guest_memory();
    let (_tmp, blk) = block_on_temp_file(8);
    let (mut t, _irq) = transport(blk, &mem);
    assert_eq!(t.queue_notify_eventfds().len(), 1);
    notify(&mut t, 0);
    assert_eq!(t.queue_notify_eventfds()[0].read().unwrap(), 1);
    notify(&mut t, 5); // unknown queue: logged, ignored
}

fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met in 5 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

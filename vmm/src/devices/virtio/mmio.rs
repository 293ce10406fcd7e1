//! The virtio-mmio transport, version 2 ("modern"), as in virtio 1.2 section 4.2.2.
//!
//! One transport owns one [`VirtioDevice`] and answers guest accesses to its 0x1000-byte window.
//! It keeps the queue configuration the driver writes, and on DRIVER_OK it builds the
//! `virtio_queue::Queue`s and hands them, with one notification eventfd per queue, to the device.

use std::io;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{status, GuestMemoryMmap, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Size of the MMIO window of one device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
/// No registered vendor; 0 is what most VMMs report.
const VENDOR_ID: u32 = 0;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// What the driver wrote about one queue, kept until activation (and saved in snapshots).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    /// Where the device goes on in the rings: 0 for a fresh queue, the saved positions for
    /// one restored from a snapshot.
    next_avail: u16,
    next_used: u16,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }

    /// Builds the queue the device will run, or None if the driver's values are unusable.
    fn build(&self, mem: &GuestMemoryMmap) -> Option<Queue> {
        let mut q = Queue::new(self.max_size).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_desc_table_address(vm_memory::GuestAddress(self.desc))
            .ok()?;
        q.try_set_avail_ring_address(vm_memory::GuestAddress(self.avail))
            .ok()?;
        q.try_set_used_ring_address(vm_memory::GuestAddress(self.used))
            .ok()?;
        q.set_ready(self.ready);
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        // An unused queue stays "not ready"; a ready one must lie inside guest memory.
        (!self.ready || q.is_valid(mem)).then_some(q)
    }
}

/// The virtio-mmio transport of one device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<Interrupt>,
    notifies: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`; creates one notification eventfd per queue.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<Interrupt>,
    ) -> io::Result<Self> {
        let queues: Vec<QueueConfig> = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueConfig::new(m))
            .collect();
        let notifies = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            notifies,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The eventfd signalled when the driver notifies queue `i` (index = position). The VMM may
    /// register these as KVM ioeventfds on `base + 0x50` with datamatch `i`; then QueueNotify
    /// writes never reach this transport and the device sees the same eventfds signalled.
    pub fn queue_notify_eventfds(&self) -> &[EventFd] {
        &self.notifies
    }

    /// The interrupt shared with the device (its eventfd is the irqfd).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device status register as the driver last set it.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is running (DRIVER_OK seen and activation succeeded).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Stops the device and its worker threads (as on a driver reset). Call before tearing the
    /// VM down; dropping the transport has the same effect.
    pub fn shutdown(&mut self) {
        self.reset();
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn device_features_word(&self) -> u32 {
        let features = self.device.avail_features();
        match self.device_features_sel {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => self.device_features_word(),
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: a length of all ones means "absent".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => self.notify_queue(v),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => self.write_queue_reg(offset, v),
            _ => log::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        // Features are fixed once FEATURES_OK is set (virtio 1.2, 3.1.1).
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            log::warn!(
                "virtio-mmio: driver features written in status {:#x}",
                self.status
            );
            return;
        }
        let v = u64::from(v);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
            _ => {}
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        // Queue layout may change only between FEATURES_OK and DRIVER_OK.
        if self.status & status::FEATURES_OK == 0 || self.status & status::DRIVER_OK != 0 {
            log::warn!(
                "virtio-mmio: queue register written in status {:#x}",
                self.status
            );
            return;
        }
        let Some(q) = self.selected_queue() else {
            return;
        };
        let v64 = u64::from(v);
        match offset {
            reg::QUEUE_NUM => q.size = v as u16,
            reg::QUEUE_READY => q.ready = v == 1,
            reg::QUEUE_DESC_LOW => q.desc = (q.desc & !0xffff_ffff) | v64,
            reg::QUEUE_DESC_HIGH => q.desc = (q.desc & 0xffff_ffff) | (v64 << 32),
            reg::QUEUE_AVAIL_LOW => q.avail = (q.avail & !0xffff_ffff) | v64,
            reg::QUEUE_AVAIL_HIGH => q.avail = (q.avail & 0xffff_ffff) | (v64 << 32),
            reg::QUEUE_USED_LOW => q.used = (q.used & !0xffff_ffff) | v64,
            reg::QUEUE_USED_HIGH => q.used = (q.used & 0xffff_ffff) | (v64 << 32),
            _ => {}
        }
    }

    fn notify_queue(&mut self, index: u32) {
        match self.notifies.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::warn!("virtio-mmio: cannot signal queue {index}: {e}");
                }
            }
            None => log::warn!("virtio-mmio: notify for unknown queue {index}"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits; anything else is a confused driver we ignore.
        if v & self.status != self.status {
            log::warn!(
                "virtio-mmio: status {:#x} -> {v:#x} clears bits",
                self.status
            );
            return;
        }
        let new_bits = v & !self.status;
        let mut v = v;
        if new_bits & status::FEATURES_OK != 0 && !self.accept_features() {
            // Leaving FEATURES_OK clear tells the driver we refused its features.
            v &= !status::FEATURES_OK;
        }
        self.status = v;
        if new_bits & status::DRIVER_OK != 0 && v & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    /// Checks the driver's features at FEATURES_OK and hands them to the device.
    fn accept_features(&mut self) -> bool {
        let offered = self.device.avail_features();
        let wanted = self.driver_features;
        if wanted & !offered != 0 || wanted & (1 << VIRTIO_F_VERSION_1) == 0 {
            log::warn!("virtio-mmio: driver features {wanted:#x} not acceptable ({offered:#x})");
            return false;
        }
        self.device.ack_features(wanted);
        true
    }

    fn activate(&mut self) {
        let queues: Option<Vec<Queue>> = self.queues.iter().map(|q| q.build(&self.mem)).collect();
        let result = match queues {
            Some(queues) => self.clone_notifies().and_then(|notifies| {
                self.device
                    .activate(self.mem.clone(), queues, notifies, self.interrupt.clone())
                    .map_err(|e| e.to_string())
            }),
            None => Err("a queue lies outside guest memory".to_string()),
        };
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::error!("virtio-mmio: cannot activate device: {e}");
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }

    fn clone_notifies(&self) -> Result<Vec<EventFd>, String> {
        self.notifies
            .iter()
            .map(|e| e.try_clone().map_err(|e| e.to_string()))
            .collect()
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        // Drain notifications that arrived for the old queues.
        for evt in &self.notifies {
            let _ = evt.read();
        }
        self.interrupt.clear();
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            // Registers below the config space are 32-bit only (virtio 1.2, 4.2.2.2).
            log::warn!(
                "virtio-mmio: bad read of {} bytes at {offset:#x}",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::warn!(
                "virtio-mmio: bad write of {} bytes at {offset:#x}",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            log::warn!("virtio-mmio: unaligned write at {offset:#x}");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        if self.activated {
            self.device.reset();
        }
    }
}

#[cfg(test)]
mod tests;
mod transport_state;

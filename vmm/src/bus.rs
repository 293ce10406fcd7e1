//! The interface between the vCPU exit loop and emulated devices.
//!
//! A device sees only offsets inside its own window; the bus that owns the windows (in the VM
//! builder) translates guest addresses or I/O ports into (device, offset).

/// A device that answers guest port-I/O or MMIO accesses inside its window.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` within the device window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` within the device window.
    fn write(&mut self, offset: u64, data: &[u8]);
}

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device shared between the bus and whoever built it (tests keep a handle to inspect it).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Two windows of one bus overlap.
#[derive(Debug, thiserror::Error)]
#[error("bus window {base:#x}+{len:#x} is empty or overlaps another device")]
pub struct BusOverlap {
    /// Start of the rejected window.
    pub base: u64,
    /// Length of the rejected window.
    pub len: u64,
}

/// A map of non-overlapping address windows to devices (one for port I/O, one for MMIO).
///
/// It is built before the vCPUs start and only read afterwards, so vCPU threads share it
/// through an `Arc` without locking the map; each device has its own lock.
#[derive(Default)]
pub struct Bus {
    windows: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusOverlap> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let overlaps = |end: u64| {
            let before = self.windows.range(..end).next_back();
            before.is_some_and(|(b, (l, _))| b + l > base)
        };
        match end {
            Some(end) if !overlaps(end) => {
                self.windows.insert(base, (len, device));
                Ok(())
            }
            _ => Err(BusOverlap { base, len }),
        }
    }

    /// The device whose window holds `addr`, and the offset of `addr` in it.
    fn resolve(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let (base, (len, dev)) = self.windows.range(..=addr).next_back()?;
        (addr - base < *len).then_some((dev, addr - base))
    }

    /// Forwards a guest read; returns false (and fills `data` with 0xff, like an empty ISA
    /// bus) when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Forwards a guest write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if another vCPU panicked while holding it: device state stays usable
/// enough to report the failure instead of cascading panics.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u64);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill((self.0 + offset) as u8);
        }
        fn write(&mut self, offset: u64, _data: &[u8]) {
            self.0 = offset;
        }
    }

    #[test]
    fn windows_resolve_and_reject_overlap() {
        let mut bus = Bus::new();
        bus.insert(0x10, 0x10, Arc::new(Mutex::new(Echo(0))))
            .unwrap();
        assert!(bus.insert(0x18, 4, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0x8, 9, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0x20, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
        bus.insert(0x20, 1, Arc::new(Mutex::new(Echo(0x40))))
            .unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x13, &mut b));
        assert_eq!(b, [3, 3]);
        assert!(bus.read(0x20, &mut b));
        assert_eq!(b, [0x40, 0x40]);
        assert!(!bus.read(0x21, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(!bus.write(0x0f, &b));
    }
}

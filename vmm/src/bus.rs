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

//! Guest physical memory: layout constants and the anonymous RAM mapping.
//!
//! RAM runs from 0 up to `min(size, 3 GiB)`; anything beyond continues at 4 GiB, leaving the
//! top gigabyte below 4 GiB for MMIO (virtio windows at 0xd000_0000, IOAPIC, LAPIC).

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::error::VmError;

/// The guest's RAM.
pub type GuestMemory = GuestMemoryMmap<()>;

const MIB: u64 = 1 << 20;
/// Smallest RAM we accept: less cannot hold a kernel, its page tables and an initramfs.
pub const MIN_MEMORY_MIB: u32 = 64;
/// End of the low RAM block; the hole up to 4 GiB is MMIO.
pub const LOW_RAM_END: u64 = 3 << 30;
/// Where RAM continues above the MMIO hole.
pub const HIGH_RAM_START: u64 = 4 << 30;
/// First virtio-mmio window; each device gets `VIRTIO_MMIO_SIZE` bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio devices (0-4 are timer, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable IOAPIC pin for virtio devices.
pub const VIRTIO_IRQ_LAST: u32 = 23;

/// The guest-physical (start, length) blocks of RAM for `size_mib`.
pub fn ram_ranges(size_mib: u32) -> Vec<(GuestAddress, usize)> {
    let size = u64::from(size_mib) * MIB;
    let low = size.min(LOW_RAM_END);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(HIGH_RAM_START), (size - low) as usize));
    }
    ranges
}

/// Maps anonymous RAM for `size_mib` MiB (pages are only touched when the guest uses them).
pub fn create_guest_memory(size_mib: u32) -> Result<GuestMemory, VmError> {
    if size_mib < MIN_MEMORY_MIB {
        return Err(VmError::Config(format!(
            "memory {size_mib} MiB is below the minimum of {MIN_MEMORY_MIB} MiB"
        )));
    }
    GuestMemory::from_ranges(&ram_ranges(size_mib)).map_err(|e| VmError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(64), vec![(GuestAddress(0), 64 << 20)]);
        let big = ram_ranges(4096);
        assert_eq!(big[0], (GuestAddress(0), (3usize << 30)));
        assert_eq!(big[1], (GuestAddress(4 << 30), (1usize << 30)));
    }
}

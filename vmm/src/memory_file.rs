//! The guest memory file: RAM regions one after another, each at a page-aligned offset.
//!
//! Writing skips all-zero blocks (the file is sparse there), so a mostly idle guest makes a
//! small file. Restoring maps the file `MAP_PRIVATE`: pages are read on first touch from the
//! page cache, shared by every clone until one writes, and writes never reach the file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
};

use crate::error::VmError;
use crate::memory::GuestMemory;

/// Zero detection and copying work in blocks of this size.
const BLOCK: usize = 64 << 10;
/// Region offsets in the file are multiples of this (so each region can be mapped).
const PAGE: u64 = 4096;

/// Where one RAM region lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// The layout of `mem` in a memory file.
pub fn layout(mem: &GuestMemory) -> Vec<RegionLayout> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let region = RegionLayout {
                guest_addr: r.start_addr().0,
                len: r.len(),
                file_offset: offset,
            };
            offset += r.len().div_ceil(PAGE) * PAGE;
            region
        })
        .collect()
}

/// The size the memory file of `layout` must have.
pub fn file_size(layout: &[RegionLayout]) -> u64 {
    layout
        .last()
        .map_or(0, |r| r.file_offset + r.len.div_ceil(PAGE) * PAGE)
}

/// Writes guest RAM to `file` (which must be empty) as `layout` says.
pub fn write(mem: &GuestMemory, layout: &[RegionLayout], file: &File) -> io::Result<()> {
    file.set_len(file_size(layout))?;
    let mut buf = vec![0u8; BLOCK];
    for region in layout {
        let mut done = 0u64;
        while done < region.len {
            let n = (region.len - done).min(BLOCK as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(region.guest_addr + done))
                .map_err(io::Error::other)?;
            // Untouched (zero) blocks stay holes: set_len already made them read as zero.
            if buf[..n].iter().any(|&b| b != 0) {
                file.write_all_at(&buf[..n], region.file_offset + done)?;
            }
            done += n as u64;
        }
    }
    Ok(())
}

/// Maps the memory file at `path` copy-on-write as guest RAM laid out as `layout`; refuses a
/// file of the wrong size.
pub fn map(path: &Path, layout: &[RegionLayout]) -> Result<GuestMemory, VmError> {
    let file = File::open(path).map_err(|source| VmError::SnapshotIo {
        path: path.to_path_buf(),
        source,
    })?;
    size_matches(path, &file, layout)?;
    let file = Arc::new(file);
    let regions = layout
        .iter()
        .map(|r| map_region(&file, r))
        .collect::<Result<Vec<_>, String>>()
        .map_err(VmError::Memory)?;
    GuestMemory::from_regions(regions).map_err(|e| VmError::Memory(e.to_string()))
}

/// Refuses a memory file at `path` whose size does not fit `layout`.
pub fn check_size(path: &Path, layout: &[RegionLayout]) -> Result<(), VmError> {
    let file = File::open(path).map_err(|source| VmError::SnapshotIo {
        path: path.to_path_buf(),
        source,
    })?;
    size_matches(path, &file, layout)
}

fn size_matches(path: &Path, file: &File, layout: &[RegionLayout]) -> Result<(), VmError> {
    let found = file
        .metadata()
        .map_err(|source| VmError::SnapshotIo {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let expected = file_size(layout);
    if found != expected {
        return Err(VmError::SnapshotMemorySize {
            path: path.to_path_buf(),
            found,
            expected,
        });
    }
    Ok(())
}

fn map_region(file: &Arc<File>, r: &RegionLayout) -> Result<GuestRegionMmap<()>, String> {
    let len = usize::try_from(r.len).map_err(|e| e.to_string())?;
    // MAP_NORESERVE: a clone is charged only for the pages it writes, like anonymous RAM.
    let mapping = MmapRegionBuilder::new(len)
        .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| format!("mapping the memory file: {e}"))?;
    GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
        .ok_or_else(|| format!("region at {:#x} overflows", r.guest_addr))
}

//! Guest RAM as page-out and page-in see it: its host mappings, what the pages not present in
//! them read as, and the mapping changes that release RAM or hand it to the pager.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::GuestMemory;

/// What a guest page that is not present in its host mapping reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backing {
    /// Anonymous memory: zero.
    Anon,
    /// A `MAP_PRIVATE` mapping of the memory file with this (device, inode): the file's page.
    File { dev: u64, ino: u64 },
    /// Registered with the pager's userfaultfd: whatever the page file says.
    Lazy,
}

/// Identity of an open file, to compare with `Backing::File`.
pub(crate) fn file_id(file: &File) -> io::Result<Backing> {
    let m = file.metadata()?;
    Ok(Backing::File {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// One RAM region: where it is for the guest and for us.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostRegion {
    pub(crate) guest_addr: u64,
    pub(crate) host: usize,
    pub(crate) len: usize,
}

/// The host mappings of `mem`'s regions.
pub(crate) fn host_regions(mem: &GuestMemory) -> Vec<HostRegion> {
    mem.iter()
        .filter_map(|r| {
            let host = r.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
            Some(HostRegion {
                guest_addr: r.start_addr().0,
                host,
                len: r.len() as usize,
            })
        })
        .collect()
}

/// Replaces the region's mapping, at the same host address, with `fd` at `offset` (a file,
/// private) or fresh anonymous memory (`fd` -1). The address stays, so KVM's memory slots stay
/// valid: KVM follows the change through its MMU notifier.
fn remap(r: &HostRegion, fd: i32, offset: u64) -> io::Result<()> {
    let kind = if fd < 0 { libc::MAP_ANONYMOUS } else { 0 };
    // SAFETY: the range is guest RAM this VM owns (mapped by vm-memory, unmapped only when the
    // memory is dropped), the VM is paused with its devices held, so nothing uses it meanwhile;
    // MAP_FIXED replaces exactly that range.
    let at = unsafe {
        libc::mmap(
            r.host as *mut libc::c_void,
            r.len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE | kind,
            fd,
            offset as libc::off_t,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fresh anonymous memory over the region.
pub(crate) fn remap_anonymous(r: &HostRegion) -> io::Result<()> {
    remap(r, -1, 0)
}

/// The region becomes `file` at `offset`, copy-on-write (a clone's layout).
pub(crate) fn remap_file(r: &HostRegion, file: &File, offset: u64) -> io::Result<()> {
    remap(r, file.as_raw_fd(), offset)
}

/// Drops the region's pages: anonymous memory reads zero again, a private file mapping reads
/// the file again.
pub(crate) fn dontneed(r: &HostRegion) -> io::Result<()> {
    // SAFETY: as in `remap`; MADV_DONTNEED only drops pages of our own mapping.
    let rc = unsafe { libc::madvise(r.host as *mut libc::c_void, r.len, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

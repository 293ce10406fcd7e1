//! Finding the guest pages that differ from their base and writing them into a page file.
//!
//! /proc/self/pagemap says which pages are present in our mapping: a page that is not (and not
//! swapped) reads as what the mapping's backing gives, so when that is the base it is skipped
//! without being touched; a file page still shared with the page cache is the base's own. Every
//! other page is read and compared with the base (zero, or the base file's page).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::on_disk::{BLOCK_BYTES, PAGE};
use super::ram::HostRegion;
use super::Writer;
use crate::error::VmError;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// What the base of a page-out is and what the mapping's absent pages are.
pub(crate) struct ScanBase<'a> {
    /// The base file, its path and each region's offset in it; `None`: the base is zero.
    pub(crate) file: Option<(&'a File, &'a Path, Vec<u64>)>,
    /// Absent pages read as the base (so they are skipped unread).
    pub(crate) absent_is_base: bool,
    /// Present file pages are the base file's (the mapping is the base file).
    pub(crate) file_pages_are_base: bool,
}

/// Writes every page of `regions` that differs from `base` into `w`; returns pages stored.
pub(crate) fn write_pages(
    regions: &[HostRegion],
    base: &ScanBase,
    w: &mut Writer,
) -> Result<u64, VmError> {
    let pagemap_path = Path::new("/proc/self/pagemap");
    let pagemap = File::open(pagemap_path).map_err(|source| VmError::PageFileIo {
        path: pagemap_path.to_path_buf(),
        source,
    })?;
    let mut chunk = Chunk::default();
    let mut stored = 0;
    for (i, r) in regions.iter().enumerate() {
        let base_file = base
            .file
            .as_ref()
            .map(|(f, p, offsets)| (*f, *p, offsets[i]));
        for at in (0..r.len).step_by(BLOCK_BYTES) {
            let len = BLOCK_BYTES.min(r.len - at);
            chunk.flags(&pagemap, r.host + at, len / PAGE)?;
            let base_at = base_file.map(|(f, p, o)| (f, p, o + at as u64));
            chunk.collect(r.host + at, len, base, base_at)?;
            if chunk.mask != 0 {
                stored += u64::from(chunk.mask.count_ones());
                w.add_block(r.guest_addr + at as u64, chunk.mask, &chunk.raw)?;
            }
        }
    }
    Ok(stored)
}

/// Scratch for one chunk.
#[derive(Default)]
struct Chunk {
    flags: Vec<u64>,
    base: Vec<u8>,
    raw: Vec<u8>,
    mask: u16,
}

impl Chunk {
    /// Reads the pagemap entries of the `pages` pages from host address `host`.
    fn flags(&mut self, pagemap: &File, host: usize, pages: usize) -> Result<(), VmError> {
        let mut bytes = vec![0u8; pages * 8];
        pagemap
            .read_exact_at(&mut bytes, (host / PAGE * 8) as u64)
            .map_err(|source| VmError::PageFileIo {
                path: "/proc/self/pagemap".into(),
                source,
            })?;
        self.flags = bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect();
        Ok(())
    }

    /// Gathers the pages of the chunk at `host` (`len` bytes) that differ from the base.
    fn collect(
        &mut self,
        host: usize,
        len: usize,
        base: &ScanBase,
        base_file: Option<(&File, &Path, u64)>,
    ) -> Result<(), VmError> {
        self.raw.clear();
        self.mask = 0;
        let mut base_read = false;
        for (i, &flags) in self.flags.iter().enumerate() {
            let absent = flags & (PM_PRESENT | PM_SWAPPED) == 0;
            if (absent && base.absent_is_base) || (flags & PM_FILE != 0 && base.file_pages_are_base)
            {
                continue;
            }
            // SAFETY: the page lies in a live guest RAM mapping; the VM is paused and its
            // devices held, so nothing writes it while we read.
            let page = unsafe { std::slice::from_raw_parts((host + i * PAGE) as *const u8, PAGE) };
            let same = match base_file {
                None => is_zero(page),
                Some((file, path, offset)) => {
                    if !base_read {
                        self.base.resize(len, 0);
                        file.read_exact_at(&mut self.base, offset)
                            .map_err(|source| VmError::PageFileIo {
                                path: path.to_path_buf(),
                                source,
                            })?;
                        base_read = true;
                    }
                    page == &self.base[i * PAGE..(i + 1) * PAGE]
                }
            };
            if !same {
                self.raw.extend_from_slice(page);
                self.mask |= 1 << i;
            }
        }
        Ok(())
    }
}

/// True if every byte of `page` is zero (compared a word at a time).
pub(crate) fn is_zero(page: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128.
    let (head, words, tail) = unsafe { page.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

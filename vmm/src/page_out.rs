//! Page-out and page-in of a paused VM through its [`VmControl`], on the page files of
//! [`crate::pagefile`]; and the page-file side of checkpoints: writing one while keeping the
//! RAM, and starting the lazy pager of a VM restored from one.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::error::VmError;
use crate::memory::GuestMemory;
use crate::memory_file;
use crate::pagefile::on_disk::{self, BaseFile, Region, PAGE};
use crate::pagefile::ram::{self, Backing, HostRegion};
use crate::pagefile::scan::{self, ScanBase};
use crate::pagefile::{
    Codec, PageFile, PageInMode, PageInReport, PageOutReport, Pager, RamState, Writer,
    DEFAULT_CODEC,
};
use crate::pause::{VmControl, VmParts};
use crate::persist;
use crate::stop::StopState;

/// Where a VM's memory is, as [`VmControl::page_state`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageState {
    /// In RAM.
    Resident,
    /// In RAM, except chunks the lazy pager has not brought back yet.
    Lazy,
    /// Released; the memory is in this page file.
    PagedOut(PathBuf),
}

impl VmControl {
    /// Writes the paused VM's memory into the page file `path` with the default codec and
    /// releases the RAM (see [`VmControl::page_out_with`]).
    pub fn page_out(&self, path: &Path, base: Option<&Path>) -> Result<PageOutReport, VmError> {
        self.page_out_with(path, base, DEFAULT_CODEC)
    }

    /// Writes every page of the paused VM that differs from `base` (the template's memory file
    /// the VM was cloned from; `None`: zero) into the page file `path`, makes the file durable,
    /// and only then releases the RAM. The devices stay held until [`VmControl::page_in`]
    /// (they must not touch released memory); resuming pages in lazily first if needed.
    /// On an error before the file is durable the RAM is untouched.
    pub fn page_out_with(
        &self,
        path: &Path,
        base: Option<&Path>,
        codec: Codec,
    ) -> Result<PageOutReport, VmError> {
        let parts = self.paused_parts()?;
        let mut ram = parts.ram();
        if let Some(p) = &ram.paged_out {
            return Err(VmError::SnapshotState(format!(
                "the VM's memory is already paged out to {}",
                p.display()
            )));
        }
        persist::quiesce_all(&parts.devices)?;
        let result = page_out_held(&parts, &mut ram, path, base, codec);
        if ram.paged_out.is_none() {
            persist::release_all(&parts.devices);
        }
        result
    }

    /// Brings the memory paged out to `path` back, lazily or eagerly; the VM stays paused
    /// (call [`VmControl::resume`]). A damaged page file is refused (or, lazily, stops the VM
    /// at the first fault in a damaged block): the guest never runs on wrong memory.
    pub fn page_in(&self, path: &Path, mode: PageInMode) -> Result<PageInReport, VmError> {
        let start = Instant::now();
        let parts = self.paused_parts()?;
        let mut ram = parts.ram();
        match &ram.paged_out {
            Some(p) if p == path => {}
            Some(p) => {
                return Err(VmError::SnapshotState(format!(
                    "the VM's memory is paged out to {}, not {}",
                    p.display(),
                    path.display()
                )))
            }
            None => {
                return Err(VmError::SnapshotState(
                    "the VM's memory is not paged out".into(),
                ))
            }
        }
        let file = PageFile::open(path)?;
        let regions = ram::host_regions(&parts.mem);
        check_regions(path, &file, &regions)?;
        let base = file.open_base(ram.paged_out_base.as_deref())?;
        let blocks = file.index().blocks.len();
        match mode {
            PageInMode::Eager => page_in_eager(&file, &regions)?,
            PageInMode::Lazy => {
                ram.pager = Some(Pager::start(file, base, &regions, self.stop_state())?);
                ram.backing = Backing::Lazy;
            }
        }
        ram.paged_out = None;
        ram.paged_out_base = None;
        persist::release_all(&parts.devices);
        Ok(PageInReport {
            mode,
            blocks,
            took: start.elapsed(),
        })
    }

    /// Where the VM's memory is (resident if the VM has ended).
    pub fn page_state(&self) -> PageState {
        let Ok(parts) = self.parts() else {
            return PageState::Resident;
        };
        let ram = parts.ram();
        match (&ram.paged_out, ram.backing) {
            (Some(p), _) => PageState::PagedOut(p.clone()),
            (None, Backing::Lazy) if ram.pager.is_some() => PageState::Lazy,
            _ => PageState::Resident,
        }
    }

    /// Before vCPUs run again: memory still paged out comes back lazily.
    pub(crate) fn page_in_for_resume(&self) -> Result<(), VmError> {
        if let PageState::PagedOut(path) = self.page_state() {
            self.page_in(&path, PageInMode::Lazy)?;
        }
        Ok(())
    }

    fn paused_parts(&self) -> Result<Arc<VmParts>, VmError> {
        let parts = self.parts()?;
        if self.is_stopping() {
            return Err(VmError::SnapshotState("the VM is stopping".into()));
        }
        if !self.is_paused() {
            return Err(VmError::SnapshotState("the VM is not paused".into()));
        }
        Ok(parts)
    }
}

/// The page-out proper, with the devices held.
fn page_out_held(
    parts: &VmParts,
    ram: &mut RamState,
    path: &Path,
    base: Option<&Path>,
    codec: Codec,
) -> Result<PageOutReport, VmError> {
    let written = write_held(parts, ram, path, base, codec)?;
    // The page file is durable: from here on the VM can only come back from it.
    ram.paged_out = Some(path.to_path_buf());
    ram.paged_out_base = base.map(Path::to_path_buf);
    let t = Instant::now();
    release(
        ram,
        &written.regions,
        written
            .base
            .as_ref()
            .map(|(_, f, _)| (f, &written.offsets[..])),
        written.mapping_is_base,
    )
    .map_err(|source| VmError::PageFileIo {
        path: path.to_path_buf(),
        source,
    })?;
    let mut report = written.report;
    report.release_time = t.elapsed();
    Ok(report)
}

/// A page file just written, and what releasing the RAM after it needs to know.
struct Written {
    regions: Vec<HostRegion>,
    offsets: Vec<u64>,
    base: Option<(PathBuf, File, BaseFile)>,
    mapping_is_base: bool,
    report: PageOutReport,
}

/// Writes the page file of a paused VM with its devices held, leaving the RAM as it is (a
/// lazy page-in still going on is completed first).
fn write_held(
    parts: &VmParts,
    ram: &mut RamState,
    path: &Path,
    base: Option<&Path>,
    codec: Codec,
) -> Result<Written, VmError> {
    if let Some(pager) = ram.pager.take() {
        pager.finish()?;
        ram.backing = Backing::Anon;
    }
    let regions = ram::host_regions(&parts.mem);
    let layout = memory_file::layout(&parts.mem);
    let offsets: Vec<u64> = layout.iter().map(|l| l.file_offset).collect();
    let base = base
        .map(|p| open_base(p, memory_file::file_size(&layout)))
        .transpose()?;
    let base_id = match &base {
        Some((_, f, _)) => Some(ram::file_id(f).map_err(|source| VmError::PageFileIo {
            path: path.to_path_buf(),
            source,
        })?),
        None => None,
    };
    let mapping_is_base = match base_id {
        Some(id) => ram.backing == id,
        None => ram.backing == Backing::Anon,
    };
    let scan = ScanBase {
        file: base
            .as_ref()
            .map(|(p, f, _)| (f, p.as_path(), offsets.clone())),
        absent_is_base: mapping_is_base,
        file_pages_are_base: mapping_is_base && base_id.is_some(),
    };
    let t = Instant::now();
    let mut w = Writer::create(path, codec)?;
    let stored = scan::write_pages(&regions, &scan, &mut w)?;
    let saved_regions = regions
        .iter()
        .zip(&offsets)
        .map(|(r, &base_offset)| Region {
            guest_addr: r.guest_addr,
            len: r.len as u64,
            base_offset,
        })
        .collect();
    let (raw_bytes, file_bytes) = w.finish(saved_regions, base.as_ref().map(|b| b.2.clone()))?;
    let report = PageOutReport {
        path: path.to_path_buf(),
        codec,
        pages_stored: stored,
        ram_bytes: regions.iter().map(|r| r.len as u64).sum(),
        raw_bytes,
        file_bytes,
        write_time: t.elapsed(),
        release_time: std::time::Duration::ZERO,
    };
    Ok(Written {
        regions,
        offsets,
        base,
        mapping_is_base,
        report,
    })
}

/// Writes the page file of a paused VM whose devices are held and keeps the RAM (a
/// checkpoint): returns what was written.
pub(crate) fn write_keeping_ram(
    parts: &VmParts,
    path: &Path,
    base: Option<&Path>,
) -> Result<PageOutReport, VmError> {
    let mut ram = parts.ram();
    if let Some(p) = &ram.paged_out {
        return Err(VmError::SnapshotState(format!(
            "the VM's memory is paged out to {}; resume it first",
            p.display()
        )));
    }
    write_held(parts, &mut ram, path, base, DEFAULT_CODEC).map(|w| w.report)
}

/// For a VM being restored from a checkpoint, before any device can touch its RAM: replaces
/// the RAM with memory that userfaultfd fills from `file` (and `base`) on first touch.
pub(crate) fn start_lazy_restore(
    mem: &GuestMemory,
    file: PageFile,
    base: Option<&Path>,
    stop: Arc<StopState>,
) -> Result<Pager, VmError> {
    let regions = ram::host_regions(mem);
    check_regions(&file.path.clone(), &file, &regions)?;
    let base = file.open_base(base)?;
    Pager::start(file, base, &regions, stop)
}

/// Hands the pager of [`start_lazy_restore`] to the built VM.
pub(crate) fn adopt_pager(parts: &VmParts, pager: Pager) {
    let mut ram = parts.ram();
    ram.pager = Some(pager);
    ram.backing = Backing::Lazy;
}

/// Opens the base file and checks it has the size of this VM's memory file.
fn open_base(path: &Path, size: u64) -> Result<(PathBuf, File, BaseFile), VmError> {
    let io = |source| VmError::PageFileIo {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let found = file.metadata().map_err(io)?.len();
    if found != size {
        return Err(VmError::SnapshotMemorySize {
            path: path.to_path_buf(),
            found,
            expected: size,
        });
    }
    let info = BaseFile {
        path: path.as_os_str().as_bytes().to_vec(),
        size,
    };
    Ok((path.to_path_buf(), file, info))
}

/// Gives the RAM back: each region then reads as the base (the base file mapped privately,
/// as a clone maps it, or zero) and holds no private pages.
fn release(
    ram: &mut RamState,
    regions: &[HostRegion],
    base: Option<(&File, &[u64])>,
    mapping_is_base: bool,
) -> std::io::Result<()> {
    for (i, r) in regions.iter().enumerate() {
        match base {
            _ if mapping_is_base => ram::dontneed(r)?,
            Some((file, offsets)) => ram::remap_file(r, file, offsets[i])?,
            None => ram::remap_anonymous(r)?,
        }
    }
    ram.backing = match base {
        Some((file, _)) => ram::file_id(file)?,
        None => Backing::Anon,
    };
    Ok(())
}

/// Refuses a page file written for other memory.
fn check_regions(path: &Path, file: &PageFile, regions: &[HostRegion]) -> Result<(), VmError> {
    let saved: Vec<(u64, u64)> = file
        .index()
        .regions
        .iter()
        .map(|r| (r.guest_addr, r.len))
        .collect();
    let have: Vec<(u64, u64)> = regions
        .iter()
        .map(|r| (r.guest_addr, r.len as u64))
        .collect();
    if saved != have {
        return Err(on_disk::damaged(
            path,
            format!("written for guest RAM {saved:x?}, this VM has {have:x?}"),
        ));
    }
    Ok(())
}

/// Writes every stored page back into the mapping (which reads as the base already).
fn page_in_eager(file: &PageFile, regions: &[HostRegion]) -> Result<(), VmError> {
    let (mut comp, mut raw) = (Vec::new(), Vec::new());
    for b in &file.index().blocks {
        file.read_block(b, &mut comp, &mut raw)?;
        let Some(r) = regions
            .iter()
            .find(|r| b.guest_addr >= r.guest_addr && b.guest_addr < r.guest_addr + r.len as u64)
        else {
            continue;
        };
        let chunk = r.host + (b.guest_addr - r.guest_addr) as usize;
        let mut pages = raw.chunks_exact(PAGE);
        for i in 0..on_disk::BLOCK_PAGES {
            if b.pages & (1 << i) == 0 {
                continue;
            }
            let (Some(page), true) = (pages.next(), chunk + (i + 1) * PAGE <= r.host + r.len)
            else {
                break;
            };
            // SAFETY: the destination page lies inside the region's live mapping; the VM is
            // paused with its devices held, so nothing else touches it.
            unsafe {
                std::ptr::copy_nonoverlapping(page.as_ptr(), (chunk + i * PAGE) as *mut u8, PAGE)
            };
        }
    }
    Ok(())
}

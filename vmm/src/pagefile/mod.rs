//! Page files: a paused VM's guest memory, compressed, so that the RAM can be given back.
//!
//! Pausing ([`crate::VmControl::page_out`]) writes every guest page that differs from its base
//! (the template's memory file for a clone, zero otherwise) into a page file, in blocks of one
//! [`on_disk::BLOCK_BYTES`] chunk of guest RAM each, compressed and checksummed (see
//! [`on_disk`]). The file is written under a temporary name, fsync'd, renamed and its directory
//! fsync'd; only then is the RAM released, so a monitor killed at any point leaves either the
//! untouched VM or a complete page file.
//!
//! Resuming ([`crate::VmControl::page_in`]) either decompresses everything back at once
//! ([`PageInMode::Eager`]) or maps fresh anonymous memory and serves the guest's first touch of
//! each chunk through userfaultfd ([`PageInMode::Lazy`], see `pager`): untouched chunks never
//! come back. A block whose checksum does not match is never installed.
//!
//! This module holds the pieces: the file ([`PageFile`], [`Writer`], [`Codec`]), guest RAM's
//! host mappings (`ram`) and paging state (`RamState`), the scan that writes the pages
//! (`scan`) and the lazy pager; [`crate::page_out`] drives them for a paused VM.

pub mod on_disk;
mod pager;
pub(crate) mod ram;
pub(crate) mod scan;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::error::VmError;
use crate::memory::GuestMemory;
use on_disk::{damaged, Block, Index};
pub(crate) use pager::Pager;
use ram::Backing;

/// The paging state of one VM's RAM, kept with the VM's parts.
pub(crate) struct RamState {
    pub(crate) backing: Backing,
    /// The page file the RAM was released into, until it is paged in.
    pub(crate) paged_out: Option<PathBuf>,
    /// The base file the page-out was written against: page-in opens this one, never a path
    /// read back from the page file.
    pub(crate) paged_out_base: Option<PathBuf>,
    /// Serves a lazy page-in until every chunk is back or the VM ends.
    pub(crate) pager: Option<Pager>,
}

impl RamState {
    /// The state of freshly built RAM: a restored snapshot's is its memory file, mapped.
    pub(crate) fn new(mem: &GuestMemory) -> RamState {
        let file = mem.iter().find_map(|r| r.file_offset().map(|f| f.file()));
        let backing = match file.map(File::metadata) {
            Some(Ok(m)) => Backing::File {
                dev: m.dev(),
                ino: m.ino(),
            },
            _ => Backing::Anon,
        };
        RamState {
            backing,
            paged_out: None,
            paged_out_base: None,
            pager: None,
        }
    }
}

/// How blocks are compressed.
///
/// lz4 is the default. What matters most is the latency a lazily resumed guest sees on each
/// fault, which is one block's decompression, and lz4 decompresses a block several times
/// faster than zstd at level 1. zstd's files are smaller, but both compress fast enough that
/// neither the pause nor the disk decides, and a page file is short-lived. `husk bench pause`
/// measures both codecs on this host's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// LZ4 block format (lz4_flex).
    Lz4 = 1,
    /// Zstandard at level 1.
    Zstd = 2,
}

/// The codec `page_out` uses unless told otherwise.
pub const DEFAULT_CODEC: Codec = Codec::Lz4;
/// Zstandard's level: its fastest standard level; higher ones slow pausing for little gain.
const ZSTD_LEVEL: i32 = 1;

impl Codec {
    fn from_id(id: u32) -> Option<Codec> {
        match id {
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    /// Compresses `raw` into `out` (replacing its contents).
    pub fn compress(self, raw: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        out.clear();
        match self {
            Codec::Lz4 => {
                out.resize(lz4_flex::block::get_maximum_output_size(raw.len()), 0);
                let n = lz4_flex::block::compress_into(raw, out).map_err(|e| e.to_string())?;
                out.truncate(n);
            }
            Codec::Zstd => {
                *out = zstd::bulk::compress(raw, ZSTD_LEVEL).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Decompresses `compressed` into exactly `out`; anything else is an error.
    pub fn decompress(self, compressed: &[u8], out: &mut [u8]) -> Result<(), String> {
        let n = match self {
            Codec::Lz4 => {
                lz4_flex::block::decompress_into(compressed, out).map_err(|e| e.to_string())?
            }
            Codec::Zstd => {
                zstd::bulk::decompress_to_buffer(compressed, out).map_err(|e| e.to_string())?
            }
        };
        if n != out.len() {
            return Err(format!("decompressed to {n} bytes, expected {}", out.len()));
        }
        Ok(())
    }
}

/// How `page_in` brings the memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageInMode {
    /// Map empty memory and fill each chunk on its first touch (userfaultfd).
    Lazy,
    /// Decompress every block before returning.
    Eager,
}

/// What a page-out did.
#[derive(Debug, Clone)]
pub struct PageOutReport {
    /// The page file.
    pub path: PathBuf,
    /// The codec used.
    pub codec: Codec,
    /// Guest pages stored (those that differ from the base).
    pub pages_stored: u64,
    /// Guest RAM looked at, in bytes.
    pub ram_bytes: u64,
    /// Stored pages before compression, in bytes.
    pub raw_bytes: u64,
    /// The page file's size.
    pub file_bytes: u64,
    /// Writing the file until it was durable.
    pub write_time: Duration,
    /// Releasing the RAM.
    pub release_time: Duration,
}

/// What a page-in did.
#[derive(Debug, Clone)]
pub struct PageInReport {
    /// The mode used.
    pub mode: PageInMode,
    /// Blocks in the page file.
    pub blocks: usize,
    /// Time until `page_in` returned (for `Eager`, every page is back then).
    pub took: Duration,
}

/// A checked page file open for reading.
pub struct PageFile {
    pub(crate) path: PathBuf,
    file: File,
    codec: Codec,
    index: Index,
}

impl PageFile {
    /// Opens `path` and checks its header, trailer and index (blocks are checked as read).
    pub fn open(path: &Path) -> Result<PageFile, VmError> {
        let io = |source| VmError::PageFileIo {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let min = (on_disk::HEADER_LEN + on_disk::TRAILER_LEN) as u64;
        if len < min {
            return Err(damaged(path, format!("truncated ({len} bytes)")));
        }
        let mut header = [0u8; on_disk::HEADER_LEN];
        file.read_exact_at(&mut header, 0).map_err(io)?;
        let codec = on_disk::check_header(path, &header)?;
        let mut trailer = [0u8; on_disk::TRAILER_LEN];
        file.read_exact_at(&mut trailer, len - min + on_disk::HEADER_LEN as u64)
            .map_err(io)?;
        let (offset, index_len, crc) = on_disk::check_trailer(path, &trailer, len)?;
        let mut bytes = vec![0u8; index_len as usize];
        file.read_exact_at(&mut bytes, offset).map_err(io)?;
        let index = on_disk::decode_index(path, &bytes, crc, offset)?;
        Ok(PageFile {
            path: path.to_path_buf(),
            file,
            codec,
            index,
        })
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The codec the blocks were written with.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Reads block `b`, checks it and decompresses it into `raw` (`comp` is scratch).
    pub fn read_block(
        &self,
        b: &Block,
        comp: &mut Vec<u8>,
        raw: &mut Vec<u8>,
    ) -> Result<(), VmError> {
        comp.resize(b.len as usize, 0);
        self.file
            .read_exact_at(comp, b.offset)
            .map_err(|source| VmError::PageFileIo {
                path: self.path.clone(),
                source,
            })?;
        let crc = crc32fast::hash(comp);
        if crc != b.crc {
            return Err(damaged(
                &self.path,
                format!(
                    "block of guest {:#x} is corrupt (checksum {crc:#010x}, index says {:#010x})",
                    b.guest_addr, b.crc
                ),
            ));
        }
        raw.resize(b.raw_len(), 0);
        self.codec.decompress(comp, raw).map_err(|e| {
            damaged(
                &self.path,
                format!(
                    "block of guest {:#x} does not decompress: {e}",
                    b.guest_addr
                ),
            )
        })
    }

    /// Reads and checks every block (a full integrity check).
    pub fn verify(&self) -> Result<(), VmError> {
        let (mut comp, mut raw) = (Vec::new(), Vec::new());
        for b in &self.index.blocks {
            self.read_block(b, &mut comp, &mut raw)?;
        }
        Ok(())
    }

    /// Opens `base`, the file the caller knows the page file was written against, and checks
    /// the index agrees: a base of the recorded size, or none. The path the index records is
    /// never opened: a page file is data, not a list of host files to read.
    pub fn open_base(&self, base: Option<&Path>) -> Result<Option<File>, VmError> {
        let (recorded, path) = match (&self.index.base, base) {
            (None, None) => return Ok(None),
            (Some(r), Some(p)) => (r, p),
            (Some(_), None) => return Err(damaged(&self.path, "was written against a base file")),
            (None, Some(_)) => return Err(damaged(&self.path, "was written without a base file")),
        };
        let io = |source| VmError::PageFileIo {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if size != recorded.size {
            return Err(damaged(
                &self.path,
                format!(
                    "base file {} has {size} bytes, the page file was written against {}",
                    path.display(),
                    recorded.size
                ),
            ));
        }
        Ok(Some(file))
    }
}

/// Writes a page file under a temporary name; [`Writer::finish`] makes it durable and renames
/// it into place.
pub struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    offset: u64,
    codec: Codec,
    blocks: Vec<Block>,
    comp: Vec<u8>,
    raw_bytes: u64,
}

impl Writer {
    /// Starts the page file `path` (as `path.tmp`).
    pub fn create(path: &Path, codec: Codec) -> Result<Writer, VmError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp).map_err(|source| VmError::PageFileIo {
            path: tmp.clone(),
            source,
        })?;
        let mut w = Writer {
            path: path.to_path_buf(),
            tmp,
            out: BufWriter::with_capacity(1 << 20, file),
            offset: 0,
            codec,
            blocks: Vec::new(),
            comp: Vec::new(),
            raw_bytes: 0,
        };
        w.write(&on_disk::header(codec))?;
        Ok(w)
    }

    fn io_err(&self) -> impl FnOnce(std::io::Error) -> VmError + '_ {
        |source| VmError::PageFileIo {
            path: self.tmp.clone(),
            source,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), VmError> {
        let r = self.out.write_all(bytes);
        r.map_err(self.io_err())?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Adds the chunk at `guest_addr`: `raw` holds the pages whose bits are set in `pages`.
    pub fn add_block(&mut self, guest_addr: u64, pages: u16, raw: &[u8]) -> Result<(), VmError> {
        let mut comp = std::mem::take(&mut self.comp);
        self.codec
            .compress(raw, &mut comp)
            .map_err(|e| damaged(&self.tmp, format!("compressing: {e}")))?;
        self.blocks.push(Block {
            guest_addr,
            pages,
            offset: self.offset,
            len: comp.len() as u32,
            crc: crc32fast::hash(&comp),
        });
        self.raw_bytes += raw.len() as u64;
        let r = self.write(&comp);
        self.comp = comp;
        r
    }

    /// Writes the index and trailer, fsyncs, renames into place and fsyncs the directory.
    /// Returns (stored bytes before compression, file size).
    pub fn finish(
        mut self,
        regions: Vec<on_disk::Region>,
        base: Option<on_disk::BaseFile>,
    ) -> Result<(u64, u64), VmError> {
        let index = Index {
            regions,
            base,
            blocks: std::mem::take(&mut self.blocks),
        };
        let tail =
            on_disk::index_and_trailer(&index, self.offset).map_err(|e| damaged(&self.tmp, e))?;
        self.write(&tail)?;
        let r = self
            .out
            .flush()
            .and_then(|()| self.out.get_ref().sync_all());
        r.map_err(self.io_err())?;
        std::fs::rename(&self.tmp, &self.path).map_err(|source| VmError::PageFileIo {
            path: self.path.clone(),
            source,
        })?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| VmError::PageFileIo {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok((self.raw_bytes, self.offset))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // A writer dropped before `finish` renamed it leaves no temporary file behind.
        if self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

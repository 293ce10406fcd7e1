//! The on-disk format of a page file.
//!
//! ```text
//! offset size
//!      0    8  magic "HUSKPAGE"
//!      8    4  format version (FORMAT_VERSION)
//!     12    4  codec (1 = lz4 block, 2 = zstd)
//!     16    4  CRC-32 of bytes 0..16
//!     20       blocks: compressed page data, back to back
//!      I    L  index: Index, postcard-encoded
//!  I + L   32  trailer: magic "HUSKPEND", index offset I (8), index length L (8),
//!              CRC-32 of the index (4), CRC-32 of the trailer's first 28 bytes (4)
//! ```
//!
//! A block holds the stored pages of one [`BLOCK_BYTES`]-aligned stretch of guest RAM (a
//! chunk), in address order; its index entry says which pages of the chunk it holds and carries
//! the CRC-32 of its compressed bytes, so a fault checks exactly the block it reads. The trailer
//! is written last and the file is complete only with it: a truncated file has none. Any change
//! to what is written here changes the format: bump `FORMAT_VERSION`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Codec;
use crate::error::VmError;

/// First bytes of every page file.
pub const MAGIC: [u8; 8] = *b"HUSKPAGE";
/// First bytes of the trailer.
pub const TRAILER_MAGIC: [u8; 8] = *b"HUSKPEND";
/// The format this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 20;
/// Size of the fixed trailer.
pub const TRAILER_LEN: usize = 32;
/// Guest page size.
pub const PAGE: usize = 4096;
/// Guest RAM per block (and per fault a lazy resume serves).
pub const BLOCK_BYTES: usize = 64 << 10;
/// Pages per block.
pub const BLOCK_PAGES: usize = BLOCK_BYTES / PAGE;

/// What the pages a file does not store hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseFile {
    /// The template's memory file (raw bytes of the path).
    pub path: Vec<u8>,
    /// Its size when the page file was written (a template file never changes).
    pub size: u64,
}

/// One RAM region of the paged-out VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where the region starts in the base file.
    pub base_offset: u64,
}

/// One block: the stored pages of the chunk at `guest_addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Guest-physical address of the chunk (a multiple of `BLOCK_BYTES`).
    pub guest_addr: u64,
    /// Bit i set: page i of the chunk is in the block.
    pub pages: u16,
    /// Where the compressed bytes start in the file.
    pub offset: u64,
    /// Their length.
    pub len: u32,
    /// CRC-32 of the compressed bytes.
    pub crc: u32,
}

impl Block {
    /// Bytes the block decompresses to.
    pub fn raw_len(&self) -> usize {
        self.pages.count_ones() as usize * PAGE
    }
}

/// Everything but the page data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Guest RAM, as the VM had it.
    pub regions: Vec<Region>,
    /// Unstored pages come from here; `None`: they are zero.
    pub base: Option<BaseFile>,
    /// Blocks in guest-address order.
    pub blocks: Vec<Block>,
}

/// The header a page file written with `codec` starts with.
pub fn header(codec: Codec) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(codec as u32).to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The encoded index and the trailer that follows it at `index_offset`.
pub fn index_and_trailer(index: &Index, index_offset: u64) -> Result<Vec<u8>, String> {
    let mut out = postcard::to_stdvec(index).map_err(|e| format!("encoding the index: {e}"))?;
    let index_len = out.len() as u64;
    let index_crc = crc32fast::hash(&out);
    let start = out.len();
    out.extend_from_slice(&TRAILER_MAGIC);
    out.extend_from_slice(&index_offset.to_le_bytes());
    out.extend_from_slice(&index_len.to_le_bytes());
    out.extend_from_slice(&index_crc.to_le_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// The error for a page file at `path` that is damaged in the way `reason` says.
pub fn damaged(path: &Path, reason: impl Into<String>) -> VmError {
    VmError::PageFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// Checks the header; returns the codec.
pub fn check_header(path: &Path, h: &[u8]) -> Result<Codec, VmError> {
    if h.len() < HEADER_LEN || h[..8] != MAGIC {
        return Err(damaged(path, "not a Husk page file (bad magic)"));
    }
    if crc32fast::hash(&h[..16]) != u32_at(h, 16) {
        return Err(damaged(path, "header checksum mismatch"));
    }
    let version = u32_at(h, 8);
    if version != FORMAT_VERSION {
        return Err(damaged(
            path,
            format!("format version {version}; this VMM reads version {FORMAT_VERSION}"),
        ));
    }
    Codec::from_id(u32_at(h, 12))
        .ok_or_else(|| damaged(path, format!("unknown codec {}", u32_at(h, 12))))
}

/// Checks the trailer of a file `file_len` bytes long; returns (index offset, length, CRC).
pub fn check_trailer(path: &Path, t: &[u8], file_len: u64) -> Result<(u64, u64, u32), VmError> {
    let truncated = || {
        damaged(
            path,
            format!("truncated or incomplete ({file_len} bytes, no valid trailer)"),
        )
    };
    if t.len() != TRAILER_LEN || t[..8] != TRAILER_MAGIC {
        return Err(truncated());
    }
    if crc32fast::hash(&t[..28]) != u32_at(t, 28) {
        return Err(damaged(path, "trailer checksum mismatch"));
    }
    let (offset, len) = (u64_at(t, 8), u64_at(t, 16));
    let end = offset
        .checked_add(len)
        .and_then(|e| e.checked_add(TRAILER_LEN as u64));
    if offset < HEADER_LEN as u64 || end != Some(file_len) {
        return Err(damaged(
            path,
            format!("index at {offset}+{len} does not end at the trailer ({file_len} bytes)"),
        ));
    }
    Ok((offset, len, u32_at(t, 24)))
}

/// Checks and decodes the index bytes; checks that every block lies in the data area.
pub fn decode_index(path: &Path, bytes: &[u8], crc: u32, data_end: u64) -> Result<Index, VmError> {
    if crc32fast::hash(bytes) != crc {
        return Err(damaged(path, "index checksum mismatch"));
    }
    let index: Index = postcard::from_bytes(bytes)
        .map_err(|e| damaged(path, format!("index does not decode: {e}")))?;
    for b in &index.blocks {
        let end = b.offset.checked_add(u64::from(b.len));
        if b.offset < HEADER_LEN as u64 || end.is_none_or(|e| e > data_end) || b.pages == 0 {
            return Err(damaged(
                path,
                format!("block of guest {:#x} lies outside the data", b.guest_addr),
            ));
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let p = Path::new("/x");
        let mut h = header(Codec::Lz4);
        assert_eq!(check_header(p, &h).unwrap(), Codec::Lz4);
        h[13] ^= 1;
        let e = check_header(p, &h).unwrap_err().to_string();
        assert!(e.contains("header checksum"), "{e}");
    }

    #[test]
    fn trailer_must_end_the_file() {
        let p = Path::new("/x");
        let index = Index {
            regions: vec![],
            base: None,
            blocks: vec![],
        };
        let tail = index_and_trailer(&index, 100).unwrap();
        let len = 100 + tail.len() as u64;
        let t = &tail[tail.len() - TRAILER_LEN..];
        let (off, ilen, _) = check_trailer(p, t, len).unwrap();
        assert_eq!((off, ilen), (100, (tail.len() - TRAILER_LEN) as u64));
        let e = check_trailer(p, t, len + 1).unwrap_err().to_string();
        assert!(e.contains("does not end at the trailer"), "{e}");
    }
}

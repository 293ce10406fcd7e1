//! A file's identity and its bytes, read the same way by the template store (is a template's
//! kernel still the one it was built from?) and by checkpoints (is a template's memory file
//! still the one a checkpoint's pages are relative to? are the image's files intact?).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// A file's identity as `stat` sees it: a rebuilt or rewritten file has another inode or
/// mtime, so while the stamp matches, what was learnt from the file's content still holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub inode: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> Result<FileStamp> {
        let m = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        Ok(FileStamp {
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            inode: m.ino(),
        })
    }
}

/// Feeds the whole file at `path` to `update`, 1 MiB at a time; returns how many bytes it
/// read (the files are tens of megabytes: never all in memory at once).
pub fn read_chunks(path: &Path, mut update: impl FnMut(&[u8])) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(size);
        }
        update(&buf[..n]);
        size += n as u64;
    }
}

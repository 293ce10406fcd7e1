//! A page file as `PageFile::open` and `verify` read it. The first byte picks how the rest is
//! used: as the whole file, or (so the fuzzer gets past the checksums) as a codec byte, a data
//! area (u16 length, bytes) and a postcard index, written with a valid header and trailer and,
//! when the index decodes, each block's checksum set to that of the bytes it names.
#![no_main]

use husk_vmm::pagefile::on_disk::{self, Index};
use husk_vmm::pagefile::PageFile;
use husk_vmm::Codec;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        match assemble(rest) {
            Some(f) => f,
            None => return,
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pages");
    std::fs::write(&path, &file).unwrap();
    let Ok(pf) = PageFile::open(&path) else {
        return;
    };
    let _ = pf.verify();
    // The base file is never opened: the caller names it, and here there is none.
    let _ = pf.index();
    let _ = pf.codec();
});

fn assemble(rest: &[u8]) -> Option<Vec<u8>> {
    let (&codec, rest) = rest.split_first()?;
    let codec = if codec & 1 == 0 {
        Codec::Lz4
    } else {
        Codec::Zstd
    };
    let (len, rest) = rest.split_at_checked(2)?;
    let len = usize::from(u16::from_le_bytes([len[0], len[1]])).min(rest.len());
    let (blocks, index) = rest.split_at(len);
    let mut file = on_disk::header(codec).to_vec();
    file.extend_from_slice(blocks);
    let offset = file.len() as u64;
    match postcard::from_bytes::<Index>(index) {
        Ok(mut index) => {
            for b in &mut index.blocks {
                let at = usize::try_from(b.offset).ok();
                let end = at.and_then(|a| a.checked_add(b.len as usize));
                if let (Some(at), Some(end)) = (at, end) {
                    if let Some(bytes) = file.get(at..end) {
                        b.crc = crc32fast::hash(bytes);
                    }
                }
            }
            file.extend_from_slice(&on_disk::index_and_trailer(&index, offset).ok()?);
        }
        Err(_) => {
            // Undecodable index bytes, with a valid trailer around them.
            file.extend_from_slice(index);
            let mut t = on_disk::TRAILER_MAGIC.to_vec();
            t.extend_from_slice(&offset.to_le_bytes());
            t.extend_from_slice(&(index.len() as u64).to_le_bytes());
            t.extend_from_slice(&crc32fast::hash(index).to_le_bytes());
            let crc = crc32fast::hash(&t);
            t.extend_from_slice(&crc.to_le_bytes());
            file.extend_from_slice(&t);
        }
    }
    Some(file)
}

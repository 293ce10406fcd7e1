//! Page files without a VM: guest memory written with `scan` and read back, and damaged files.

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use super::on_disk::{BLOCK_BYTES, PAGE};
use super::ram::host_regions;
use super::scan::{write_pages, ScanBase};
use super::*;
use crate::memory::create_guest_memory;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("husk-pagefile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 64 MiB of anonymous RAM with three written pages (two in one chunk) written to a page file.
fn write_sample(path: &Path, codec: Codec) -> u64 {
    let mem = create_guest_memory(64).unwrap();
    mem.write_slice(&[0xaa; PAGE], GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(&[0xbb; 8], GuestAddress(0x10_3000))
        .unwrap();
    mem.write_slice(&[0xcc; PAGE], GuestAddress(0x300_0000))
        .unwrap();
    // Read but never written: present only as the zero page, not stored.
    let mut buf = [0u8; PAGE];
    mem.read_slice(&mut buf, GuestAddress(0x200_0000)).unwrap();
    let base = ScanBase {
        file: None,
        absent_is_base: true,
        file_pages_are_base: false,
    };
    let mut w = Writer::create(path, codec).unwrap();
    let stored = write_pages(&host_regions(&mem), &base, &mut w).unwrap();
    let regions = vec![on_disk::Region {
        guest_addr: 0,
        len: 64 << 20,
        base_offset: 0,
    }];
    w.finish(regions, None).unwrap();
    stored
}

#[test]
fn only_changed_pages_are_stored_and_read_back() {
    for codec in [Codec::Lz4, Codec::Zstd] {
        let dir = scratch(codec.name());
        let path = dir.join("pages");
        assert_eq!(write_sample(&path, codec), 3);
        assert!(!dir.join("pages.tmp").exists());
        let file = PageFile::open(&path).unwrap();
        assert_eq!(file.codec(), codec);
        let blocks = &file.index().blocks;
        assert_eq!(blocks.len(), 2);
        assert_eq!((blocks[0].guest_addr, blocks[0].pages), (0x10_0000, 0b1001));
        let (mut comp, mut raw) = (Vec::new(), Vec::new());
        file.read_block(&blocks[0], &mut comp, &mut raw).unwrap();
        assert_eq!(raw.len(), 2 * PAGE);
        assert!(raw[..PAGE].iter().all(|&b| b == 0xaa));
        assert_eq!(
            &raw[PAGE..PAGE + 9],
            &[0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0]
        );
        assert_eq!(blocks[1].guest_addr as usize % BLOCK_BYTES, 0);
        file.verify().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn a_truncated_file_is_refused_naming_the_file() {
    let dir = scratch("truncated");
    let path = dir.join("pages");
    write_sample(&path, Codec::Lz4);
    let len = std::fs::metadata(&path).unwrap().len();
    for cut in [len - 1, len / 2, 10] {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(cut).unwrap();
        let e = PageFile::open(&path)
            .err()
            .expect("a truncated file opened")
            .to_string();
        assert!(
            e.contains(path.to_str().unwrap()) && e.contains("truncated"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_corrupted_block_is_refused_when_read() {
    let dir = scratch("corrupt");
    let path = dir.join("pages");
    write_sample(&path, Codec::Lz4);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[on_disk::HEADER_LEN + 3] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    // The index is intact, so the file opens; the block does not pass its checksum.
    let file = PageFile::open(&path).unwrap();
    let e = file.verify().unwrap_err().to_string();
    assert!(e.contains("is corrupt") && e.contains("0x100000"), "{e}");
    // A damaged index is caught on open.
    let at = bytes.len() - on_disk::TRAILER_LEN - 2;
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let e = PageFile::open(&path).err().unwrap().to_string();
    assert!(e.contains("index checksum mismatch"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_base_file_is_compared_page_by_page() {
    let dir = scratch("base");
    let base_path = dir.join("memory");
    let mut base = vec![0u8; 64 << 20];
    base[0x10_0000..0x10_1000].fill(7);
    base[0x20_0000..0x20_1000].fill(9);
    std::fs::write(&base_path, &base).unwrap();
    // The guest holds the base's contents except one changed page and one zeroed page.
    let mem = create_guest_memory(64).unwrap();
    mem.write_slice(&base[..8 << 20], GuestAddress(0)).unwrap();
    mem.write_slice(&[1; PAGE], GuestAddress(0x40_0000))
        .unwrap();
    mem.write_slice(&[0; PAGE], GuestAddress(0x20_0000))
        .unwrap();
    let file = std::fs::File::open(&base_path).unwrap();
    let scan = ScanBase {
        file: Some((&file, &base_path, vec![0])),
        absent_is_base: false,
        file_pages_are_base: false,
    };
    let path = dir.join("pages");
    let mut w = Writer::create(&path, Codec::Lz4).unwrap();
    let stored = write_pages(&host_regions(&mem), &scan, &mut w).unwrap();
    assert_eq!(stored, 2);
    std::fs::remove_dir_all(dir).unwrap();
}

/// An empty page file of one 8 KiB region against `base`.
fn write_against(path: &Path, base: Option<on_disk::BaseFile>) -> PageFile {
    let w = Writer::create(path, Codec::Lz4).unwrap();
    let regions = vec![on_disk::Region {
        guest_addr: 0,
        len: 2 * PAGE as u64,
        base_offset: 0,
    }];
    w.finish(regions, base).unwrap();
    PageFile::open(path).unwrap()
}

#[test]
fn the_base_is_the_callers_file_never_the_path_the_page_file_records() {
    let dir = scratch("base-given");
    let recorded = on_disk::BaseFile {
        path: dir.join("recorded").into_os_string().into_encoded_bytes(),
        size: 2 * PAGE as u64,
    };
    let based = write_against(&dir.join("based"), Some(recorded));
    let given = dir.join("given");
    std::fs::write(&given, vec![0u8; 2 * PAGE]).unwrap();
    // The recorded path does not exist: only the caller's file can have been opened.
    assert!(based.open_base(Some(&given)).unwrap().is_some());
    let e = based.open_base(None).err().unwrap().to_string();
    assert!(e.contains("written against a base file"), "{e}");
    std::fs::write(&given, vec![0u8; PAGE]).unwrap();
    let e = based.open_base(Some(&given)).err().unwrap().to_string();
    assert!(e.contains("has 4096 bytes"), "{e}");
    let zero = write_against(&dir.join("zero"), None);
    assert!(zero.open_base(None).unwrap().is_none());
    let e = zero.open_base(Some(&given)).err().unwrap().to_string();
    assert!(e.contains("written without a base file"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

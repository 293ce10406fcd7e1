//! Boot images mapped into guest RAM instead of copied: each loadable segment of the vmlinux
//! and the initramfs are mapped `MAP_PRIVATE` from their files over guest RAM. Nothing is read
//! or copied at boot, the guest faults in only what it touches, and every VM booting the same
//! files shares their unchanged pages through the page cache. linux-loader only copies, so the
//! program headers and the PVH note are read here; an ELF this cannot map falls back to
//! linux-loader (which also gives the errors for a broken one).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::memory::GuestMemory;

const PAGE: u64 = 4096;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point's physical address.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Bounds what a hostile header can make us read.
const MAX_PHDRS: u16 = 64;
const MAX_NOTES: u64 = 1 << 16;

/// A loadable segment: where it goes and where it is in the file.
#[derive(Debug, Clone, Copy)]
struct Segment {
    paddr: u64,
    offset: u64,
    filesz: u64,
    memsz: u64,
}

/// What booting a vmlinux needs from its headers.
#[derive(Debug)]
pub struct Layout {
    segments: Vec<Segment>,
    /// The PVH entry, if the kernel has the note.
    pub pvh_entry: Option<u64>,
    /// The end of the highest segment in guest-physical memory.
    pub end: u64,
    file_len: u64,
}

impl Layout {
    /// Reads an x86-64 ELF's headers; `None` for anything else, or segments below `min_addr`.
    pub fn read(file: &mut File, min_addr: u64) -> Option<Layout> {
        let mut ehdr = [0u8; 64];
        file.seek(SeekFrom::Start(0)).ok()?;
        file.read_exact(&mut ehdr).ok()?;
        let is_x86_64_le = &ehdr[..4] == b"\x7fELF" && ehdr[4] == 2 && ehdr[5] == 1;
        if !is_x86_64_le || u16_at(&ehdr, 18) != EM_X86_64 || u16_at(&ehdr, 54) != 56 {
            return None;
        }
        let (phoff, phnum) = (u64_at(&ehdr, 32), u16_at(&ehdr, 56));
        if phnum == 0 || phnum > MAX_PHDRS {
            return None;
        }
        let mut phdrs = vec![0u8; 56 * usize::from(phnum)];
        file.seek(SeekFrom::Start(phoff)).ok()?;
        file.read_exact(&mut phdrs).ok()?;
        let mut segments = Vec::new();
        let mut pvh_entry = None;
        for p in phdrs.chunks_exact(56) {
            let (offset, paddr, filesz, memsz) =
                (u64_at(p, 8), u64_at(p, 24), u64_at(p, 32), u64_at(p, 40));
            match u32_at(p, 0) {
                PT_LOAD if paddr < min_addr || filesz > memsz => return None,
                PT_LOAD => segments.push(Segment {
                    paddr,
                    offset,
                    filesz,
                    memsz,
                }),
                PT_NOTE if pvh_entry.is_none() => {
                    pvh_entry = read_pvh_note(file, offset, filesz.min(MAX_NOTES))
                }
                _ => {}
            }
        }
        segments.sort_by_key(|s| s.paddr);
        let end = segments
            .iter()
            .map(|s| s.paddr.checked_add(s.memsz))
            .try_fold(0u64, |end, e| e.map(|e| end.max(e)))?;
        let file_len = file.metadata().ok()?.len();
        Some(Layout {
            segments,
            pvh_entry,
            end,
            file_len,
        })
    }

    /// Maps every segment into `mem`; `false` (nothing mapped) when the layout does not allow
    /// it: segments not page-aligned, sharing a page, or outside the file or the RAM.
    pub fn map(&self, mem: &GuestMemory, file: &File) -> io::Result<bool> {
        if self.segments.is_empty() || !self.mappable(mem) {
            return Ok(false);
        }
        for s in self.segments.iter().filter(|s| s.filesz > 0) {
            map_range(mem, s.paddr, file, s.offset, s.filesz)?;
            // The rest of the last page holds whatever follows in the file; the segment's
            // bss must read zero (past that page, the fresh anonymous RAM already does).
            let tail = s.paddr + s.filesz;
            let zeros = vec![0u8; (round_up(tail) - tail) as usize];
            mem.write_slice(&zeros, GuestAddress(tail))
                .map_err(|e| io::Error::other(format!("clearing the bss: {e}")))?;
        }
        Ok(true)
    }

    fn mappable(&self, mem: &GuestMemory) -> bool {
        let aligned = self
            .segments
            .iter()
            .all(|s| s.paddr.is_multiple_of(PAGE) && s.offset.is_multiple_of(PAGE));
        let in_file = self.segments.iter().all(|s| {
            s.offset
                .checked_add(s.filesz)
                .is_some_and(|e| e <= self.file_len)
        });
        let apart = self
            .segments
            .windows(2)
            .all(|w| round_up(w[0].paddr + w[0].memsz) <= w[1].paddr);
        let in_ram = self
            .segments
            .iter()
            .all(|s| in_one_region(mem, s.paddr, round_up(s.memsz)).is_some());
        aligned && in_file && apart && in_ram
    }
}

/// Maps `len` bytes of `file` from `offset` privately over guest RAM at `gpa`, if both are
/// page-aligned and the range lies in one RAM region and in the file; `false` otherwise.
pub fn map_image(
    mem: &GuestMemory,
    gpa: u64,
    file: &File,
    offset: u64,
    len: u64,
) -> io::Result<bool> {
    let fits = offset
        .checked_add(len)
        .is_some_and(|end| end <= file.metadata().map_or(0, |m| m.len()));
    if !gpa.is_multiple_of(PAGE) || !offset.is_multiple_of(PAGE) || len == 0 || !fits {
        return Ok(false);
    }
    if in_one_region(mem, gpa, round_up(len)).is_none() {
        return Ok(false);
    }
    map_range(mem, gpa, file, offset, len)?;
    Ok(true)
}

/// The host address of `[gpa, gpa + len)` if one region holds all of it.
fn in_one_region(mem: &GuestMemory, gpa: u64, len: u64) -> Option<usize> {
    let region = mem.find_region(GuestAddress(gpa))?;
    let rel = gpa - region.start_addr().raw_value();
    if rel.checked_add(len)? > region.len() {
        return None;
    }
    region
        .get_host_address(MemoryRegionAddress(rel))
        .ok()
        .map(|p| p as usize)
}

fn map_range(mem: &GuestMemory, gpa: u64, file: &File, offset: u64, len: u64) -> io::Result<()> {
    let host = in_one_region(mem, gpa, round_up(len))
        .ok_or_else(|| io::Error::other(format!("{gpa:#x}+{len:#x} is not in guest RAM")))?;
    // SAFETY: the range is guest RAM of a VM being built (checked above to lie inside one of
    // its regions); no vCPU runs yet and nothing else refers to these pages. MAP_FIXED replaces
    // exactly that range, and the region's own unmapping at drop covers it.
    let at = unsafe {
        libc::mmap(
            host as *mut libc::c_void,
            round_up(len) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The PVH entry from a PT_NOTE segment: a note named "Xen" of type PHYS32_ENTRY.
fn read_pvh_note(file: &mut File, offset: u64, len: u64) -> Option<u64> {
    let mut notes = vec![0u8; len as usize];
    file.seek(SeekFrom::Start(offset)).ok()?;
    file.read_exact(&mut notes).ok()?;
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let (namesz, descsz) = (u32_at(&notes, at) as usize, u32_at(&notes, at + 4) as usize);
        let kind = u32_at(&notes, at + 8);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(namesz.next_multiple_of(4))?;
        let next = desc_at.checked_add(descsz.next_multiple_of(4))?;
        if next > notes.len() {
            return None;
        }
        if &notes[name_at..name_at + namesz] == b"Xen\0"
            && kind == XEN_ELFNOTE_PHYS32_ENTRY
            && descsz >= 4
        {
            return Some(u64::from(u32_at(&notes, desc_at)));
        }
        at = next;
    }
    None
}

fn round_up(x: u64) -> u64 {
    x.next_multiple_of(PAGE)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LOAD_AT: u64 = 0x100_0000;

    /// An x86-64 ELF: one PT_LOAD of `text` at LOAD_AT (file offset `offset`, bss after it)
    /// and a PT_NOTE with the PVH entry.
    fn elf(text: &[u8], offset: u64, bss: u64) -> tempfile::NamedTempFile {
        let note_at = 64 + 2 * 56;
        let mut b = vec![0u8; offset as usize];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        let phdr = |kind: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
            let mut p = vec![0u8; 56];
            p[..4].copy_from_slice(&kind.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[24..32].copy_from_slice(&addr.to_le_bytes());
            p[32..40].copy_from_slice(&filesz.to_le_bytes());
            p[40..48].copy_from_slice(&memsz.to_le_bytes());
            p
        };
        let len = text.len() as u64;
        b[64..120].copy_from_slice(&phdr(PT_LOAD, offset, LOAD_AT, len, len + bss));
        b[120..176].copy_from_slice(&phdr(PT_NOTE, note_at as u64, 0, 20, 20));
        let mut note = Vec::new();
        for w in [4u32, 4, XEN_ELFNOTE_PHYS32_ENTRY] {
            note.extend_from_slice(&w.to_le_bytes());
        }
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x123_4567u32.to_le_bytes());
        b[note_at..note_at + 20].copy_from_slice(&note);
        b.extend_from_slice(text);
        b.extend_from_slice(&[0xaa; 4096]); // what follows the segment in the file
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&b).unwrap();
        f
    }

    #[test]
    fn segments_are_mapped_with_their_bss_zeroed_and_the_pvh_entry_read() {
        let mem = crate::memory::create_guest_memory(64).unwrap();
        let text = vec![0x5a; 5000];
        let f = elf(&text, 0x1000, 0x3000);
        let layout = Layout::read(&mut f.reopen().unwrap(), 0x10_0000).unwrap();
        assert_eq!(layout.pvh_entry, Some(0x123_4567));
        assert_eq!(layout.end, LOAD_AT + 5000 + 0x3000);
        assert!(layout.map(&mem, f.as_file()).unwrap());
        let mut back = vec![0u8; 5000 + 0x3000];
        mem.read_slice(&mut back, GuestAddress(LOAD_AT)).unwrap();
        assert_eq!(&back[..5000], &text[..]);
        assert!(back[5000..].iter().all(|b| *b == 0), "the bss reads zero");
        // Copy-on-write: the guest's writes do not reach the file.
        mem.write_slice(&[1, 2, 3], GuestAddress(LOAD_AT)).unwrap();
        let mut on_disk = [0u8; 3];
        let mut file = f.reopen().unwrap();
        file.seek(SeekFrom::Start(0x1000)).unwrap();
        file.read_exact(&mut on_disk).unwrap();
        assert_eq!(on_disk, [0x5a; 3]);
    }

    #[test]
    fn a_misaligned_segment_is_left_to_the_copying_loader() {
        let mem = crate::memory::create_guest_memory(64).unwrap();
        let f = elf(&[1; 100], 0x1010, 0);
        let layout = Layout::read(&mut f.reopen().unwrap(), 0x10_0000).unwrap();
        assert!(!layout.map(&mem, f.as_file()).unwrap());
        let mut back = [0xffu8; 100];
        mem.read_slice(&mut back, GuestAddress(LOAD_AT)).unwrap();
        assert_eq!(back, [0; 100], "nothing was mapped");
    }

    #[test]
    fn not_an_x86_64_elf_has_no_layout() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 200]).unwrap();
        assert!(Layout::read(&mut f.reopen().unwrap(), 0).is_none());
    }
}

//! Putting a vCPU in its first mode, and loading what it runs.
//!
//! Low guest memory used by the VMM before the guest takes over:
//! `0x500` GDT, `0x6000` PVH start info, `0x6800` module list, `0x7000` memory map,
//! `0x9000..0xf000` identity page tables (4 GiB, 2 MiB pages), `0x20000..0x30000` command
//! line, `0x9fc00` MP table. Raw images must load at or above `RAW_MIN_LOAD`.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::error::VmError;
use crate::memory::{GuestMemory, HIGH_RAM_START, LOW_RAM_END};

const GDT_ADDR: u64 = 0x500;
const START_INFO_ADDR: u64 = 0x6000;
const MODLIST_ADDR: u64 = 0x6800;
const MEMMAP_ADDR: u64 = 0x7000;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
const CMDLINE_ADDR: u64 = 0x20000;
/// Longest kernel command line, NUL included.
pub const CMDLINE_MAX: usize = 0x10000;
/// Start of the EBDA-like block kept out of the guest's RAM map (holds the MP table).
pub const EBDA_START: u64 = 0x9fc00;
/// Lowest address a raw image may load at: below is the VMM's boot area.
pub const RAW_MIN_LOAD: u64 = 0x30000;
/// Where the kernel's loadable segments may start.
const HIMEM_START: u64 = 0x10_0000;

const SEL_CODE64: u16 = 0x08;
const SEL_DATA: u16 = 0x10;
const SEL_CODE32: u16 = 0x18;
const SEL_TSS: u16 = 0x20;
/// Flat segments for each selector above (null first), in GDT descriptor format.
const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // 64-bit code, execute/read, accessed
    0x00cf_9300_0000_ffff, // data, read/write, accessed, 4 GiB
    0x00cf_9b00_0000_ffff, // 32-bit code, execute/read, accessed, 4 GiB
    0x0000_8b00_0000_0067, // busy 32/64-bit TSS at 0 (VM entry needs a usable TR)
];

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
pub(crate) const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
pub(crate) const EFER_LMA: u64 = 1 << 10;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The CPU mode a raw image starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuMode {
    /// 16-bit real mode; CS = `load_addr >> 4` (load_addr must be 16-byte aligned, < 1 MiB).
    Real,
    /// 32-bit protected mode, flat segments, paging off (what PVH uses).
    Protected,
    /// 64-bit long mode on VMM-built identity page tables covering the first 4 GiB.
    #[default]
    Long,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct EntryPoint {
    /// First instruction (guest-physical).
    pub addr: u64,
    /// Mode at that instruction.
    pub mode: CpuMode,
    /// Value of RBX at entry (the PVH start info), or of RDI (the vCPU index) for raw images.
    pub boot_arg: Option<u64>,
}

/// Writes the GDT and page tables every mode shares.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), VmError> {
    let err = |e: vm_memory::GuestMemoryError| VmError::Memory(format!("boot tables: {e}"));
    for (i, desc) in GDT.iter().enumerate() {
        mem.write_obj(*desc, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(err)?;
    }
    mem.write_obj(PDPT_ADDR | 3, GuestAddress(PML4_ADDR))
        .map_err(err)?;
    for gib in 0..4u64 {
        let pd = PD_ADDR + gib * 0x1000;
        mem.write_obj(pd | 3, GuestAddress(PDPT_ADDR + gib * 8))
            .map_err(err)?;
        for j in 0..512u64 {
            // Present, writable, 2 MiB page.
            let entry = (gib << 30) | (j << 21) | 0x83;
            mem.write_obj(entry, GuestAddress(pd + j * 8))
                .map_err(err)?;
        }
    }
    Ok(())
}

fn flat_segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

fn real_segment(base: u64, type_: u8) -> kvm_segment {
    kvm_segment {
        base,
        limit: 0xffff,
        selector: (base >> 4) as u16,
        type_,
        present: 1,
        s: 1,
        ..Default::default()
    }
}

fn set_protected_segments(sregs: &mut kvm_sregs, code: kvm_segment) {
    let data = flat_segment(SEL_DATA, 3, false);
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        limit: 0x67,
        selector: SEL_TSS,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    // An empty IDT: any exception before the guest loads its own is a triple fault.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
}

/// Sets segment, control registers and general registers for `entry` on `vcpu`.
pub fn setup_vcpu_mode(vcpu: &VcpuFd, entry: &EntryPoint, code_base: u64) -> Result<(), VmError> {
    let mut sregs = vcpu.get_sregs().map_err(VmError::kvm("get sregs"))?;
    let mut regs = kvm_regs {
        rflags: 2,
        rip: entry.addr,
        ..Default::default()
    };
    match entry.mode {
        CpuMode::Real => {
            let (code, data) = (real_segment(code_base, 11), real_segment(code_base, 3));
            sregs.cs = code;
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            regs.rip = entry.addr - code_base;
            regs.rsp = 0xfff0;
            sregs.cr0 = CR0_ET;
        }
        CpuMode::Protected => {
            set_protected_segments(&mut sregs, flat_segment(SEL_CODE32, 11, false));
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        CpuMode::Long => {
            set_protected_segments(&mut sregs, flat_segment(SEL_CODE64, 11, true));
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    match (entry.mode, entry.boot_arg) {
        (CpuMode::Protected, Some(arg)) => regs.rbx = arg,
        (_, Some(arg)) => regs.rdi = arg,
        _ => {}
    }
    vcpu.set_sregs(&sregs).map_err(VmError::kvm("set sregs"))?;
    vcpu.set_regs(&regs).map_err(VmError::kvm("set regs"))
}

/// Copies a raw image into guest memory and checks it leaves the boot area alone.
pub fn load_raw(
    mem: &GuestMemory,
    image: &[u8],
    load_addr: u64,
    entry: u64,
) -> Result<(), VmError> {
    let end = load_addr.checked_add(image.len() as u64);
    let fits =
        end.is_some_and(|end| end <= LOW_RAM_END && mem.address_in_range(GuestAddress(end - 1)));
    if load_addr < RAW_MIN_LOAD || !fits || image.is_empty() {
        return Err(VmError::Config(format!(
            "raw image of {} bytes at {load_addr:#x} must lie in RAM above {RAW_MIN_LOAD:#x}",
            image.len()
        )));
    }
    if !(load_addr..load_addr + image.len() as u64).contains(&entry) {
        return Err(VmError::Config(format!(
            "raw entry {entry:#x} is outside the image"
        )));
    }
    mem.write_slice(image, GuestAddress(load_addr))
        .map_err(|e| VmError::Memory(format!("raw image: {e}")))
}

/// `hvm_start_info` and friends as plain bytes for guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct Pod<T>(T);
// SAFETY: the wrapped PVH structures are repr(C) integers only, with no implicit padding
// beyond explicit reserved fields, so every byte pattern is a valid value.
unsafe impl ByteValued for Pod<hvm_start_info> {}
// SAFETY: as above.
unsafe impl ByteValued for Pod<hvm_modlist_entry> {}
// SAFETY: as above.
unsafe impl ByteValued for Pod<hvm_memmap_table_entry> {}

/// What the Linux loader placed in guest memory.
#[derive(Debug)]
pub struct LinuxImage {
    /// The PVH entry (32-bit protected mode, EBX = start info).
    pub entry: EntryPoint,
}

/// A kernel and initramfs already in guest memory, waiting for their command line.
#[derive(Debug, Clone, Copy)]
pub struct LoadedLinux {
    pvh_entry: u64,
    module: Option<(u64, u64)>,
}

/// Loads a vmlinux with a PVH note, its initramfs and command line, and the PVH start info.
pub fn load_linux(
    mem: &GuestMemory,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<LinuxImage, VmError> {
    let loaded = load_linux_images(mem, kernel, initramfs)?;
    finish_linux(mem, &loaded, cmdline)
}

/// The slow half of `load_linux` (reading and copying the images), which needs only memory, so
/// the builder runs it while KVM creates the VM.
pub fn load_linux_images(
    mem: &GuestMemory,
    kernel: &Path,
    initramfs: Option<&Path>,
) -> Result<LoadedLinux, VmError> {
    // The initramfs goes to the top of low RAM whatever the kernel's size, so the two files
    // (each a copy long enough to show in the boot time) are copied at once; whether they
    // overlap is checked once both are in.
    let (kernel, module) = std::thread::scope(|s| {
        let module = initramfs.map(|path| s.spawn(|| load_initramfs(mem, path)));
        let kernel = load_kernel_elf(mem, kernel);
        let module = module.map(|m| m.join().expect("the initramfs loader panicked"));
        (kernel, module)
    });
    let (pvh_entry, kernel_end) = kernel?;
    let module = match module {
        Some(placed) => Some(placed?.above(kernel_end)?),
        None => None,
    };
    Ok(LoadedLinux { pvh_entry, module })
}

/// Writes the command line and PVH start info for images loaded by `load_linux_images`.
pub fn finish_linux(
    mem: &GuestMemory,
    loaded: &LoadedLinux,
    cmdline: &str,
) -> Result<LinuxImage, VmError> {
    write_cmdline(mem, cmdline)?;
    write_start_info(mem, loaded.module)?;
    Ok(LinuxImage {
        entry: EntryPoint {
            addr: loaded.pvh_entry,
            mode: CpuMode::Protected,
            boot_arg: Some(START_INFO_ADDR),
        },
    })
}

/// Loads the ELF segments; returns the PVH entry and the end of the kernel image.
fn load_kernel_elf(mem: &GuestMemory, kernel: &Path) -> Result<(u64, u64), VmError> {
    let read_err = |source| VmError::KernelRead {
        path: kernel.to_path_buf(),
        source,
    };
    let mut file = File::open(kernel).map_err(read_err)?;
    let format_err = |reason: String| VmError::KernelFormat {
        path: kernel.to_path_buf(),
        reason,
    };
    let low_end = low_ram_end(mem);
    if let Some(end) = elf_load_end(&mut file).filter(|end| *end > low_end) {
        return Err(VmError::Config(format!(
            "memory too small: the kernel needs {} MiB of low RAM, the guest has {} MiB",
            end.div_ceil(1 << 20),
            low_end >> 20
        )));
    }
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| format_err(e.to_string()))?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Ok((addr.raw_value(), loaded.kernel_end)),
        _ => Err(format_err(
            "no PVH entry note (build the kernel with CONFIG_PVH=y)".into(),
        )),
    }
}

/// The highest physical address any PT_LOAD segment of an ELF64 reaches, or None if the
/// headers cannot be read (the loader then reports what is wrong).
fn elf_load_end(file: &mut File) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_exact(&mut ehdr).ok()?;
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 {
        return None;
    }
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let u64_at =
        |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default());
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 32), u16_at(&ehdr, 54), u16_at(&ehdr, 56));
    if phentsize != 56 {
        return None;
    }
    let mut phdrs = vec![0u8; 56 * usize::from(phnum)];
    file.seek(SeekFrom::Start(phoff)).ok()?;
    file.read_exact(&mut phdrs).ok()?;
    phdrs
        .chunks_exact(56)
        .filter(|p| p[..4] == 1u32.to_le_bytes()) // PT_LOAD
        .map(|p| u64_at(p, 24).saturating_add(u64_at(p, 40))) // p_paddr + p_memsz
        .max()
}

/// Where `load_initramfs` put the initramfs, before the kernel's end is known.
struct PlacedInitramfs {
    /// Its guest address; `None` if it is larger than low RAM (then it was not copied).
    addr: Option<u64>,
    size: u64,
    low_end: u64,
}

impl PlacedInitramfs {
    /// Its (address, size), or the error for memory too small to hold it above the kernel.
    fn above(&self, kernel_end: u64) -> Result<(u64, u64), VmError> {
        match self.addr {
            Some(addr) if addr >= kernel_end => Ok((addr, self.size)),
            _ => Err(VmError::Config(format!(
                "memory too small: kernel ends at {} MiB and the {} MiB initramfs needs to fit below {} MiB",
                kernel_end >> 20,
                self.size.div_ceil(1 << 20),
                self.low_end >> 20
            ))),
        }
    }
}

/// Copies the initramfs to the top of low RAM, if it fits there at all.
fn load_initramfs(mem: &GuestMemory, path: &Path) -> Result<PlacedInitramfs, VmError> {
    let read_err = |source| VmError::InitramfsRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let low_end = low_ram_end(mem);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|_| size > 0);
    if let Some(addr) = addr {
        // Straight from the file into guest RAM: no intermediate buffer to fill and copy.
        mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
            .map_err(|e| VmError::Memory(format!("initramfs: {e}")))?;
    }
    Ok(PlacedInitramfs {
        addr,
        size,
        low_end,
    })
}

/// End of the RAM below the MMIO hole, where the initramfs goes.
fn low_ram_end(mem: &GuestMemory) -> u64 {
    (mem.last_addr().raw_value() + 1).min(LOW_RAM_END)
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), VmError> {
    if cmdline.len() >= CMDLINE_MAX || cmdline.contains('\0') {
        return Err(VmError::Config(format!(
            "kernel command line must be under {CMDLINE_MAX} bytes without NUL"
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| VmError::Memory(format!("command line: {e}")))
}

/// The guest's RAM map: low RAM minus the EBDA and the legacy hole, then RAM above 4 GiB.
fn memory_map(mem: &GuestMemory) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr: u64, size: u64, type_: u32| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    let last = mem.last_addr().raw_value() + 1;
    let low_end = last.min(LOW_RAM_END);
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
        entry(HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ];
    if last > HIGH_RAM_START {
        map.push(entry(HIGH_RAM_START, last - HIGH_RAM_START, E820_RAM));
    }
    map
}

fn write_start_info(mem: &GuestMemory, module: Option<(u64, u64)>) -> Result<(), VmError> {
    let err = |e: vm_memory::GuestMemoryError| VmError::Memory(format!("PVH start info: {e}"));
    let map = memory_map(mem);
    for (i, e) in map.iter().enumerate() {
        let at = MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(Pod(*e), GuestAddress(at)).map_err(err)?;
    }
    if let Some((paddr, size)) = module {
        let m = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(Pod(m), GuestAddress(MODLIST_ADDR))
            .map_err(err)?;
    }
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: u32::from(module.is_some()),
        modlist_paddr: if module.is_some() { MODLIST_ADDR } else { 0 },
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    mem.write_obj(Pod(info), GuestAddress(START_INFO_ADDR))
        .map_err(err)
}

/// The address of the PVH start info (for tests and snapshots).
pub fn start_info_addr() -> GuestAddress {
    GuestAddress(START_INFO_ADDR)
}

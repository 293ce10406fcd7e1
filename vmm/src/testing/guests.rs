//! Hand-assembled guests for `Boot::Raw`: a few bytes of x86 for the instructions test guests
//! use ([`Asm`]), and the counting guest that the snapshot tests and `husk bench restore` run.
//!
//! The counting guest ([`counting_guest`], 64-bit long mode, loaded at [`LOAD`]) keeps its
//! variables in one block at [`COUNTER`]:
//!
//! | address | what |
//! |---|---|
//! | [`COUNTER`] | dword every vCPU increments in a loop |
//! | [`QUIT`] | dword the host sets non-zero to make the guest reset through the i8042 |
//! | [`STARTED`] | dword the guest sets to 1 as its first store (first-instruction marker) |
//! | [`FILL_QWORDS`] | qword the host sets before the run: how many qwords vCPU 0 fills |
//! | [`FILLED`] | dword vCPU 0 sets to 1 once the fill is done |
//! | [`TOUCH_REQUEST`] | dword the host changes to ask the marked guest to re-read its fill |
//! | [`TOUCHED`] | dword the marked guest sets to the request it has served |
//!
//! Each vCPU stores `STARTED`, prints "go\n" on COM1, and vCPU 0 fills `FILL_QWORDS` qwords of
//! [`FILL_PATTERN`] from [`FILL_START`] up (`rep stosq`; nothing when zero, as in fresh RAM)
//! before it counts, so that a guest can dirty a chosen part of its memory. The marked variant
//! ([`marked_counting_guest`]) then stamps each filled page with its own address, and while it
//! counts, whenever [`TOUCH_REQUEST`] differs from [`TOUCHED`], reads one qword of every filled
//! page and then copies the request into [`TOUCHED`]: the time until it has is how long the
//! guest takes to touch its whole working set (after a lazy resume, every page faults back in).

use std::ops::Range;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;
use crate::{Boot, CpuMode, Vm, VmConfig, VmControl, VmError, VmExit};

/// Where raw test images are loaded and entered.
pub const LOAD: u64 = 0x10_0000;
/// The counting guest's counter; its other variables follow it.
pub const COUNTER: u64 = 0x20_0000;
/// Non-zero: the counting guest resets.
pub const QUIT: u64 = COUNTER + 4;
/// Set to 1 by the counting guest's first store.
pub const STARTED: u64 = COUNTER + 8;
/// Qword count vCPU 0 fills with the pattern (the host writes it before the run).
pub const FILL_QWORDS: u64 = COUNTER + 16;
/// Set to 1 by vCPU 0 after the fill.
pub const FILLED: u64 = COUNTER + 24;
/// Changed by the host to ask the marked guest to read every filled page again.
pub const TOUCH_REQUEST: u64 = COUNTER + 28;
/// Set by the marked guest to the [`TOUCH_REQUEST`] value it has served.
pub const TOUCHED: u64 = COUNTER + 32;
/// Where the fill starts (above the image and the variables).
pub const FILL_START: u64 = 0x100_0000;
/// The qword the fill writes.
pub const FILL_PATTERN: u64 = 0x4855_534b_5f46_494c;

/// How long [`Running::count_past`] waits for the counter.
pub const COUNT_LIMIT: Duration = Duration::from_secs(30);

/// Tiny assembler for the handful of instructions the test guests use. Outside real mode,
/// `mov dx, imm16` gets the operand-size prefix.
#[derive(Default)]
pub struct Asm {
    code: Vec<u8>,
    real_mode: bool,
}

impl Asm {
    /// An empty program for 16-bit real mode (`true`) or 32/64-bit code.
    pub fn new(real_mode: bool) -> Self {
        Self {
            code: Vec::new(),
            real_mode,
        }
    }
    /// Appends raw machine code.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }
    /// `mov dx, port`.
    pub fn mov_dx(&mut self, port: u16) -> &mut Self {
        if !self.real_mode {
            self.code.push(0x66);
        }
        self.code.push(0xba);
        self.bytes(&port.to_le_bytes())
    }
    /// Writes `text` to COM1, one `mov al, c; out dx, al` per byte.
    pub fn print(&mut self, text: &str) -> &mut Self {
        self.mov_dx(0x3f8);
        for c in text.bytes() {
            self.bytes(&[0xb0, c, 0xee]);
        }
        self
    }
    /// `mov al, 0xfe; out 0x64, al`: i8042 reset.
    pub fn reset(&mut self) -> &mut Self {
        self.bytes(&[0xb0, 0xfe, 0xe6, 0x64])
    }
    /// `jmp $`.
    pub fn spin(&mut self) -> &mut Self {
        self.bytes(&[0xeb, 0xfe])
    }
    /// `mov rbx, imm64` (long mode only).
    pub fn mov_rbx(&mut self, v: u64) -> &mut Self {
        self.bytes(&[0x48, 0xbb]).bytes(&v.to_le_bytes())
    }
    /// `mov dword [rbx + disp], v`.
    pub fn store_rbx(&mut self, disp: i8, v: u32) -> &mut Self {
        self.bytes(&[0xc7, 0x43, disp as u8])
            .bytes(&v.to_le_bytes())
    }
    /// The code so far; the assembler is left empty.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.code)
    }
}

/// The counting guest described in the module documentation.
pub fn counting_guest() -> Vec<u8> {
    counting_guest_with(false)
}

/// The counting guest, but after the fill vCPU 0 also writes each filled page's own guest
/// address into the page's first qword, so that every page is unique and a page restored to
/// the wrong place shows ([`check_marked_fill`]); and it re-reads the fill on request
/// ([`TOUCH_REQUEST`]).
pub fn marked_counting_guest() -> Vec<u8> {
    counting_guest_with(true)
}

/// `mov rdx, rdi; mov rdi, FILL_START; loop: cmp rdi, rdx; jae done; mov [rdi], rdi;
/// add rdi, 4096; jmp loop; done:` — run right after the fill's `rep stosq`, which leaves
/// rdi at the end of the fill.
fn page_marks() -> Vec<u8> {
    Asm::new(false)
        .bytes(&[0x48, 0x89, 0xfa]) // mov rdx, rdi
        .bytes(&[0x48, 0xbf])
        .bytes(&FILL_START.to_le_bytes()) // mov rdi, FILL_START
        .bytes(&[0x48, 0x39, 0xd7]) // loop: cmp rdi, rdx
        .bytes(&[0x73, 0x0c]) // jae done
        .bytes(&[0x48, 0x89, 0x3f]) // mov [rdi], rdi
        .bytes(&[0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]) // add rdi, 4096
        .bytes(&[0xeb, 0xef]) // jmp loop
        .finish()
}

/// `mov rdx, [FILL_QWORDS]; shl rdx, 3; mov rdi, FILL_START; add rdx, rdi; loop: cmp rdi,
/// rdx; jae done; mov rcx, [rdi]; add rdi, 4096; jmp loop; done: mov [TOUCHED], eax` — one
/// read per filled page, then the request (in eax) marked served. Expects rbx = COUNTER.
fn touch_fill() -> Vec<u8> {
    Asm::new(false)
        .bytes(&[0x48, 0x8b, 0x53, (FILL_QWORDS - COUNTER) as u8]) // mov rdx, [rbx+16]
        .bytes(&[0x48, 0xc1, 0xe2, 0x03]) // shl rdx, 3
        .bytes(&[0x48, 0xbf])
        .bytes(&FILL_START.to_le_bytes()) // mov rdi, FILL_START
        .bytes(&[0x48, 0x01, 0xfa]) // add rdx, rdi
        .bytes(&[0x48, 0x39, 0xd7]) // loop: cmp rdi, rdx
        .bytes(&[0x73, 0x0c]) // jae done
        .bytes(&[0x48, 0x8b, 0x0f]) // mov rcx, [rdi]
        .bytes(&[0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]) // add rdi, 4096
        .bytes(&[0xeb, 0xef]) // jmp loop
        .bytes(&[0x89, 0x43, (TOUCHED - COUNTER) as u8]) // done: mov [rbx+32], eax
        .finish()
}

/// The counting loop: `count: lock inc dword [rbx]`, then with `touch` (a block that ends
/// served) `mov eax, [TOUCH_REQUEST]; cmp eax, [TOUCHED]; jne touch`, then `cmp [QUIT], 0;
/// je count`, reset; `touch` sits after the reset and jumps back to `count`.
fn count_loop(touch: Option<Vec<u8>>) -> Vec<u8> {
    let mut head = Asm::new(false);
    head.bytes(&[0xf0, 0xff, 0x03]); // count: lock inc dword [rbx]
    let tail = Asm::new(false)
        .bytes(&[0x83, 0x7b, (QUIT - COUNTER) as u8, 0x00]) // cmp dword [rbx+4], 0
        .finish();
    let exit = Asm::new(false).reset().spin().finish();
    if touch.is_some() {
        head.bytes(&[0x8b, 0x43, (TOUCH_REQUEST - COUNTER) as u8]) // mov eax, [rbx+28]
            .bytes(&[0x3b, 0x43, (TOUCHED - COUNTER) as u8]) // cmp eax, [rbx+32]
            .bytes(&[0x75, (tail.len() + 2 + exit.len()) as u8]); // jne touch
    }
    let mut code = head.finish();
    code.extend_from_slice(&tail);
    code.extend_from_slice(&[0x74, rel8_back(code.len() + 2)]); // je count
    code.extend_from_slice(&exit);
    if let Some(touch) = touch {
        code.extend_from_slice(&touch);
        code.extend_from_slice(&[0xeb, rel8_back(code.len() + 2)]); // jmp count
    }
    code
}

/// The rel8 of a jump back to the start of the code from `end`, the offset just after it.
fn rel8_back(end: usize) -> u8 {
    let back = i8::try_from(-(end as isize)).expect("a short jump back");
    back as u8
}

fn counting_guest_with(mark_pages: bool) -> Vec<u8> {
    // vCPU 0's fill: rcx = [FILL_QWORDS]; rdi = FILL_START; rax = FILL_PATTERN; rep stosq.
    let marks = if mark_pages { page_marks() } else { Vec::new() };
    let fill = Asm::new(false)
        .bytes(&[0x48, 0x8b, 0x4b, (FILL_QWORDS - COUNTER) as u8]) // mov rcx, [rbx+16]
        .bytes(&[0x48, 0xbf])
        .bytes(&FILL_START.to_le_bytes()) // mov rdi, FILL_START
        .bytes(&[0x48, 0xb8])
        .bytes(&FILL_PATTERN.to_le_bytes()) // mov rax, FILL_PATTERN
        .bytes(&[0xf3, 0x48, 0xab]) // rep stosq
        .bytes(&marks)
        .store_rbx((FILLED - COUNTER) as i8, 1)
        .finish();
    Asm::new(false)
        .mov_rbx(COUNTER)
        .store_rbx((STARTED - COUNTER) as i8, 1)
        .print("go\n")
        .bytes(&[0x85, 0xff, 0x75, fill.len() as u8]) // test edi, edi; jnz count
        .bytes(&fill)
        .bytes(&count_loop(mark_pages.then(touch_fill)))
        .finish()
}

/// A configuration that boots `image` at [`LOAD`] in long mode.
pub fn long_mode_config(image: Vec<u8>) -> VmConfig {
    VmConfig::new(Boot::Raw {
        image,
        load_addr: LOAD,
        entry: LOAD,
        mode: CpuMode::Long,
    })
}

/// Reads a guest dword (panics outside RAM: test guests know their addresses).
pub fn read_u32(mem: &GuestMemory, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr))
        .expect("test guest address in RAM")
}

/// Writes a guest dword.
pub fn write_u32(mem: &GuestMemory, addr: u64, v: u32) {
    mem.write_obj(v, GuestAddress(addr))
        .expect("test guest address in RAM");
}

/// Writes a guest qword.
pub fn write_u64(mem: &GuestMemory, addr: u64, v: u64) {
    mem.write_obj(v, GuestAddress(addr))
        .expect("test guest address in RAM");
}

/// Reads `len` bytes from `addr` a page at a time (as a guest reading them would fault them
/// in); returns how many qwords equal [`FILL_PATTERN`].
pub fn read_pattern(mem: &GuestMemory, addr: u64, len: u64) -> u64 {
    let mut page = [0u8; 4096];
    let mut found = 0;
    for at in (addr..addr + len).step_by(page.len()) {
        mem.read_slice(&mut page, GuestAddress(at))
            .expect("test guest address in RAM");
        found += page
            .chunks_exact(8)
            .filter(|q| u64::from_le_bytes((*q).try_into().unwrap()) == FILL_PATTERN)
            .count() as u64;
    }
    found
}

/// Checks every byte of the `len` bytes the marked counting guest filled: each page's first
/// qword is its guest address, every other qword [`FILL_PATTERN`]. Reads a page at a time.
pub fn check_marked_fill(mem: &GuestMemory, len: u64) -> Result<(), String> {
    let mut page = [0u8; 4096];
    for at in (FILL_START..FILL_START + len).step_by(page.len()) {
        mem.read_slice(&mut page, GuestAddress(at))
            .map_err(|e| format!("reading {at:#x}: {e}"))?;
        for (i, q) in page.chunks_exact(8).enumerate() {
            let found = u64::from_le_bytes(q.try_into().unwrap_or_default());
            let want = if i == 0 { at } else { FILL_PATTERN };
            if found != want {
                return Err(format!(
                    "guest {:#x} holds {found:#x}, expected {want:#x}",
                    at + 8 * i as u64
                ));
            }
        }
    }
    Ok(())
}

/// The host-virtual address ranges of guest RAM (to find its mappings in /proc/self/smaps).
pub fn host_ranges(mem: &GuestMemory) -> Vec<Range<usize>> {
    mem.iter()
        .filter_map(|r| {
            let start = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()? as usize;
            Some(start..start + r.len() as usize)
        })
        .collect()
}

/// A VM running on its own thread, with its memory and control handle.
pub struct Running {
    /// Guest RAM, shared with the running VM.
    pub mem: Arc<GuestMemory>,
    /// Pause, resume and snapshot.
    pub control: VmControl,
    thread: JoinHandle<Result<VmExit, VmError>>,
}

impl Running {
    /// Runs `vm` on a new thread.
    pub fn start(vm: Vm) -> Self {
        let mem = vm.memory().clone();
        let control = vm.control();
        let thread = std::thread::spawn(move || vm.run());
        Self {
            mem,
            control,
            thread,
        }
    }

    /// A guest dword.
    pub fn read(&self, addr: u64) -> u32 {
        read_u32(&self.mem, addr)
    }

    /// Writes a guest dword.
    pub fn write(&self, addr: u64, v: u32) {
        write_u32(&self.mem, addr, v)
    }

    /// Polls guest memory until `done`, yielding the CPU to the vCPU threads between looks;
    /// fails when the VM ends or `limit` passes first.
    pub fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&GuestMemory) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while !done(&self.mem) {
            if self.thread.is_finished() {
                return Err(format!("the VM ended while waiting for {what}"));
            }
            if Instant::now() > deadline {
                return Err(format!("timed out after {limit:?} waiting for {what}"));
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    /// Waits until the counting guest's counter is above `n`; returns its value then.
    pub fn count_past(&self, n: u32) -> Result<u32, String> {
        self.wait_for("the counter", COUNT_LIMIT, |m| read_u32(m, COUNTER) > n)
            .map_err(|e| format!("{e} (it stands at {})", self.read(COUNTER)))?;
        Ok(self.read(COUNTER))
    }

    /// Waits for the VM to end on its own (e.g. stopped with an error) and returns how it
    /// ended, without touching guest memory.
    pub fn join(self) -> Result<VmExit, VmError> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(VmError::Host("the VM thread panicked".into())))
    }

    /// Raises the counting guest's quit flag (resuming a paused guest) and waits for the
    /// reset that follows.
    pub fn quit(self) -> Result<(), String> {
        self.write(QUIT, 1);
        self.control.resume();
        match self.thread.join() {
            Ok(Ok(VmExit::Reset)) => Ok(()),
            Ok(Ok(other)) => Err(format!("the guest ended with {other:?} instead of a reset")),
            Ok(Err(e)) => Err(format!("the VM failed: {e}")),
            Err(_) => Err("the VM thread panicked".into()),
        }
    }
}
